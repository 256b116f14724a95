"""ART 1.20's Neural Cleanse on the Keras fixture, for bench/run.py's side-by-side table.

Runs in an environment with TensorFlow and ART (not ncscan's): bench/run.py calls it with
the interpreter named by --tf-python. ART's NeuralCleanse is Keras-only, so the Keras
model is rebuilt from fixtures/keras/build.py's architecture and given the EXACT weights
of the committed ONNX fixture (checked against onnxruntime before the scan), then scanned
on the same 300 clean images ncscan uses. Prints one JSON line.

    /path/to/tf-venv/bin/python bench/art_nc.py mnist_badnets_keras [--steps 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def keras_from_onnx(keras, onnx_path: Path):  # type: ignore[no-untyped-def]
    """The fixture's Keras architecture with the ONNX file's weights."""
    import onnx
    from onnx import numpy_helper

    sys.path.insert(0, str(ROOT / "fixtures" / "keras"))
    import build  # type: ignore[import-not-found]

    model = build.build_model(keras)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer}
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for v in inits.values():
        by_shape.setdefault(tuple(v.shape), []).append(v)
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        kernel, bias = ws
        if kernel.ndim == 4:  # Keras (kh, kw, in, out) <- ONNX (out, in, kh, kw)
            src = [v for v in by_shape[(kernel.shape[3], kernel.shape[2], kernel.shape[0], kernel.shape[1])]][0]
            kernel = src.transpose(2, 3, 1, 0)
        else:
            kernel = by_shape[tuple(kernel.shape)][0]
        layer.set_weights([kernel, by_shape[tuple(bias.shape)][0]])
    return model


def load_scan_images(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    xs, ys = [], []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(cls.iterdir()):
            xs.append(np.asarray(Image.open(f).convert("L"), dtype=np.float32)[..., None])
            ys.append(int(cls.name))
    return np.stack(xs), np.array(ys)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fixture", default="mnist_badnets_keras", nargs="?")
    ap.add_argument("--steps", type=int, default=1000, help="ART's maximum steps per label (its default: 1000)")
    a = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import art
    import keras
    import onnxruntime as ort
    import tensorflow as tf
    from art.defences.transformer.poisoning import NeuralCleanse
    from art.estimators.classification import KerasClassifier

    tf.config.threading.set_intra_op_parallelism_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    man = json.loads((ROOT / "fixtures" / "keras" / "manifest.json").read_text())
    e = next(f for f in man["fixtures"] if f["name"] == a.fixture)
    onnx_path = ROOT / "fixtures" / "keras" / e["file"]
    x, y = load_scan_images(ROOT / "fixtures" / "keras" / e["scan_data"])
    model = keras_from_onnx(keras, onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    got = model.predict(x, verbose=0)
    parity = float(np.abs(ref - got).max())
    if parity > 1e-4:
        raise SystemExit(f"Keras rebuild differs from the ONNX fixture by {parity}")
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    clf = KerasClassifier(model=model, clip_values=(0.0, 255.0))
    nc = NeuralCleanse(clf)
    # ART's defaults except norm=1 (the paper's L1; ART's default is L2).
    cfg = {"steps": a.steps, "norm": 1, "learning_rate": 0.1, "batch_size": 32}
    mitig = nc(clf, **cfg)
    calls = [0]
    l1: list[float] = []
    train = mitig.train
    gen = mitig.generate_backdoor

    def counting_train(xb, yb):  # type: ignore[no-untyped-def]
        calls[0] += len(xb)
        return train(xb, yb)

    def recording_gen(xv, yv, yt):  # type: ignore[no-untyped-def]
        m, p = gen(xv, yv, yt)
        l1.append(float(np.abs(m).sum()))
        return m, p

    mitig.train = counting_train
    mitig.generate_backdoor = recording_gen
    yoh = np.eye(10)[y]
    t0 = time.perf_counter()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # ART prints a tensor every mini-batch
        found = mitig.outlier_detection(x, yoh)
    wall = time.perf_counter() - t0
    v = np.array(l1)
    med = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - med)))
    idx = (np.abs(v - med) / mad).tolist() if mad > 0 else [float("nan")] * len(v)
    print(json.dumps({
        "tool": f"ART {art.__version__} NeuralCleanse (TensorFlow {tf.__version__}, Keras {keras.__version__})",
        "config": cfg, "wall_s": wall, "passes": calls[0],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "flagged": sorted(int(t[0]) for t in found), "mask_l1": l1, "anomaly_index": idx,
        "keras_onnx_max_abs_diff": parity,
    }))


if __name__ == "__main__":
    main()
