"""The everyday feature network: a small conv classifier trained on the data set (``fid_classifier``).

Its 128-d penultimate features give a fast FID (``fid_classifier``) and precision/recall, its logits
give the Inception score (``inception_score``, computed on these logits, since the Inception FID
network has no classification head) and the class accuracy of conditional samples. It is trained
once per data set (an image folder: per fingerprint of its files) and cached (safetensors + JSON with its test
accuracy) in ``$ONESTEP_CACHE`` (default ``~/.cache/onestep``), or shipped in ``assets/<data>/classifier``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from onestep import checkpoint as ckpt
from onestep.data import data_fingerprint, load_dataset, to_float
from onestep.paths import assets_dir, cache_dir
from onestep.trainer import make_optimizer


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier(nn.Module):
    """conv-conv-pool-conv-conv-pool-linear(features)-linear(logits), GroupNorm + SiLU, light augmentation."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.convs = nn.Sequential(*block(cfg.in_channels, w), *block(w, w), nn.MaxPool2d(2),
                                   *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2))
        side = cfg.image_size // 4
        self.fc = nn.Linear(2 * w * side * side, cfg.feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (after SiLU) of float images in [-1, 1]."""
        return F.silu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def embed(self, images_uint8: torch.Tensor, batch_size: int = 500, progress: bool = False,
              desc: str = "classifier features") -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, D), logits (N, K)) of uint8 images, eval mode, float64 on the CPU; ``progress``: a bar
        labelled ``desc`` (with its ETA) on stderr."""
        self.eval()
        dev = next(self.parameters()).device
        feats, logits = [], []
        for i in tqdm(range(0, len(images_uint8), batch_size), desc=desc, disable=not progress, dynamic_ncols=True,
                      unit="batch"):
            f = self.features(to_float(images_uint8[i:i + batch_size]).to(dev))
            feats.append(f.double().cpu())
            logits.append(self.head(f).double().cpu())
        return torch.cat(feats), torch.cat(logits)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (zero padding)."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (torch.randint(-2, 3, (2,), generator=g)).tolist()
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    H, W = x.shape[-2] - 4, x.shape[-1] - 4
    return x[..., 2 + dy:2 + dy + H, 2 + dx:2 + dx + W]


def train_classifier(train_images, train_labels, test_images, test_labels, cfg: ClassifierConfig,
                     progress: bool = True, max_steps: int | None = None) -> tuple[Classifier, dict]:
    """Train with AdamW + cosine LR; returns (model, {"test_accuracy", "train_time_s", ...})."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = Classifier(cfg)
    batch = min(cfg.batch_size, len(train_images))  # a data set smaller than a batch trains on all of it per step
    steps_per_epoch = len(train_images) // batch
    total = cfg.epochs * steps_per_epoch if max_steps is None else max_steps
    opt = make_optimizer(torch.optim.AdamW, model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 2), pct_start=0.15)
    t0 = time.time()
    model.train()
    step = 0
    bar = tqdm(total=total, desc="classifier", disable=not progress, dynamic_ncols=True)
    while step < total:
        perm = torch.randperm(len(train_images), generator=g)
        for j in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[j * batch:(j + 1) * batch]
            x = _augment(to_float(train_images[idx]), g)
            loss = F.cross_entropy(model(x), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
    bar.close()
    _, logits = model.embed(test_images)
    acc = (logits.argmax(-1) == test_labels).double().mean().item()
    return model.eval(), {"test_accuracy": acc, "train_time_s": round(time.time() - t0, 2), "steps": total}


def data_key(data: str, image_shape: tuple[int, int, int], data_root: str | None = None) -> str:
    """The cache key of what is computed from a data set: its name and image shape, and for an image folder a
    fingerprint of its files (:func:`onestep.data.data_fingerprint`), so two folders never share a cache entry."""
    C, H, W = image_shape
    fp = data_fingerprint(data, data_root)
    return f"{data}-{C}x{H}x{W}" + (f"-{fp}" if fp else "")


def classifier_dir(data: str, image_shape: tuple[int, int, int], data_root: str | None = None) -> Path:
    """Where the classifier for a data set lives: a shipped asset if present (the fixed data sets), else the cache,
    keyed by :func:`data_key`."""
    shipped = assets_dir() / data / "classifier"
    if data != "folder" and ckpt.is_model_dir(shipped):
        return shipped
    return cache_dir() / f"classifier-{data_key(data, image_shape, data_root)}"


def load_or_train_classifier(data: str = "fashion-mnist", data_root: str | None = None, device="cpu",
                             cfg: ClassifierConfig | None = None, directory: Path | None = None) -> tuple[Classifier, dict]:
    """The cached classifier of a data set, trained (and cached atomically) the first time."""
    train = load_dataset(data, "train", root=data_root)
    d = Path(directory) if directory else classifier_dir(data, train.image_shape, data_root)
    if ckpt.is_model_dir(d):
        meta = ckpt.read_json(d / "config.json")
        model = Classifier(ClassifierConfig(**meta["config"]))
        ckpt.load_model_weights(d, model)
        return model.to(device).eval(), meta
    test = load_dataset(data, "test", root=data_root)
    C, H, W = train.image_shape
    cfg = cfg or ClassifierConfig(in_channels=C, image_size=H, num_classes=train.num_classes)
    print(f"training the {data} feature classifier (cached in {d}) ...", flush=True)
    model, stats = train_classifier(train.images, train.labels, test.images, test.labels, cfg)
    meta = {"kind": "classifier", "config": cfg.to_dict(), "data": data, "class_names": train.class_names, **stats}
    ckpt.save_model(d, model, meta)
    print(f"classifier test accuracy {stats['test_accuracy']:.4f} ({stats['train_time_s']} s)", flush=True)
    return model.to(device).eval(), meta
