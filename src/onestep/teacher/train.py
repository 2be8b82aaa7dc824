"""Training the LlamaGen-style teacher on tokenized images (next-token cross-entropy, CFG label dropout).

Recipe follows LlamaGen's c2i training (AdamW, betas (0.9, 0.95), weight decay 0.05, class dropout 0.1,
grad clip 1.0) scaled down for a 2-core CPU. Token sequences are the tokenizer's ids of the training
split, computed once and cached in the run directory (``tokens_train.npz``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from dataclasses import replace as dc_replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from onestep import checkpoint as ckpt
from onestep.data import check_image_shape, load_dataset, to_float
from onestep.distributed import DistInfo, wrap_ddp
from onestep.rng import seed_everything
from onestep.runs import recorded_data, ref_to, stage_data, tokenizer_image_shape
from onestep.teacher.families import family_named
from onestep.teacher.llamagen import GPT
from onestep.teacher.load import load_tokenizer
from onestep.trainer import (BatchSchedule, LoopConfig, RunClock, TrainLoop, autocast, guarded_step, make_optimizer,
                             prepare_run_dir, set_lr, warmup_cosine)


@dataclass(frozen=True)
class TeacherTrainConfig:
    preset: str = "small"
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    class_dropout_prob: float = 0.1
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    amp: bool = False
    max_train_items: int | None = None  # train on the first N images only (tiny smoke runs)

    def to_dict(self) -> dict:
        return asdict(self)


TEACHER_TRAIN_PRESETS = {
    "tiny": TeacherTrainConfig(preset="tiny", steps=20, batch_size=16, warmup_steps=2, log_every=5, ckpt_every=10,
                               max_train_items=2048),
    "small": TeacherTrainConfig(),
}


def tokenize_split(tokenizer, images_uint8: torch.Tensor, batch_size: int = 500, device="cpu") -> torch.Tensor:
    """Token ids (N, n) of a uint8 image tensor, in batches, without gradients."""
    out = []
    tokenizer.eval()
    with torch.no_grad():
        for i in range(0, len(images_uint8), batch_size):
            out.append(tokenizer.encode_ids(to_float(images_uint8[i:i + batch_size]).to(device)).cpu())
    return torch.cat(out)


def subset(dataset, n: int | None):
    """The first ``n`` items of an ImageDataset (all when ``n`` is None)."""
    if n is None or n >= len(dataset):
        return dataset
    return dc_replace(dataset, images=dataset.images[:n], labels=dataset.labels[:n])


def cached_tokens(run_dir: Path, tokenizer, dataset, split: str, device="cpu") -> torch.Tensor:
    path = Path(run_dir) / f"tokens_{split}_{len(dataset)}.npz"
    if path.exists():
        with np.load(path) as f:
            return torch.from_numpy(f["ids"]).long()
    ids = tokenize_split(tokenizer, dataset.images, device=device)
    ckpt.atomic_write(path, lambda p: np.savez(open(p, "wb"), ids=ids.numpy().astype(np.int32)))
    return ids


def build_teacher(preset: str, tokenizer, num_classes: int, class_dropout_prob: float = 0.1, **overrides):
    """A teacher preset of the tokenizer's family sized to the tokenizer and the data set's classes: a GPT (vocab, grid,
    code dim) for a raster VQ tokenizer, a VAR (vocab, code dim, scales, phi convs) for a multi-scale one."""
    family = family_named(getattr(tokenizer, "family", "llamagen"))
    return family.new_teacher(preset, tokenizer, num_classes, class_dropout_prob, **overrides)


def train_teacher(run_dir: str | Path, tokenizer_dir: str | Path, cfg: TeacherTrainConfig, data: str | None = None,
                  data_root: str | None = None, info: DistInfo | None = None) -> Path:
    """Train (or resume) a teacher; writes checkpoints and ``final/`` in ``run_dir``. Returns ``final/``.

    The training images: ``data`` / ``data_root``, by default the ones the tokenizer run records (Fashion-MNIST when
    it records none); folder images are resized to the tokenizer's size. Images of another channel count or size
    than the tokenizer's are refused (:class:`~onestep.data.DataError`) before anything is written."""
    info = info or DistInfo()
    seed_everything(cfg.seed)
    tokenizer, tok_cfg = load_tokenizer(tokenizer_dir, info.device)
    data, data_root = stage_data(data, data_root, recorded_data(tokenizer_dir))
    shape = tokenizer_image_shape(tokenizer)
    ds = load_dataset(data, "train", root=data_root, image_size=shape[1] if data == "folder" else None)
    check_image_shape(ds, shape, f"the tokenizer {tokenizer_dir}")
    ds = subset(ds, cfg.max_train_items)
    config = {"kind": "teacher", "family": getattr(tokenizer, "family", "llamagen"), "train": cfg,
              "tokenizer_dir": ref_to(tokenizer_dir, run_dir),
              "data": data, "data_root": data_root}
    model = build_teacher(cfg.preset, tokenizer, len(ds.class_names), cfg.class_dropout_prob).to(info.device)
    config["model"] = model.args.to_dict()
    run_dir = prepare_run_dir(run_dir, config, info)
    ids = cached_tokens(run_dir, tokenizer, ds, "train", info.device) if info.is_main else None
    if info.enabled:
        torch.distributed.barrier()
        if ids is None:
            ids = cached_tokens(run_dir, tokenizer, ds, "train", info.device)
    labels = ds.labels
    opt = make_optimizer(torch.optim.AdamW, model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    ddp = wrap_ddp(model, info)
    loop = TrainLoop(run_dir, LoopConfig(cfg.steps, cfg.batch_size, cfg.seed, cfg.log_every, cfg.ckpt_every, cfg.amp),
                     {"model": model}, {"model": opt}, {"model": config}, info, desc="teacher")
    sched = BatchSchedule(len(ids), cfg.batch_size, cfg.seed, info)

    def step_fn(step: int) -> dict:
        model.train()
        set_lr(opt, warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps))
        idx = sched.indices(step)
        x, y = ids[idx].to(info.device), labels[idx].to(info.device)
        y = model.drop_labels(y, loop.generator)
        with autocast(info.device, cfg.amp):
            logits = ddp(x, y)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x.reshape(-1))
        ok = guarded_step(loss, opt, model.parameters(), cfg.grad_clip)
        return {"loss": loss.item(), "lr": opt.param_groups[0]["lr"], "nonfinite": not ok}

    clock = RunClock(run_dir, phase="train")
    loop.run(step_fn, clock=clock)
    if info.is_main:
        clock.add()
    final = Path(run_dir) / "final"
    if info.is_main:
        config["wall_time_s"] = round(loop.wall_s, 2)  # all invocations; a re-run finished run keeps it
        ckpt.save_model(final, model, config)
    return final


@torch.no_grad()
def heldout_nll(model: GPT, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
                progress: str | None = None) -> float:
    """Mean per-token negative log-likelihood (nats) under teacher forcing (eval mode, no dropout); ``progress``: the
    label of a progress bar (with its ETA) on stderr, None for none."""
    model.eval()
    tot, cnt = 0.0, 0
    dev = next(model.parameters()).device
    for i in tqdm(range(0, len(ids), batch_size), desc=progress, disable=progress is None, dynamic_ncols=True,
                  unit="batch"):
        x, y = ids[i:i + batch_size].to(dev), labels[i:i + batch_size].to(dev)
        logits = model(x, y).float()
        tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1), reduction="sum").item()
        cnt += x.numel()
    return tot / cnt



