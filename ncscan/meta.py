"""The `ncscan.*` keys of an ONNX model's metadata_props: one home for the strings the
adapters write and ncscan reads. No imports, so the adapters can use them without torch."""

META_PIXEL_RANGE = "ncscan.pixel_range"
META_MEAN = "ncscan.mean"
META_STD = "ncscan.std"
META_LAYOUT = "ncscan.layout"
META_CHANNEL_ORDER = "ncscan.channel_order"
META_CLASS_NAMES = "ncscan.class_names"
# How images of another size reach the input size: "squash" or "shorter-crop" (ncscan.data)
META_RESIZE = "ncscan.resize"
# Which exporter wrote the file (informational)
META_EXPORTER = "ncscan.exporter"
# ONNX's standard image metadata (https://onnx.ai/onnx/repo-docs/MetadataProps.html)
META_ONNX_PIXEL_RANGE = "Image.NominalPixelRange"
META_ONNX_PIXEL_FORMAT = "Image.BitmapPixelFormat"
