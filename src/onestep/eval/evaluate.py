"""Evaluate generated images against a data set: FID (classifier and Inception), IS, precision/recall, accuracy.

Protocol (the same for every method in a comparison):
- reference = the TRAIN split (all of it for the classifier FID unless ``n_ref_classifier`` is set, the
  first ``n_ref_inception`` images in a fixed seeded order for the Inception FID; precision/recall use ``n_ref_pr`` reference images and
  as many generated images, k = 3);
- reference statistics are cached per data set (an image folder: per fingerprint of its files) and feature
  network as ``.npz`` (``mu``, ``sigma``, plus the precision/recall feature subset) under the cache directory;
- the data floor is the same metric between the TEST split and the reference, reported beside tables.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from onestep.eval import metrics
from onestep.eval.classifier import data_key, load_or_train_classifier
from onestep.paths import cache_dir


def load_images(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Generated images from an ``.npz`` (uint8 ``images`` (N, C, H, W), optional ``labels``) or a PNG folder.

    A folder's PNGs are read in sorted order; a label can be given as the file-name prefix ``<label>_*.png``.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "images" not in f:
                raise ValueError(f"{path} has no 'images' array (write images as uint8 (N, C, H, W))")
            return torch.from_numpy(f["images"]), (torch.from_numpy(f["labels"]).long() if "labels" in f else None)
    from PIL import Image

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


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **extra) -> Path:
    """ADM-evaluator style ``.npz`` with ``mu`` and ``sigma`` (plus optional arrays), written atomically."""
    from onestep.checkpoint import atomic_write

    return atomic_write(path, lambda p: np.savez(open(p, "wb"), mu=mu, sigma=sigma, **extra))


def load_stats(path: str | Path) -> dict:
    """Read an ``.npz`` holding ``mu`` and ``sigma`` (ours or the ADM evaluator's reference batches)."""
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {list(f.keys())})")
        return {k: f[k] for k in f.keys()}


class Evaluator:
    """Feature networks + cached reference statistics for one data set."""

    def __init__(self, data: str = "fashion-mnist", data_root: str | None = None, device="cpu",
                 n_ref_inception: int = 5000, n_ref_pr: int = 5000, seed: int = 0, progress: bool = True,
                 n_ref_classifier: int | None = None):
        from onestep.data import load_dataset

        self.data, self.data_root, self.device, self.progress = data, data_root, device, progress
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
        return f"{feature}-n{self.n_ref_inception}"

    def reference(self, feature: str) -> dict:
        """Reference statistics (``mu``, ``sigma``, ``pr_features``) of the train split, cached on disk."""
        if feature in self._ref:
            return self._ref[feature]
        path = self.cache / f"{self._ref_tag(feature)}-seed{self.seed}.npz"
        if path.exists():
            self._ref[feature] = load_stats(path)
            return self._ref[feature]
        order = self._ref_order()
        if feature == "classifier":
            order = order[: self.n_ref_classifier]
            feats, _ = self.classifier.embed(self.train.images[order])
        else:
            feats = self.features("inception", self.train.images[order[: self.n_ref_inception]])
        mu, sigma = metrics.feature_stats(feats)
        pr = feats[: self.n_ref_pr].numpy()
        save_stats(path, mu, sigma, pr_features=pr.astype(np.float32))
        self._ref[feature] = load_stats(path)
        return self._ref[feature]

    def features(self, feature: str, images_uint8: torch.Tensor) -> torch.Tensor:
        if feature == "classifier":
            return self.classifier.embed(images_uint8)[0]
        from onestep.eval.inception import inception_features

        return inception_features(images_uint8, device=str(self.device), progress=self.progress)

    def evaluate(self, images_uint8: torch.Tensor, labels: torch.Tensor | None = None,
                 n_inception: int | None = None) -> dict:
        """Metrics of generated uint8 images. ``n_inception`` = 0 skips the Inception FID."""
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
            fi = self.features("inception", images_uint8[:n_inc])
            out["fid_inception"] = metrics.frechet_distance(*metrics.feature_stats(fi), ref_i["mu"], ref_i["sigma"])
            out["n_inception"] = n_inc
        return out

    def data_floor(self, n_inception: int | None = 2000, n_test: int | None = None) -> dict:
        """The same metrics for real TEST images against the TRAIN reference: the best a generator can get.

        FID's bias grows as the sample shrinks (real test images score 5.25 / 2.22 / 0.44 classifier FID at 1000 /
        2000 / 10000 images here, benchmarks/results/eval-protocol.md), so a floor is comparable only with rows
        scored on as many samples: pass the rows' ``n_test`` (and ``n_inception``). Cached under everything the
        figure depends on."""
        from onestep.data import load_dataset

        test = load_dataset(self.data, "test", root=self.data_root)
        n_test = min(n_test or len(test), len(test))
        inc = f"inc{n_inception}-{self._ref_tag('inception')}" if n_inception != 0 else "inc0"
        key = f"floor-{self._ref_tag('classifier')}-test{n_test}-{inc}-seed{self.seed}"
        path = self.cache / f"{key}.json"
        if path.exists():
            import json

            return json.loads(path.read_text())
        res = self.evaluate(test.images[:n_test], test.labels[:n_test], n_inception=n_inception)
        from onestep.checkpoint import write_json

        write_json(path, res)
        return res
