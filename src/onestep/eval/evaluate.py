"""Evaluate generated images against a data set: FID (classifier and Inception), IS, precision/recall, accuracy.

Protocol (the same for every method in a comparison):
- reference = the TRAIN split (all of it for the classifier FID unless ``n_ref_classifier`` is set, the
  first ``n_ref_inception`` images in a fixed seeded order for the Inception FID; precision/recall use ``n_ref_pr`` reference images and
  as many generated images, k = 3);
- reference statistics are cached per data set (an image folder: per fingerprint of its files) and feature
  network as ``.npz`` (``mu``, ``sigma``, plus the precision/recall feature subset) under the cache directory;
- the Inception FID's reference can instead be ADM-style statistics (``ref_stats``, ``onestep eval --ref-stats``:
  an ``.npz`` with ``mu`` (2048,) and ``sigma`` (2048, 2048), or ADM's reference batch of uint8 NHWC images
  ``arr_0``, whose statistics are computed here; :func:`read_reference_npz`, :func:`reference_stats`);
- the data floor is the same metric between the TEST split and the reference, reported beside tables.

The metrics (the keys of :meth:`Evaluator.evaluate`, with the labels :data:`onestep.eval.report.LABELS` gives
them): ``fid_classifier`` "FID (classifier)" and ``fid_inception`` "FID (Inception)" are Fréchet distances on the
project's classifier's 128-d features and on Inception-v3's 2048-d pool3 features; ``inception_score``
"IS (classifier)", ``precision`` / ``recall`` "precision (classifier)" / "recall (classifier)" and
``class_accuracy`` "class accuracy (classifier)" are computed on the classifier (its logits, its features), not on
Inception-v3, so they compare methods within this project, not with published IS or precision/recall.

Generated images are read and written as ``.npz`` in two layouts (:func:`load_images`, :func:`save_images`): this
project's (uint8 ``images`` (N, C, H, W), ``labels``) and ADM's evaluator's (uint8 ``arr_0`` (N, H, W, 3), labels
``arr_1``).
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from onestep.checkpoint import atomic_write, write_json
from onestep.data import load_dataset
from onestep.eval import metrics
from onestep.eval.classifier import data_key, load_or_train_classifier
from onestep.eval.inception import inception_features
from onestep.paths import cache_dir

NPZ_FORMATS = ("onestep", "adm")
INCEPTION_DIM = 2048  # the pool3 features of the Inception FID network


def _open_npz(path: Path, what: str):
    """``np.load(path, allow_pickle=False)`` of an ``.npz``; ``ValueError`` saying what ``path`` should be when it is
    missing, not an .npz, or a single .npy array."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist (expected {what})")
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not an .npz file ({e}); expected {what}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz; expected {what}")
    return f


def _array(f, path: Path, key: str) -> np.ndarray:
    try:
        return f[key]
    except ValueError as e:  # an object array needs pickle, which is refused
        raise ValueError(f"{path}: array {key!r} cannot be read without pickle ({e})") from None


def _nhwc_images(arr: np.ndarray, path: Path, key: str) -> torch.Tensor:
    """ADM's uint8 (N, H, W, C) images as uint8 (N, C, H, W); ``ValueError`` for another dtype or shape."""
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: {key!r} must be uint8 images (N, H, W, 3) or (N, H, W, 1), got {arr.dtype} "
                         f"{tuple(arr.shape)}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def load_images(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Generated images (uint8 (N, C, H, W)) and their labels (None when not recorded) from an ``.npz`` or a PNG
    folder.

    An ``.npz`` in this project's layout holds uint8 ``images`` (N, C, H, W) and optional ``labels``; in ADM's
    (``onestep sample --npz-format adm``, the ADM evaluator's sample batches) uint8 ``arr_0`` (N, H, W, 3) and
    optional labels ``arr_1``. A folder's PNGs are read in sorted order; a label can be given as the file-name prefix
    ``<label>_*.png``.
    """
    path = Path(path)
    if path.suffix == ".npz":
        what = "uint8 'images' (N, C, H, W) with optional 'labels', or ADM's uint8 'arr_0' (N, H, W, 3)"
        with _open_npz(path, what) as f:
            if "images" in f:
                images = torch.from_numpy(_array(f, path, "images"))
                labels = _array(f, path, "labels") if "labels" in f else None
            elif "arr_0" in f:
                images = _nhwc_images(_array(f, path, "arr_0"), path, "arr_0")
                labels = _array(f, path, "arr_1") if "arr_1" in f else None
            else:
                raise ValueError(f"{path} has no 'images' or 'arr_0' array (keys: {list(f.keys())}); expected {what}")
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"{path}: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
            raise ValueError(f"{path}: {len(images)} images but labels of shape {tuple(labels.shape)}")
        return images, (torch.from_numpy(labels).long() if labels is not None else None)
    from PIL import Image  # Pillow, optional (it comes with matplotlib): needed for a folder of images only

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise ValueError(f"no images in {path}")
    # a fixed shuffle: names like <label>_<i>.png sort into class groups, and -n, the Inception subset and the
    # precision/recall subset take the first images
    files = [files[i] for i in torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()]
    arrs = [np.asarray(Image.open(p)) for p in files]
    x = torch.from_numpy(np.stack(arrs))
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    labels = None
    if all(p.stem.split("_")[0].isdigit() for p in files):
        labels = torch.tensor([int(p.stem.split("_")[0]) for p in files])
    return x.contiguous(), labels


def save_images(path: str | Path, images: torch.Tensor, labels: torch.Tensor | None, npz_format: str = "onestep",
                **extra) -> Path:
    """Write uint8 images (N, C, H, W) and their labels as an ``.npz``: ``npz_format`` "onestep" stores ``images``,
    ``labels`` and the arrays of ``extra``; "adm" the ADM evaluator's layout, ``arr_0`` uint8 (N, H, W, 3) (grey
    images repeated to three channels) and ``arr_1`` the labels (``extra`` is not stored)."""
    if npz_format not in NPZ_FORMATS:
        raise ValueError(f"npz format {npz_format!r} is not one of {', '.join(NPZ_FORMATS)}")
    x = images.cpu()
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    y = None if labels is None else labels.cpu().numpy()
    if npz_format == "adm":
        arrays = {"arr_0": (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).permute(0, 2, 3, 1).contiguous().numpy()}
        if y is not None:
            arrays["arr_1"] = y
    else:
        arrays = {"images": x.numpy(), **({"labels": y} if y is not None else {}), **extra}
    path = Path(path)
    np.savez(path, **arrays)
    return path


class NpzWriter:
    """An ``.npz`` in either layout (:func:`save_images`) written one batch at a time, for ``n`` images: each array is
    a ``.npy`` file mapped from disk beside ``path`` (made at its first batch, when its row shape is known) and
    :meth:`close` packs them into ``path`` (stored, as ``np.savez``; written to a temporary file and renamed), so
    memory holds one batch whatever ``n`` is. ``extra``: small arrays stored as they are (``onestep`` layout only)."""

    def __init__(self, path: str | Path, n: int, npz_format: str = "onestep", **extra):
        if npz_format not in NPZ_FORMATS:
            raise ValueError(f"npz format {npz_format!r} is not one of {', '.join(NPZ_FORMATS)}")
        self.path, self.n, self.format, self.extra = Path(path), n, npz_format, extra
        self.parts: dict[str, tuple[Path, np.ndarray]] = {}
        self.done = 0

    def _put(self, name: str, rows: np.ndarray) -> None:
        if name not in self.parts:
            tmp = self.path.with_name(f".{self.path.name}.{name}.npy")
            self.parts[name] = (tmp, np.lib.format.open_memmap(tmp, "w+", rows.dtype, (self.n, *rows.shape[1:])))
        self.parts[name][1][self.done:self.done + len(rows)] = rows

    def write(self, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """Append a batch: uint8 images (b, C, H, W), labels (b,), and (``onestep`` layout) tokens (b, ...)."""
        x = images.cpu()
        if self.format == "adm":
            self._put("arr_0", (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).permute(0, 2, 3, 1).numpy())
            self._put("arr_1", labels.cpu().numpy())
        else:
            self._put("images", x.numpy())
            self._put("labels", labels.cpu().numpy())
            if tokens is not None:
                self._put("tokens", tokens.cpu().numpy())
        self.done += len(x)

    def close(self) -> Path:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, (part, arr) in self.parts.items():
                    arr.flush()
                    zf.write(part, f"{name}.npy")
                for name, value in (self.extra if self.format == "onestep" else {}).items():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
            os.replace(tmp, self.path)
        finally:
            self.discard()
        return self.path

    def discard(self) -> None:
        """Remove the arrays written so far (and a partial ``.npz``); ``path`` is left as it was."""
        self.parts.clear()  # unmaps the arrays
        for part in self.path.parent.glob(f".{self.path.name}.*"):
            part.unlink()


def match_channels(images: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    """``images`` (N, C, H, W) with ``channels`` channels: three equal channels (grey images stored as RGB, as in
    ADM's layout) become one; any other mismatch is a ``ValueError`` naming ``what``."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 3 and channels == 1:
        if torch.equal(images[:, :1].expand_as(images), images):
            return images[:, :1].contiguous()
        raise ValueError(f"{what} are colour images (3 unequal channels); the data set's images are grey")
    raise ValueError(f"{what} have {c} channel(s); the data set's images have {channels}")


def read_reference_npz(path: str | Path, dim: int | None = None) -> dict:
    """The contents of an ADM-style reference ``.npz`` (read with ``allow_pickle=False``), checked: ``{"mu": (dim,),
    "sigma": (dim, dim)}`` (float64) when it holds ``mu`` and ``sigma`` (the ADM evaluator's ``VIRTUAL_*.npz`` holds
    both, beside its images), else ``{"images": uint8 (N, C, H, W)}`` from ADM's reference images ``arr_0`` (uint8
    (N, H, W, 3)). ``dim``: the feature size, by default :data:`INCEPTION_DIM`. ``ValueError`` naming the file and
    what is wrong (not an .npz, missing keys, shapes, dtypes, non-finite values, fewer than two images)."""
    path = Path(path)
    dim = dim or INCEPTION_DIM
    what = f"reference statistics 'mu' ({dim},) and 'sigma' ({dim}, {dim}), or ADM reference images 'arr_0'"
    with _open_npz(path, what) as f:
        if "mu" in f and "sigma" in f:
            mu, sigma = _array(f, path, "mu"), _array(f, path, "sigma")
            if mu.shape != (dim,) or sigma.shape != (dim, dim):
                raise ValueError(f"{path}: 'mu' {tuple(mu.shape)} and 'sigma' {tuple(sigma.shape)} are not the "
                                 f"statistics of {dim}-d Inception features: expected ({dim},) and ({dim}, {dim})")
            if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
                raise ValueError(f"{path}: 'mu' and 'sigma' must be floating point, got {mu.dtype} and {sigma.dtype}")
            mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                raise ValueError(f"{path}: 'mu' or 'sigma' holds non-finite values")
            return {"mu": mu, "sigma": sigma}
        if "arr_0" not in f:
            raise ValueError(f"{path} has neither 'mu' and 'sigma' nor 'arr_0' (keys: {list(f.keys())}); "
                             f"expected {what}")
        images = _nhwc_images(_array(f, path, "arr_0"), path, "arr_0")
    if len(images) < 2:
        raise ValueError(f"{path}: 'arr_0' holds {len(images)} image(s); statistics need at least 2")
    return {"images": images}


def reference_stats(ref: dict, features: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """``mu`` and ``sigma`` of a :func:`read_reference_npz` result: as stored, or those of ``features(images)``
    (uint8 (N, C, H, W) -> (N, D), float64)."""
    if "mu" in ref:
        return {"mu": ref["mu"], "sigma": ref["sigma"]}
    mu, sigma = metrics.feature_stats(features(ref["images"]))
    return {"mu": mu, "sigma": sigma}


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **extra) -> Path:
    """ADM-evaluator style ``.npz`` with ``mu`` and ``sigma`` (plus optional arrays), written atomically."""
    return atomic_write(path, lambda p: np.savez(open(p, "wb"), mu=mu, sigma=sigma, **extra))


def load_stats(path: str | Path) -> dict:
    """Read an ``.npz`` holding ``mu`` and ``sigma`` (ours or the ADM evaluator's reference batches)."""
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {list(f.keys())})")
        return {k: f[k] for k in f.keys()}


class Evaluator:
    """Feature networks + cached reference statistics for one data set. ``ref_stats``: an ADM-style ``.npz``
    (:func:`read_reference_npz`, checked when the Evaluator is made) whose statistics replace the train split's as
    the Inception FID's reference. ``progress``: labelled progress bars with ETAs on stderr for the reference
    statistics and each Inception pass."""

    def __init__(self, data: str = "fashion-mnist", data_root: str | None = None, device="cpu",
                 n_ref_inception: int = 5000, n_ref_pr: int = 5000, seed: int = 0, progress: bool = True,
                 n_ref_classifier: int | None = None, ref_stats: str | Path | None = None):
        self.data, self.data_root, self.device, self.progress = data, data_root, device, progress
        self.ref_stats = Path(ref_stats) if ref_stats is not None else None
        self._ref_file = read_reference_npz(self.ref_stats) if self.ref_stats is not None else None  # checked first
        self.train = load_dataset(data, "train", root=data_root)
        self.n_ref_inception, self.n_ref_pr, self.seed = n_ref_inception, n_ref_pr, seed
        self.n_ref_classifier = n_ref_classifier or len(self.train)
        self.classifier, self.classifier_meta = load_or_train_classifier(data, data_root, device)
        self.cache = cache_dir() / "refstats" / data_key(data, self.train.image_shape, data_root)
        self._ref: dict[str, dict] = {}

    def _ref_order(self) -> torch.Tensor:
        return torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.seed))

    def _ref_tag(self, feature: str) -> str:
        """What a cached reference depends on: the classifier (its test accuracy), the reference sizes and, for the
        classifier features, the size of the precision/recall set stored with them."""
        if feature == "classifier":
            return (f"classifier-{self.classifier_meta.get('test_accuracy', 0):.6f}-n{self.n_ref_classifier}"
                    f"-pr{self.n_ref_pr}")
        if self.ref_stats is not None:  # the file, by its path, size and modification time
            st = self.ref_stats.stat()
            key = f"{self.ref_stats.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
            return f"{feature}-file{hashlib.sha256(key).hexdigest()[:12]}"
        return f"{feature}-n{self.n_ref_inception}"

    def inception_reference(self) -> str:
        """What the Inception FID is measured against, in words (recorded beside ``fid_inception``)."""
        if self.ref_stats is not None:
            return f"reference statistics {self.ref_stats}"
        return f"{self.data} train split, {min(self.n_ref_inception, len(self.train))} images"

    def reference(self, feature: str) -> dict:
        """Reference statistics of ``feature`` ("classifier" or "inception"): ``mu``, ``sigma`` and (classifier)
        ``pr_features`` of the train split, cached on disk; with ``ref_stats``, the Inception ones are the file's
        (``mu`` and ``sigma`` as stored, or those of its images, cached)."""
        if feature in self._ref:
            return self._ref[feature]
        if feature == "inception" and self._ref_file is not None and "mu" in self._ref_file:  # as stored
            self._ref[feature] = reference_stats(self._ref_file, None)
            return self._ref[feature]
        path = self.cache / f"{self._ref_tag(feature)}-seed{self.seed}.npz"
        if path.exists():
            self._ref[feature] = load_stats(path)
            return self._ref[feature]
        if feature == "inception" and self._ref_file is not None:  # ADM's reference images: their statistics, cached
            ref = reference_stats(self._ref_file, lambda x: self.features(
                "inception", x, desc=f"reference statistics: Inception features of {self.ref_stats.name}"))
            save_stats(path, ref["mu"], ref["sigma"])
            self._ref[feature] = load_stats(path)
            return self._ref[feature]
        order = self._ref_order()
        if feature == "classifier":
            order = order[: self.n_ref_classifier]
            feats, _ = self.classifier.embed(self.train.images[order], progress=self.progress,
                                             desc=f"reference statistics: classifier features of {self.data} (train)")
        else:
            feats = self.features("inception", self.train.images[order[: self.n_ref_inception]],
                                  desc=f"reference statistics: Inception features of {self.data} (train)")
        mu, sigma = metrics.feature_stats(feats)
        pr = feats[: self.n_ref_pr].numpy()
        save_stats(path, mu, sigma, pr_features=pr.astype(np.float32))
        self._ref[feature] = load_stats(path)
        return self._ref[feature]

    def features(self, feature: str, images_uint8: torch.Tensor, desc: str | None = None) -> torch.Tensor:
        """Features of uint8 images: "classifier" (N, 128) or "inception" (N, 2048); ``desc`` labels the progress
        bar of an Inception pass."""
        if feature == "classifier":
            return self.classifier.embed(images_uint8)[0]

        return inception_features(images_uint8, device=str(self.device), progress=self.progress,
                                  desc=desc or "Inception features")

    def evaluate(self, images_uint8: torch.Tensor, labels: torch.Tensor | None = None,
                 n_inception: int | None = None, what: str = "generated images") -> dict:
        """Metrics of generated uint8 images (``what`` names them on the Inception pass's progress bar):

        - ``n``: images scored; ``fid_classifier``: FID on the classifier's features against the train split;
        - ``inception_score`` (label "IS (classifier)"): exp E KL(p(y|x) || p(y)) on the classifier's logits;
        - ``precision`` / ``recall`` ("precision (classifier)" / "recall (classifier)"): k-NN manifold precision and
          recall (k = 3) on the classifier's features, on min(n, ``n_ref_pr``) images of each side;
        - ``class_accuracy`` ("class accuracy (classifier)"), with ``labels``: how often the classifier names the
          class an image was generated for;
        - ``fid_inception`` and ``n_inception``: FID on Inception-v3's pool3 features of the first ``n_inception``
          images (None: all; 0 skips it) against the Inception reference (the train split, or ``ref_stats``).
        """
        if tuple(images_uint8.shape[1:]) != tuple(self.train.image_shape):
            raise ValueError(f"images of shape {tuple(images_uint8.shape[1:])} (CxHxW) cannot be scored against "
                             f"{self.data}, whose images are {tuple(self.train.image_shape)}")
        out: dict = {"n": len(images_uint8)}
        feats, logits = self.classifier.embed(images_uint8)
        ref = self.reference("classifier")
        out["fid_classifier"] = metrics.frechet_distance(*metrics.feature_stats(feats), ref["mu"], ref["sigma"])
        out["inception_score"] = metrics.inception_score(logits)
        n_pr = min(len(feats), len(ref["pr_features"]))
        out["precision"], out["recall"] = metrics.precision_recall(ref["pr_features"][:n_pr], feats[:n_pr].numpy())
        if labels is not None:
            out["class_accuracy"] = metrics.class_accuracy(logits, labels)
        if n_inception is None or n_inception > 0:
            n_inc = len(images_uint8) if n_inception is None else min(n_inception, len(images_uint8))
            ref_i = self.reference("inception")
            fi = self.features("inception", images_uint8[:n_inc], desc=f"Inception features: {what}")
            out["fid_inception"] = metrics.frechet_distance(*metrics.feature_stats(fi), ref_i["mu"], ref_i["sigma"])
            out["n_inception"] = n_inc
        return out

    def data_floor(self, n_inception: int | None = 2000, n_test: int | None = None) -> dict:
        """The same metrics for real TEST images against the TRAIN reference: the best a generator can get.

        FID's bias grows as the sample shrinks (real test images score 5.25 / 2.22 / 0.44 classifier FID at 1000 /
        2000 / 10000 images here, benchmarks/results/eval-protocol.md), so a floor is comparable only with rows
        scored on as many samples: pass the rows' ``n_test`` (and ``n_inception``). Cached under everything the
        figure depends on."""
        test = load_dataset(self.data, "test", root=self.data_root)
        n_test = min(n_test or len(test), len(test))
        inc = f"inc{n_inception}-{self._ref_tag('inception')}" if n_inception != 0 else "inc0"
        key = f"floor-{self._ref_tag('classifier')}-test{n_test}-{inc}-seed{self.seed}"
        path = self.cache / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        res = self.evaluate(test.images[:n_test], test.labels[:n_test], n_inception=n_inception,
                            what=f"{self.data} test split (data floor)")

        write_json(path, res)
        return res
