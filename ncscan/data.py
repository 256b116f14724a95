"""Clean images for scanning: an image folder, a flat folder, or an .npz.

Everything comes out as uint8 NHWC arrays at the model's size and channel count, plus
integer labels when the source has them. Problems the user can fix are `DataError`s;
recoverable oddities (a corrupt file among good ones, resizing) become warnings.
"""

from __future__ import annotations

import json
import os
import warnings as _pywarnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError

#: How an image of another size is brought to the model's input size. "squash" resizes
#: straight to H x W (the aspect ratio changes); "shorter-crop" scales the image so it
#: covers H x W (its shorter side becomes the target side) and takes the centre, as
#: torchvision's eval transforms (Resize + CenterCrop) do for ImageNet models.
RESIZE_MODES = ("squash", "shorter-crop")

#: Called while images are decoded: (images decoded so far, images to decode).
LoadProgress = Callable[[int, int], None]

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MIN_IMAGES = 10
MAX_PIXELS = 64_000_000  # refuse decompression bombs


class _TooLarge(Exception):
    """An image over MAX_PIXELS (or PIL's own decompression-bomb limit); skipped unread."""


@dataclass
class Dataset:
    """Images (uint8, N x H x W x C) with optional labels."""

    x: np.ndarray
    y: np.ndarray | None
    source: str
    class_names: list[str] | None = None
    warnings: list[str] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def tensor(self) -> Any:
        """Float tensor in [0,1], N x C x H x W."""
        import torch

        return torch.from_numpy(self.x).permute(0, 3, 1, 2).float().div_(255.0)


def _list_images(d: Path) -> list[Path]:
    out = []
    for p in sorted(d.iterdir()):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            out.append(p)
    return out


def _read_image(path: Path, channels: int) -> np.ndarray:
    """Decode one image to uint8 HxWxC with the wanted channel count.

    Raises:
        _TooLarge: the image has more than MAX_PIXELS pixels (checked from the header,
            before any pixel is decoded), or trips PIL's decompression-bomb guard.
    """
    from PIL import Image

    with _pywarnings.catch_warnings():
        # PIL warns above its limit and raises above twice it; both mean "skip", and
        # MAX_PIXELS (lower) is checked from the header without touching PIL's global.
        _pywarnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im_cm = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _TooLarge(str(e)) from e
        with im_cm as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise _TooLarge(f"{im.size[0]}x{im.size[1]}")
            try:
                im.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise _TooLarge(str(e)) from e
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            elif im.mode == "F":
                arr = np.asarray(im, dtype=np.float64)
                top = 1.0 if arr.max() <= 1.0 else 255.0
                im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # Composite on black, as most training pipelines effectively do.
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(bg, im)
            if channels == 1:
                im = im.convert("L")
                return np.asarray(im, dtype=np.uint8)[:, :, None]
            im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
            if channels == 4:
                arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], 2)
            return arr


def check_resize(mode: str) -> str:
    """Validate a resize mode (see RESIZE_MODES); returns it.

    Raises:
        ConfigError: an unknown mode.
    """
    if mode not in RESIZE_MODES:
        raise ConfigError(f"--resize must be squash or shorter-crop, got {mode!r}")
    return mode


def fit_image(arr: np.ndarray, h: int, w: int, mode: str = "squash") -> np.ndarray:
    """One uint8 HxWxC image at h x w, by `mode` (see RESIZE_MODES)."""
    if arr.shape[:2] == (h, w):
        return arr
    if mode == "squash":
        return _resize(arr, h, w)
    ih, iw = arr.shape[:2]
    # Scale so the image covers h x w, then crop the centre (torchvision: Resize(side) with
    # the shorter side to the target, then CenterCrop with its rounding of the offsets).
    # The longer side is truncated as torchvision does (int(side * long / short)).
    if h / ih >= w / iw:
        rh, rw = h, max(w, int(iw * h / ih))
    else:
        rh, rw = max(h, int(ih * w / iw)), w
    if (rh, rw) != (ih, iw):
        arr = _resize(arr, rh, rw)
    top, left = round((rh - h) / 2.0), round((rw - w) / 2.0)
    return np.ascontiguousarray(arr[top : top + h, left : left + w])


def _resize(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    c = arr.shape[2]
    if c == 1:
        im = Image.fromarray(arr[:, :, 0], mode="L").resize((w, h), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)[:, :, None]
    chans = [
        np.asarray(Image.fromarray(arr[:, :, i], mode="L").resize((w, h), Image.BILINEAR))
        for i in range(c)
    ]
    return np.stack(chans, 2).astype(np.uint8)


def _convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    c = x.shape[-1]
    if c == channels:
        return x
    if c == 1:
        return np.repeat(x, channels, axis=-1) if channels != 4 else np.concatenate(
            [np.repeat(x, 3, -1), np.full(x.shape[:-1] + (1,), 255, np.uint8)], -1
        )
    if channels == 1:
        rgb = x[..., :3].astype(np.float32)
        g = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(g + 0.5, 0, 255).astype(np.uint8)[..., None]
    if c == 4 and channels == 3:
        return x[..., :3]
    if c == 3 and channels == 4:
        return np.concatenate([x, np.full(x.shape[:-1] + (1,), 255, np.uint8)], -1)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels")


def _read_label_map(path: Path) -> dict[str, int]:
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"cannot read labels file {path}: {e.strerror}") from e
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            return {str(k): int(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return {str(k): i for i, k in enumerate(obj)}
    except (json.JSONDecodeError, ValueError, TypeError):
        pass
    names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not names:
        raise DataError(
            f"labels file {path} is empty; give one class-folder name per line "
            "(line number = class index) or a JSON object {name: index}"
        )
    return {n: i for i, n in enumerate(names)}


def check_labels(y: np.ndarray | None, num_classes: int, source: str) -> None:
    """Raise DataError unless every label is a class index of the model (0..num_classes-1)."""
    if y is None or y.size == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo >= 0 and hi < num_classes:
        return
    fix = (
        "fix its 'y' array" if source.lower().endswith(".npz")
        else "pass --labels FILE to map folder names to class indices"
    )
    raise DataError(
        f"data {source} has labels {lo}..{hi} but the model's classes are 0..{num_classes - 1}; {fix}"
    )


def load_data(
    path: str | os.PathLike[str],
    *,
    channels: int,
    size: tuple[int | None, int | None],
    num_classes: int | None = None,
    labels_file: str | os.PathLike[str] | None = None,
    max_images: int | None = None,
    min_images: int = MIN_IMAGES,
    seed: int = 0,
    resize: str = "squash",
    progress: LoadProgress | None = None,
) -> Dataset:
    """Load clean images.

    The `max_images` cut is made on the file list before anything is decoded, so a folder of
    100,000 photos costs only the images that are used. An unreadable image among those is
    replaced by another of the same class (seeded), so the count holds while there are
    readable ones.

    Args:
        path: image folder with class subfolders, a flat image folder, or an .npz
            with `x` (uint8 or float in [0,1], NHWC or NCHW) and optional `y`.
        channels: the model's channel count (images are converted to it).
        size: (H, W) of the model input; None entries take the images' own size.
        num_classes: the model's number of outputs, to check the labels against.
        labels_file: maps class-folder names to indices (text, one per line, or JSON).
        max_images: keep at most this many (a seeded random, class-stratified subset).
        min_images: fewer usable images than this is an error.
        seed: for the subset.
        resize: how images of another size are fitted (RESIZE_MODES): "squash" (default)
            or "shorter-crop" (torchvision's eval Resize + CenterCrop).
        progress: called as (decoded, to decode) while a folder's images are decoded.

    Returns:
        The dataset (uint8 NHWC at the model's size).

    Raises:
        DataError: missing/empty/unreadable data or labels that don't fit the model.
        ConfigError: an unknown resize mode.
    """
    check_resize(resize)
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist; pass --data DIR (images) or FILE.npz")
    if p.is_file():
        if p.suffix.lower() != ".npz":
            raise DataError(
                f"data file {p} is not an .npz; pass an image folder or an .npz with 'x' (and 'y')"
            )
        ds = _load_npz(p, channels)
        if max_images is not None and len(ds) >= min_images and len(ds) > max_images:
            # Cut before resizing; the subset is the one the full array would give.
            idx = subset_indices(ds.y, len(ds), max_images, seed)
            ds.x = ds.x[idx]
            ds.y = ds.y[idx] if ds.y is not None else None
    else:
        ds = _load_folder(p, channels, labels_file, size, max_images=max_images, seed=seed,
                          resize=resize, progress=progress, min_images=min_images)
    ds = _fit_size(ds, size, resize)
    if num_classes is not None:
        check_labels(ds.y, num_classes, str(p))
    # A cut that got all the images it asked for is enough even below min_images: that many
    # were asked for (as when the cut came after decoding everything).
    if len(ds) < min_images and not getattr(ds, "_cut", False):
        raise DataError(
            f"data in {p} has {len(ds)} usable image(s); ncscan needs at least {min_images} "
            "clean images (a few hundred recommended)"
        )
    if hasattr(ds, "_cut"):
        del ds._cut  # type: ignore[attr-defined]
    return ds


def subset_indices(y: np.ndarray | None, n: int, k: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of k of n images, class-stratified when the
    labels are known: each class keeps its share of k (largest remainders get the leftover
    places, ties broken at random), drawn at random within the class.
    Unlabelled data: a plain random subset."""
    rng = np.random.default_rng(seed)
    if y is None or k >= n:
        return np.sort(rng.permutation(n)[:k])
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * (k / n)
    take = np.floor(exact).astype(int)
    left = k - int(take.sum())
    if left > 0:
        # largest remainder first; a random key breaks ties so no class is always favoured
        order = np.lexsort((rng.random(len(classes)), -(exact - take)))
        take[order[:left]] += 1
    idx = [rng.permutation(np.flatnonzero(y == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(idx))


def _load_npz(p: Path, channels: int) -> Dataset:
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.keys())
            if "x" not in keys:
                raise DataError(
                    f"{p.name} has keys {keys}; ncscan needs 'x' (images) and optionally 'y' (labels)"
                )
            x = np.asarray(z["x"])
            y = np.asarray(z["y"]) if "y" in keys else None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {p.name} as .npz ({type(e).__name__}); check the file") from e
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{p.name}: 'x' has shape {x.shape}; expected N x H x W x C or N x C x H x W")
    if x.shape[-1] not in (1, 3, 4) and x.shape[1] in (1, 3, 4):
        x = np.transpose(x, (0, 2, 3, 1))
    if x.shape[-1] not in (1, 3, 4):
        raise DataError(f"{p.name}: 'x' has shape {x.shape}; cannot find a channel axis of 1, 3 or 4")
    if x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
            raise DataError(f"{p.name}: 'x' contains NaN or Inf")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise DataError(
                f"{p.name}: float 'x' ranges {lo:g}..{hi:g}; ncscan needs raw images, float in "
                "[0,1] or uint8 (the model's own preprocessing goes in --pixel-range/--mean/--std)"
            )
        x = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        raise DataError(f"{p.name}: 'x' has dtype {x.dtype}; use uint8 or float in [0,1]")
    if y is not None:
        if y.ndim == 2 and y.shape[1] > 1:
            y = y.argmax(1)  # one-hot labels
        y = y.reshape(-1)
        if not np.issubdtype(y.dtype, np.integer):
            if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
                y = y.astype(np.int64)
            else:
                raise DataError(f"{p.name}: 'y' has dtype {y.dtype}; use integer class indices")
        if len(y) != len(x):
            raise DataError(f"{p.name}: 'x' has {len(x)} images but 'y' has {len(y)} labels")
        y = y.astype(np.int64)
    x = _convert_channels(x, channels)
    return Dataset(x=np.ascontiguousarray(x), y=y, source=str(p))


def _class_mapping(p: Path, names: list[str], labels_file: Any) -> dict[str, int]:
    """Class folder name -> label: from the labels file, else the numbers the names are,
    else the names' sorted order."""
    if labels_file is not None:
        mapping = _read_label_map(Path(labels_file))
        unknown = [n for n in names if n not in mapping]
        if unknown:
            raise DataError(
                f"class folder(s) {', '.join(unknown[:5])} in {p} are not in labels file "
                f"{labels_file}; add them or remove the folders"
            )
        return mapping
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


def _folder_items(p: Path, labels_file: Any) -> tuple[list[tuple[Path, int | None]], list[str] | None, list[str]]:
    """The image files of folder `p` with their labels (None for a flat folder of images),
    the class names in label order (None for a flat folder), and the class folders that
    have no images directly inside."""
    try:
        entries = sorted(p.iterdir())
    except OSError as e:
        raise DataError(f"cannot read data folder {p}: {e.strerror}") from e
    subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    flat = _list_images(p)
    items: list[tuple[Path, int | None]] = []
    class_names: list[str] | None = None
    empty_classes: list[str] = []
    if subdirs and flat:
        with_images = [d.name for d in subdirs if _list_images(d)]
        if with_images:
            raise DataError(
                f"data folder {p} has {len(flat)} image(s) at its top level and class folder(s) "
                f"{', '.join(with_images[:5])}; move every image into a class folder, or pass a "
                "folder of images only"
            )
    if subdirs and not flat:
        mapping = _class_mapping(p, [d.name for d in subdirs], labels_file)
        class_names = [n for n, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        for d in subdirs:
            found = _list_images(d)
            if not found:
                empty_classes.append(d.name)
            for f in found:
                items.append((f, mapping[d.name]))
    elif flat:
        items = [(f, None) for f in flat]
    if not items:
        raise DataError(
            f"data folder {p} has no images ({', '.join(sorted(IMAGE_EXTS))}); pass a folder of "
            "images or class subfolders of images"
        )
    return items, class_names, empty_classes


def _picks(
    items: list[tuple[Path, int | None]], ys: np.ndarray | None, max_images: int | None, min_images: int, seed: int
) -> tuple[list[int], dict[int | None, deque[int]], bool]:
    """Which items to decode: all, or the seeded class-stratified `max_images` of them (the
    cut is made on the file list, before decoding). Returns (the picks, replacements for
    unreadable picks grouped by class, whether the list was cut)."""
    n_items = len(items)
    cut = max_images is not None and n_items > max_images and n_items >= min_images
    if not cut:
        return list(range(n_items)), {}, False
    assert max_images is not None
    want = [int(i) for i in subset_indices(ys, n_items, max_images, seed)]
    # Replacements for unreadable picks: the rest in a seeded order, grouped by class.
    chosen = set(want)
    rest = [int(i) for i in np.random.default_rng([seed, 17]).permutation(n_items) if int(i) not in chosen]
    spares: dict[int | None, deque[int]] = {}
    for i in rest:
        spares.setdefault(items[i][1], deque()).append(i)
    return want, spares, True


@dataclass
class _Decoded:
    """What decoding the picked files gave: the images by item index, the names of the
    files skipped as unreadable or too large, and how many images were resized."""

    got: dict[int, np.ndarray] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)
    huge: list[str] = field(default_factory=list)
    resized: int = 0


def _decode(
    items: list[tuple[Path, int | None]],
    want: list[int],
    spares: dict[int | None, deque[int]],
    channels: int,
    size: tuple[int | None, int | None],
    resize: str,
    progress: LoadProgress | None,
) -> _Decoded:
    """Decode the picks in order; an unreadable one is replaced by a spare of its class."""
    out = _Decoded()
    # With a fixed model size, shrink each image as it is read, so a folder of camera-size
    # photos never sits in memory at full resolution.
    th, tw = size
    queue = deque(want)
    total = len(want)
    while queue:
        i = queue.popleft()
        f = items[i][0]
        try:
            a = _read_image(f, channels)
        except _TooLarge:
            out.huge.append(f.name)
            a = None
        except Exception:  # noqa: BLE001  # corrupt, truncated, unsupported: skip with a count
            out.bad.append(f.name)
            a = None
        if a is None:
            spare = _next_spare(spares, items[i][1])
            if spare is not None:
                queue.append(spare)
            continue
        if th is not None and tw is not None and a.shape[:2] != (th, tw):
            a = fit_image(a, th, tw, resize)
            out.resized += 1
        out.got[i] = a
        if progress is not None:
            progress(len(out.got), total)
    return out


def _folder_warnings(p: Path, empty_classes: list[str], dec: _Decoded) -> list[str]:
    """The warnings of a folder that gave images: empty class folders, skipped files."""
    warns: list[str] = []
    if empty_classes:
        warns.append(
            f"class folder(s) {', '.join(empty_classes[:5])} in {p} have no images directly inside "
            "(nested folders are not read); those classes are not used"
        )
    if dec.bad:
        warns.append(
            f"skipped {len(dec.bad)} unreadable image(s) in {p} (e.g. {', '.join(dec.bad[:3])})"
        )
    if dec.huge:
        warns.append(
            f"skipped {len(dec.huge)} image(s) over {MAX_PIXELS // 1_000_000} megapixels in {p} "
            f"(e.g. {', '.join(dec.huge[:3])}): too large to decode safely; downscale them"
        )
    return warns


def _none_decoded(p: Path, n_items: int, dec: _Decoded) -> DataError:
    """The error for a folder none of whose images could be decoded."""
    if dec.huge and not dec.bad:
        return DataError(
            f"all {n_items} images in {p} are over {MAX_PIXELS // 1_000_000} megapixels "
            "(refused as possible decompression bombs); downscale them, e.g. to the model's "
            "input size"
        )
    return DataError(f"none of the {n_items} images in {p} could be decoded; check the files")


def _load_folder(
    p: Path,
    channels: int,
    labels_file: Any,
    size: tuple[int | None, int | None] = (None, None),
    *,
    max_images: int | None = None,
    seed: int = 0,
    resize: str = "squash",
    progress: LoadProgress | None = None,
    min_images: int = MIN_IMAGES,
) -> Dataset:
    items, class_names, empty_classes = _folder_items(p, labels_file)
    ys = None if items[0][1] is None else np.asarray([lab for _, lab in items], np.int64)
    want, spares, cut = _picks(items, ys, max_images, min_images, seed)
    dec = _decode(items, want, spares, channels, size, resize, progress)
    order = sorted(dec.got)
    imgs = [dec.got[i] for i in order]
    labels = [int(items[i][1]) for i in order] if ys is not None else []  # type: ignore[arg-type]
    warns = _folder_warnings(p, empty_classes, dec)
    if not imgs:
        raise _none_decoded(p, len(items), dec)
    shapes = {a.shape[:2] for a in imgs}
    ds = Dataset(
        x=np.empty((0,), np.uint8),
        y=np.asarray(labels, np.int64) if ys is not None else None,
        source=str(p),
        class_names=class_names,
        warnings=warns,
        skipped=len(dec.bad) + len(dec.huge),
    )
    ds._cut = cut and len(imgs) == len(want)  # type: ignore[attr-defined]
    ds._raw = imgs  # type: ignore[attr-defined]  # resized in _fit_size
    ds._resized = dec.resized  # type: ignore[attr-defined]
    ds._mixed = len(shapes) > 1  # type: ignore[attr-defined]
    return ds


def _how(resize: str) -> str:
    return " (shorter side to the target, centre crop)" if resize == "shorter-crop" else ""


def _next_spare(spares: dict[int | None, deque[int]], label: int | None) -> int | None:
    """The next replacement for an unreadable image: same class first, else any class."""
    for key in [label, *sorted(spares, key=lambda k: (k is None, k or 0))]:
        q = spares.get(key)
        if q:
            return q.popleft()
    return None


def _fit_size(ds: Dataset, size: tuple[int | None, int | None], resize: str = "squash") -> Dataset:
    raw: list[np.ndarray] | None = getattr(ds, "_raw", None)
    if raw is None:
        raw_h, raw_w = ds.x.shape[1:3]
        h = size[0] or raw_h
        w = size[1] or raw_w
        if (raw_h, raw_w) != (h, w):
            ds.warnings.append(f"resized {len(ds)} image(s) from {raw_h}x{raw_w} to {h}x{w}{_how(resize)}")
            ds.x = np.stack([fit_image(a, h, w, resize) for a in ds.x], 0)
        return ds
    h0, w0 = raw[0].shape[:2]
    h = size[0] or h0
    w = size[1] or w0
    n_resized: int = getattr(ds, "_resized", 0)
    out = []
    for a in raw:
        if a.shape[:2] != (h, w):
            a = fit_image(a, h, w, resize)
            n_resized += 1
        out.append(a)
    if n_resized:
        to = (
            f"the model's {h}x{w} input" if size[0] and size[1]
            else f"{h}x{w} (the model takes any size; the first image's size was used)"
        )
        ds.warnings.append(f"resized {n_resized} image(s) to {to}{_how(resize)}")
    ds.x = np.ascontiguousarray(np.stack(out, 0))
    del ds._raw  # type: ignore[attr-defined]
    if hasattr(ds, "_resized"):
        del ds._resized  # type: ignore[attr-defined]
    return ds
