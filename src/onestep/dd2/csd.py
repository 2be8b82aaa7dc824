"""DD2 stage 2: conditional score distillation (CSD), alternating guidance and generator turns.

:class:`DD2` is one wrapper (DMD2-style) whose ``forward(labels, turn, generator)`` runs either turn
and returns (loss, logs); it can be DDP-wrapped as a whole (``find_unused_parameters=True``).
:class:`CSDSchedule` holds the optimisers, the generator's LR warm-up, the EMA and performance
alignment, so that one outer step = K guidance updates + 1 generator update, resumable by step.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from onestep import rng
from onestep.dd2.losses import csd_generator_loss, dsm_loss
from onestep.dd2.model import ARDiffusion
from onestep.teacher.sampling import SamplingConfig, teacher_log_probs
from onestep.trainer import guarded_step, make_optimizer, set_lr


@dataclass(frozen=True)
class CSDConfig:
    steps: int = 1000            # generator updates (outer steps, alignment phase excluded)
    batch_size: int = 64
    lr: float = 2e-5             # generator learning rate (after warm-up)
    guidance_lr: float = 1e-4
    guidance_steps: int = 5      # K guidance updates per generator update (paper: 5)
    guidance_batch_size: int | None = None  # generated sequences per guidance update (None = batch_size; the paper
                                            # is silent). The K guidance turns are most of an outer step's cost; on
                                            # the tabular teacher, turns of a quarter of the batch keep psi up at
                                            # ~40% of a turn's cost (lab/results/dd2-tabular.notes.md)
    m_noise: int = 4             # noise draws per generated sequence for the guidance DSM loss
    warmup_steps: int = 100      # generator LR: linear 1e-6 -> lr
    lr_schedule: str = "constant"  # after warm-up: "constant", or "cosine" (generator AND guidance LR follow a
    final_lr_ratio: float = 0.0    # cosine from their LR to final_lr_ratio * LR at the last generator step)
    ema_max: float = 0.9999
    align_at: int = 0            # performance alignment: at this generator step (0 = off) ...
    align_steps: int = 0         # ... run this many guidance-only outer steps on the frozen EMA generator
    guidance_warmup: int = 0     # guidance-only outer steps before the first generator step (psi catches up with a
                                 # generator that did not come from stage 1, e.g. the map-start recipe's)
    grad_clip: float = 1.0
    generator_t: float = 1.0     # the time s at which the generator's head reads the noise (ARDiffusion.generate):
                                 # 1 = the paper's x = eps - v(eps, 1); s < 1 starts CSD from a noise-dependent
                                 # generator instead of the per-position mean (see ARDiffusion.generate)
    condition_on_codes: bool = False  # the prefix conditions of psi and the teacher (both turns) read sg(x) snapped to
                                      # the nearest codes, instead of the continuous sg(x) (see DD2.condition)
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 250

    def __post_init__(self):
        if not 0.0 < self.generator_t <= 1.0:
            raise ValueError(f"generator_t must lie in (0, 1], got {self.generator_t}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.guidance_batch_size is not None and self.guidance_batch_size < 1:
            raise ValueError(f"guidance_batch_size must be positive or None, got {self.guidance_batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def guidance_batch(self) -> int:
        """Generated sequences per guidance update."""
        return self.batch_size if self.guidance_batch_size is None else self.guidance_batch_size

    @property
    def total_steps(self) -> int:
        return self.guidance_warmup + self.steps + (self.align_steps if self.align_at > 0 else 0)


class DD2(nn.Module):
    """Generator theta, guidance psi, frozen teacher; forward(labels, turn) -> (loss, logs): the paper's loss.

    The studies' variants of the loss subclass it (``lab/csd_variants.py``); ``record`` is what such a variant adds
    to its run's config (nothing here)."""

    ALPHA = 1.0                 # SiD's alpha (the DD2 paper's; SiD's own default 1.2 diverges, method.md section 5)
    T_RANGE = (0.02, 0.98)      # the generator turn's t range (a project choice)
    DSM_T_RANGE = (1e-3, 1.0)   # the guidance turn's (DSM) t range

    def __init__(self, generator: ARDiffusion, guidance: ARDiffusion, teacher: nn.Module, sampling: SamplingConfig,
                 cfg: CSDConfig):
        super().__init__()
        self.generator, self.guidance, self.teacher = generator, guidance, teacher
        self.sampling, self.cfg = sampling, cfg
        self.record: dict = {}
        generator.generator_t = cfg.generator_t  # the time at which the generator's head reads the noise
        self.teacher.requires_grad_(False).eval()
        self.seq_len, self.code_dim = teacher.seq_len, teacher.code_dim

    def guidance_turns(self) -> int:
        """Guidance updates per outer step (K)."""
        return self.cfg.guidance_steps

    def noise(self, batch: int, generator: torch.Generator | None, device) -> Tensor:
        return rng.randn((batch, self.seq_len, self.code_dim), generator, device)

    @torch.no_grad()
    def condition(self, x: Tensor) -> Tensor:
        """The sequence the prefix conditions read: sg(x), or with ``condition_on_codes`` every position snapped to
        its nearest code. Snapped, psi learns the generator's conditional given the QUANTISED prefix, the quantity
        the quantised joint is made of (Proposition 1 then holds for the quantised generator), and both
        backbones read codes, as in stage 1."""
        x = x.detach()
        if not self.cfg.condition_on_codes:
            return x
        return self.teacher.ids_to_codes(self.teacher.nearest_ids(x)).to(x)

    def forward(self, labels: Tensor, turn: str, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        cfg = self.cfg
        eps = self.noise(labels.shape[0], generator, labels.device)
        if turn == "guidance":
            with torch.no_grad():
                x = self.generator.generate(eps, labels)
                cond = self.condition(x)
            return dsm_loss(self.guidance, x, labels, cfg.m_noise, generator, self.DSM_T_RANGE[0],
                            t_max=self.DSM_T_RANGE[1], condition=cond)
        if turn != "generator":
            raise ValueError(f"turn must be 'generator' or 'guidance', got {turn!r}")
        x = self.generator.generate(eps, labels)
        x_sg = self.condition(x)
        with torch.no_grad():  # prefix conditions: no graph over the teacher's or psi's backbone
            log_p = teacher_log_probs(self.teacher, x_sg, labels, self.sampling)
            f_psi = self.guidance.features(x_sg, labels)
        return csd_generator_loss(x, labels, log_p, self.teacher.codebook(), self.guidance, f_psi, generator,
                                  self.ALPHA, *self.T_RANGE)


def lr_decay(cfg: CSDConfig, gen_step: int) -> float:
    """LR multiplier after warm-up: 1 (constant), or a cosine from 1 to final_lr_ratio over the CSD steps."""
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    frac = min(1.0, max(0.0, (gen_step - cfg.warmup_steps) / span))
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def generator_lr(cfg: CSDConfig, gen_step: int) -> float:
    """The generator's LR at a generator step: linear warm-up from 1e-6 (method.md section 3), then lr_decay."""
    if gen_step < cfg.warmup_steps:
        return 1e-6 + (cfg.lr - 1e-6) * gen_step / cfg.warmup_steps
    return cfg.lr * lr_decay(cfg, gen_step)


def ema_rate(it: int, ema_max: float) -> float:
    """min(ema_max, (it + 1) / (it + 10)) (method.md section 3)."""
    return min(ema_max, (it + 1) / (it + 10))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1 - rate)


class CSDSchedule:
    """Optimisers, warm-up, EMA and alignment around a :class:`DD2` wrapper (maybe DDP-wrapped)."""

    def __init__(self, dd2: DD2, wrapped: nn.Module | None = None):
        self.dd2, self.wrapped = dd2, wrapped if wrapped is not None else dd2
        cfg = dd2.cfg
        self.ema = copy.deepcopy(dd2.generator).requires_grad_(False).eval()
        self.opt_gen = make_optimizer(torch.optim.Adam, dd2.generator.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
        self.opt_guid = make_optimizer(torch.optim.Adam, dd2.guidance.parameters(), lr=cfg.guidance_lr, betas=(0.9, 0.95))

    def decay(self, gen_step: int) -> float:
        return lr_decay(self.dd2.cfg, gen_step)

    def generator_lr(self, gen_step: int) -> float:
        return generator_lr(self.dd2.cfg, gen_step)

    def guidance_lr(self, gen_step: int) -> float:
        return self.dd2.cfg.guidance_lr * self.decay(gen_step)

    def phase(self, step: int) -> tuple[str, int]:
        """('warmup' | 'align' | 'csd', generator steps done before this outer step)."""
        cfg = self.dd2.cfg
        if step < cfg.guidance_warmup:
            return "warmup", 0
        step -= cfg.guidance_warmup
        if cfg.align_at > 0 and step >= cfg.align_at:
            if step < cfg.align_at + cfg.align_steps:
                return "align", cfg.align_at
            return "csd", step - cfg.align_steps
        return "csd", step

    def step(self, step: int, sample_labels, generator: torch.Generator) -> dict:
        """One outer step: K guidance updates, then one generator update (none during alignment).

        ``sample_labels(n)`` returns the labels of one turn's batch of ``n`` sequences (the global batch: a DDP
        caller returns its rank's share): ``cfg.guidance_batch`` for a guidance turn, ``cfg.batch_size`` for the
        generator turn."""
        cfg, dd2 = self.dd2.cfg, self.dd2
        phase, gen_step = self.phase(step)
        if phase == "align" and step == cfg.guidance_warmup + cfg.align_at:  # swap in the EMA generator, frozen during alignment
            dd2.generator.load_state_dict(self.ema.state_dict())
        logs: dict = {"phase": phase}
        bad, lg = False, {}
        dd2.guidance.train()
        # set every step, also at a constant LR: a resumed optimiser's state_dict brings back the LR it was saved with
        set_lr(self.opt_guid, self.guidance_lr(gen_step))
        for _ in range(dd2.guidance_turns()):
            loss, lg = self.wrapped(sample_labels(cfg.guidance_batch), "guidance", generator)
            bad |= not guarded_step(loss, self.opt_guid, dd2.guidance.parameters(), cfg.grad_clip)
        logs.update(lg)
        if phase == "csd":
            set_lr(self.opt_gen, self.generator_lr(gen_step))
            dd2.generator.train()
            loss, lg = self.wrapped(sample_labels(cfg.batch_size), "generator", generator)
            bad |= not guarded_step(loss, self.opt_gen, dd2.generator.parameters(), cfg.grad_clip)
            self.opt_guid.zero_grad(set_to_none=True)  # the generator turn's input-gradients through psi's head
            ema_update(self.ema, dd2.generator, ema_rate(gen_step, cfg.ema_max))
            logs.update(lg)
            logs["lr"] = self.opt_gen.param_groups[0]["lr"]
        logs["nonfinite"] = bad
        return logs
