"""DD1 training step (method.md section 2): cross-entropy of the generator's logits on the map's tokens.

A training example is a pair (eps, ids = map(eps), label) plus a trajectory point: the number of clean
positions m (0 = X_1, all noise). The generator sees (ids[:m], eps[m:]) and must predict ids at every
position. The DD1 paper does not publish its loss or its distribution over trajectory points; the
choices here (config values of :class:`TrajectoryConfig`):

- ``p_all_noise`` (default 0.5) of the examples use X_1 (the one-step input), the rest an
  intermediate point with m drawn uniformly from ``clean_counts`` (default: every AR-step boundary
  1..n-1, so the generator can continue from any prefix: 2-step sampling and teacher-involved
  sampling use m = s and the end of the teacher's window).
- ``loss_on="noise"`` (default): the loss averages over positions i >= m only (positions i < m are
  clean inputs, copying them is trivial); ``"all"`` averages over every position.

The lead's generic loop (:mod:`onestep.trainer`) wraps :func:`dd1_loss`; model and optimizer hold all
state. :func:`fit` is a small self-contained loop for tests and demos.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from onestep.dd1.model import clean_mask
from onestep.trainer import make_optimizer

__all__ = ["TrajectoryConfig", "TrajectorySampler", "add_trajectory_points", "dd1_loss", "fit"]


@dataclass(frozen=True)
class TrajectoryConfig:
    p_all_noise: float = 0.5
    clean_counts: tuple[int, ...] | None = None  # None: every AR-step boundary in 1..n-1
    loss_on: str = "noise"  # "noise" (positions >= m) or "all"

    def __post_init__(self):
        if self.loss_on not in ("noise", "all"):
            raise ValueError(f"loss_on must be 'noise' or 'all', got {self.loss_on!r}")
        if not 0.0 <= self.p_all_noise <= 1.0:
            raise ValueError("p_all_noise must be in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


class TrajectorySampler:
    """Draws the number of clean positions m per example (see the module docstring)."""

    def __init__(self, cfg: TrajectoryConfig, seq_len: int, ar_steps: list[tuple[int, int]] | None = None):
        self.cfg, self.n = cfg, seq_len
        if cfg.clean_counts is not None:
            counts = list(cfg.clean_counts)
        else:
            steps = ar_steps or [(i, i + 1) for i in range(seq_len)]
            counts = [a for a, _ in steps[1:]]
        if any(not 0 <= c <= seq_len for c in counts):
            raise ValueError(f"clean counts must lie in [0, {seq_len}]: {counts}")
        self.counts = torch.tensor(counts if counts else [0], dtype=torch.long)

    def __call__(self, batch: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        noise_only = torch.rand(batch, generator=generator) < self.cfg.p_all_noise
        pick = self.counts[torch.randint(len(self.counts), (batch,), generator=generator)]
        return torch.where(noise_only, torch.zeros_like(pick), pick).to(device)


def add_trajectory_points(batch: dict, sampler: TrajectorySampler, generator: torch.Generator | None = None) -> dict:
    """Return ``batch`` with ``n_clean`` (B,) drawn by ``sampler`` (on the batch's device)."""
    B = batch["ids"].shape[0]
    return {**batch, "n_clean": sampler(B, generator, batch["ids"].device)}


def dd1_loss(model, batch: dict, loss_on: str = "noise") -> tuple[Tensor, dict]:
    """Cross-entropy of ``model``'s logits on the map's tokens at the trajectory points of ``batch``.

    batch: eps (B, n, C), ids (B, n) (the map's tokens), labels (B,), n_clean (B,) (0 if absent).
    Returns (loss, logs) with logs: loss, acc (token accuracy on the loss positions), acc_x1 (accuracy
    of the all-noise examples), nonfinite (1.0 if the loss is not finite).
    """
    eps, ids, labels = batch["eps"], batch["ids"], batch["labels"]
    B, n = ids.shape
    n_clean = batch.get("n_clean")
    if n_clean is None:
        n_clean = torch.zeros(B, dtype=torch.long, device=ids.device)
    clean = clean_mask(n_clean, n)
    logits = model(ids, eps, clean, labels)
    ce = F.cross_entropy(logits.float().reshape(B * n, -1), ids.reshape(-1), reduction="none").reshape(B, n)
    w = (~clean).float() if loss_on == "noise" else torch.ones_like(ce)
    loss = (ce * w).sum() / w.sum().clamp_min(1.0)
    with torch.no_grad():
        hit = (logits.argmax(-1) == ids).float()
        x1 = n_clean == 0
        logs = {"loss": loss.item(), "acc": ((hit * w).sum() / w.sum().clamp_min(1.0)).item(),
                "acc_x1": hit[x1].mean().item() if x1.any() else float("nan"),
                "nonfinite": float(not torch.isfinite(loss).item())}
    return loss, logs


def fit(model, pairs: dict, steps: int, batch_size: int = 64, lr: float = 3e-4, traj: TrajectoryConfig | None = None,
        seed: int = 0, weight_decay: float = 0.0, log_every: int = 0, ar_steps=None) -> list[dict]:
    """A minimal training loop on in-memory pairs (``onestep.dd1.pairs.load_pairs``); returns the logs.

    AdamW(betas 0.9, 0.95), constant LR, random batches with replacement across epochs.
    """
    traj = traj or TrajectoryConfig()
    device = next(model.parameters()).device
    sampler = TrajectorySampler(traj, pairs["ids"].shape[1], ar_steps)
    g = torch.Generator().manual_seed(seed)
    opt = make_optimizer(torch.optim.AdamW, model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    N = pairs["ids"].shape[0]
    model.train()
    hist = []
    for it in range(steps):
        idx = torch.randint(N, (batch_size,), generator=g)
        batch = {k: pairs[k][idx].to(device) for k in ("eps", "ids", "labels")}
        batch["n_clean"] = sampler(batch_size, g, device)
        loss, logs = dd1_loss(model, batch, traj.loss_on)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        logs["step"] = it
        hist.append(logs)
        if log_every and it % log_every == 0:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items()}, flush=True)
    model.eval()
    return hist
