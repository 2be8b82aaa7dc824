"""MapKD training: the generator distilled on the teacher's conditionals at its own samples (docs/method.md, "MapKD").

MapKD (map + knowledge distillation) is the project's own one-step method. Its generator
(:class:`~onestep.mapkd.generator.MapKDGenerator`) gives logits l_i(eps_<i) for every position in one pass and draws
token i by DD1's closed-form map of its own noise eps_i under softmax(l_i), so its conditional of token i given its
prefix noise is softmax(l_i) exactly (up to the map's ODE error). It is trained by a token-level divergence to the
teacher's conditional at the generator's own samples (on-policy distillation):

    L(theta) = E_eps sum_i D( p_T(. | x_<i), softmax(l_i(eps_<i)) ),    x = G(eps),    the prefix x_<i a constant

with p_T the teacher's conditional under its sampling rule (CFG, truncation), for every position in one
teacher-forcing pass over the generated tokens. D = KL(p_T || q) (``divergence="forward"``, mass-covering) is the
default; KL(q || p_T) (``"reverse"``) keeps precision and drops modes; ``"mixture"`` is

    D_w = (1 - w) KL(p_T || q) + w KL(q || p_T),    w = reverse_weight (0.5: half the Jeffreys divergence),

with w moved linearly to ``reverse_weight_end`` over training when that is set (a schedule from forward to reverse).
Every D here is zero exactly when q = p_T, so the fixed point is the same.

What it shares with DD2: the per-position conditional view and Proposition 1's fixed point (every conditional of the
generator equal to the teacher's at the generator's own prefixes, hence equal joints). What it drops: score
distillation, the guidance network, continuous outputs, and DD2's stages 0 and 1 (the teacher reads exact token ids).
It needs no DD1 pairs either.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from onestep import checkpoint as ckpt
from onestep import rng
from onestep.distributed import DistInfo, unwrap, wrap_ddp
from onestep.flow_map import ODEConfig, codebook_grid
from onestep.mapkd.generator import ODE_SOLVER, ODE_STEPS, MapKDGenerator
from onestep.runs import ref_to
from onestep.teacher.load import load_teacher
from onestep.teacher.sampling import SamplingConfig, teacher_log_probs
from onestep.trainer import (LoopConfig, RunClock, TrainLoop, guarded_step, make_optimizer, prepare_run_dir, set_lr,
                             warmup_cosine)

__all__ = ["MapKDConfig", "MAPKD_PRESETS", "mapkd_loss", "train_mapkd"]


@dataclass(frozen=True)
class MapKDConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ode_steps: int = ODE_STEPS   # the flow map's ODE (onestep.flow_map.ode_map), in training and sampling:
    ode_solver: str = ODE_SOLVER # 16 steps of AB2 extrapolating in log s on a log-SNR grid over [s_min, s_max]
    ode_s_min: float | None = None  # (None: flow_map.codebook_grid, [0.30, 37.4] on Fashion-MNIST's codes) put 1.0%
    ode_s_max: float | None = None  # of the tokens off a converged reference, at half the time of the 32 AB2 steps in
                                    # s over [0.05, 500] that put 3.3% off (benchmarks/results/ode-solvers.md)
    divergence: str = "forward"  # "forward": KL(p_T || q), "reverse": KL(q || p_T), "mixture" (module docstring)
    reverse_weight: float = 0.5  # "mixture": the weight w of KL(q || p_T)
    reverse_weight_end: float | None = None  # "mixture": w at the last step, linear from reverse_weight (None: fixed)
    prefix_codes: bool = False   # row i also reads the code DD1's map gives eps_j (j < i) under the generator's
                                 # running per-class marginal at position j (MapKDGenerator.prefix_codes)
    prefix_ode_steps: int | None = None  # the steps of that map's ODE (None: ode_steps)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100

    def __post_init__(self):
        if self.divergence not in ("forward", "reverse", "mixture"):
            raise ValueError(f"divergence must be 'forward', 'reverse' or 'mixture', got {self.divergence!r}")
        if not all(0.0 <= w <= 1.0 for w in (self.reverse_weight, self.reverse_weight_end or 0.0)):
            raise ValueError(f"reverse_weight and reverse_weight_end must lie in [0, 1], got {self.reverse_weight}, "
                             f"{self.reverse_weight_end}")
        if self.reverse_weight_end is not None and self.divergence != "mixture":
            raise ValueError("reverse_weight_end schedules the mixture's weight: it needs divergence='mixture'")
        if self.ode_steps < 2 or (self.prefix_ode_steps is not None and self.prefix_ode_steps < 2):
            raise ValueError(f"ode_steps and prefix_ode_steps must be at least 2, got {self.ode_steps}, "
                             f"{self.prefix_ode_steps}")
        if self.prefix_ode_steps is not None and not self.prefix_codes:
            raise ValueError("prefix_ode_steps sets the prefix codes' map: it needs prefix_codes")
        ODEConfig(solver=self.ode_solver, n_steps=self.ode_steps)  # validates the solver
        if any(v is not None and v <= 0 for v in (self.ode_s_min, self.ode_s_max)) or (
                None not in (self.ode_s_min, self.ode_s_max) and self.ode_s_min >= self.ode_s_max):
            raise ValueError(f"need 0 < s_min < s_max, got ode_s_min={self.ode_s_min}, ode_s_max={self.ode_s_max}")

    def ode(self, codebook: Tensor | None = None) -> ODEConfig:
        """The flow map's ODE configuration; a grid end left None comes from ``codebook`` (``codebook_grid``)."""
        grid = codebook_grid(codebook) if None in (self.ode_s_min, self.ode_s_max) else (None, None)
        s_min = grid[0] if self.ode_s_min is None else self.ode_s_min
        s_max = grid[1] if self.ode_s_max is None else self.ode_s_max
        return ODEConfig(solver=self.ode_solver, n_steps=self.ode_steps, s_min=s_min, s_max=s_max)

    def reverse_weight_at(self, step: int) -> float:
        """The weight w of KL(q || p_T) in the loss at ``step`` (0-based): 0 forward, 1 reverse."""
        if self.divergence != "mixture":
            return float(self.divergence == "reverse")
        if self.reverse_weight_end is None:
            return self.reverse_weight
        frac = step / max(1, self.steps - 1)
        return self.reverse_weight + (self.reverse_weight_end - self.reverse_weight) * frac

    def to_dict(self) -> dict:
        return asdict(self)


MAPKD_PRESETS = {
    "tiny": MapKDConfig(steps=2, batch_size=4, warmup_steps=1, ode_steps=4, log_every=1, ckpt_every=1),
    # the default bench's: 600 steps of batch 64 at LR 1e-3 (cosine); its CPU cost: benchmarks/results/training-cost.md
    "small": MapKDConfig(),
}


def mapkd_loss(generator: nn.Module, teacher: nn.Module, sampling: SamplingConfig, eps: Tensor, labels: Tensor,
               ode: ODEConfig, reverse_weight: float = 0.0) -> tuple[Tensor, dict]:
    """The distillation loss of the module docstring on one batch, D_w with w = ``reverse_weight`` (0: forward KL,
    1: reverse KL); ``generator`` may be DDP-wrapped (its forward returns the log-probs). Logs: the forward KL per
    position (nats), overall, at the first position and over the last eighth of the positions; the reverse KL
    where it is in the loss."""
    log_q = generator(eps, labels)
    with torch.no_grad():
        ids = unwrap(generator).draw(eps, log_q.detach(), ode)
        log_p = teacher_log_probs(teacher, ids, labels, sampling).float()
    p = log_p.exp()
    zero = torch.zeros_like(p)
    kl = torch.where(p > 0, p * (log_p - log_q), zero).sum(-1)  # KL(p_T || q) (B, n); 0 log 0 = 0
    tail = max(1, kl.shape[1] // 8)
    logs = {"kl": kl.mean().item(), "kl_first": kl[:, 0].mean().item(), "kl_last": kl[:, -tail:].mean().item()}
    if reverse_weight == 0.0:
        return kl.mean(), logs
    # KL(q || p_T); a truncated code (p_T = 0) is held at a large finite penalty
    rkl = (log_q.exp() * (log_q - log_p.clamp_min(-1e4))).sum(-1).mean()
    logs["reverse_kl"] = rkl.item()
    return (1.0 - reverse_weight) * kl.mean() + reverse_weight * rkl, logs


def train_mapkd(run_dir: str | Path, teacher_dir: str | Path, cfg: MapKDConfig, sampling: SamplingConfig,
               info: DistInfo | None = None) -> Path:
    """MapKD end to end from a teacher run; returns ``RUN/final`` (the generator)."""
    info = info or DistInfo()
    rng.seed_everything(cfg.seed)
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by world size {info.world_size}")
    teacher, tconf, _ = load_teacher(teacher_dir, info.device, with_tokenizer=False)
    teacher.requires_grad_(False).eval()
    generator = MapKDGenerator.from_teacher(teacher, cfg.ode(teacher.codebook()), tconf.get("family", "llamagen"),
                                               cfg.prefix_codes, cfg.prefix_ode_steps, sampling.top_k).to(info.device)
    config = {"kind": "mapkd", "stage": "mapkd-train", "mapkd": cfg,
              "sampling": sampling.to_dict(), "teacher_dir": ref_to(teacher_dir, run_dir),
              "model": generator.config(), "data": tconf.get("data")}
    run_dir = prepare_run_dir(run_dir, config, info)
    opt = make_optimizer(torch.optim.Adam, generator.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    wrapped = wrap_ddp(generator, info)
    loop = TrainLoop(run_dir, LoopConfig(cfg.steps, cfg.batch_size, cfg.seed, cfg.log_every, cfg.ckpt_every),
                     {"generator": generator}, {"generator": opt}, {"generator": config}, info, desc="mapkd train")
    n_local = cfg.batch_size // info.world_size

    def step_fn(step: int) -> dict:
        generator.train()
        set_lr(opt, warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio))
        labels = torch.randint(teacher.num_classes, (n_local,), generator=loop.generator).to(info.device)
        eps = rng.randn((n_local, *generator.noise_shape), loop.generator, info.device)
        loss, logs = mapkd_loss(wrapped, teacher, sampling, eps, labels, generator.ode, cfg.reverse_weight_at(step))
        logs["nonfinite"] = float(not guarded_step(loss, opt, generator.parameters(), cfg.grad_clip))
        logs["lr"] = opt.param_groups[0]["lr"]
        return logs

    clock = RunClock(run_dir)
    loop.run(step_fn, clock=clock)
    final = Path(run_dir) / "final"
    if info.is_main:
        metrics = clock.add(nonfinite_steps=loop.nonfinite_total)
        ckpt.save_model(final, generator, {**config, "weights": "generator", "metrics": metrics})
    return final
