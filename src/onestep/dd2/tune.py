"""DD2 stage 1: AR-diffusion tuning (method.md section 3, "Stages" 1; paper Table 7).

The AR-diffusion model is the stage-0 (continuous-input) teacher's causal backbone plus a MAR-style MLP
velocity head (:class:`~onestep.dd2.model.ARDiffusion`). It is trained on sequences sampled from the
teacher with the SAME sampling rule as evaluation (CFG, temperature, top-k, top-p) with

- the Ground Truth Score loss, regressing the head onto the teacher's closed-form velocity given the clean prefix
  (flow.py), or, as the paper's ablation (``tune(..., loss="dsm")``, library only),
- the ordinary diffusion loss with the Monte-Carlo target.

An optional head-only phase (``head_only_steps``, VAR's recipe) trains the head on frozen backbone
features before all parameters train. The teacher-sampled sequences are drawn once (``n_pool``
sequences, stored in the run directory as ``pool.npz``, seeded) and re-used in a deterministic order.

Evaluation as Table 7: :func:`euler_sample` samples token by token, each token with a ``euler_steps``
Euler solve of the head's ODE from t = 1 to 0, feeding the continuous tokens back to the backbone.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from onestep import checkpoint as ckpt
from onestep import rng
from onestep.dd2.losses import dsm_loss, gts_loss
from onestep.dd2.model import ARDiffusion, MLPHead
from onestep.distributed import DistInfo, wrap_ddp
from onestep.runs import final_dir, ref_to, resolve_ref
from onestep.teacher.families import family_of
from onestep.teacher.load import load_teacher
from onestep.teacher.sampling import SamplingConfig, sample_tokens, teacher_log_probs
from onestep.trainer import (BatchSchedule, LoopConfig, RunClock, TrainLoop, add_run_time, guarded_step, make_optimizer,
                             prepare_run_dir, warmup_cosine)


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 400             # total optimisation steps (head-only phase included)
    head_only_steps: int = 50    # first steps train the head only (backbone frozen); 0 = off
    batch_size: int = 32
    lr: float = 1e-4             # backbone learning rate
    head_lr: float = 1e-3        # head learning rate
    m_noise: int = 4             # noise draws per sequence (backbone once, head m times)
    t_min: float = 1e-3
    head_width: int = 256
    head_depth: int = 3
    head_time_dim: int = 128
    n_pool: int = 4096           # teacher-sampled training sequences
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 100

    def __post_init__(self):
        if not 0 <= self.head_only_steps <= self.steps:
            raise ValueError("head_only_steps must lie in [0, steps]")

    def to_dict(self) -> dict:
        return asdict(self)


TUNE_PRESETS = {
    "tiny": TuneConfig(steps=4, head_only_steps=2, batch_size=8, m_noise=2, head_width=32, head_depth=1,
                       head_time_dim=16, n_pool=32, warmup_steps=1, log_every=2, ckpt_every=2),
    "small": TuneConfig(),
}


# ---- model construction / loading --------------------------------------------------------------------
def build_ardiffusion(teacher, cfg: TuneConfig) -> ARDiffusion:
    """Backbone = a copy of the continuous-input teacher (its logits head stays, unused); fresh MLP head."""
    backbone = copy.deepcopy(teacher).requires_grad_(True).train()
    head = MLPHead(teacher.code_dim, teacher.feature_dim, cfg.head_width, cfg.head_depth, cfg.head_time_dim)
    return ARDiffusion(backbone, head).to(teacher.codebook().device)


def ardiffusion_config(teacher_cfg: dict, head: MLPHead) -> dict:
    return {"family": teacher_cfg.get("family", "llamagen"), "backbone": teacher_cfg["model"], "head": head.config()}


def load_ardiffusion(model_dir: str | Path, device="cpu") -> tuple[ARDiffusion, dict]:
    """(ARDiffusion, config) from a model directory written by stage 1 or 2 (strict load)."""
    d = final_dir(model_dir)
    config = ckpt.read_config(d)
    if config.get("kind") not in ("dd2-ardiffusion", "dd2-generator"):
        raise ckpt.CheckpointError(f"{d} is a {config.get('kind')!r} model, not a DD2 AR-diffusion model")
    teacher, _, _ = load_teacher(resolve_ref(config["teacher_dir"], d), "cpu", with_tokenizer=True)
    m = config["model"]
    model = ckpt.load_model(d, lambda: ARDiffusion(family_of(m).backbone(m["backbone"], teacher), MLPHead(**m["head"]),
                                                   m.get("generator_t", 1.0), m.get("noise_stream", False)), config)
    return model.to(device).eval(), config


# ---- teacher-sampled pool ---------------------------------------------------------------------------
def teacher_pool(path: Path, teacher, n: int, num_classes: int, sampling: SamplingConfig, seed: int,
                 batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``n`` (ids (n, L), labels (n,)) sampled from the teacher with ``sampling``; cached at ``path``."""
    if path.exists():
        with np.load(path) as f:
            if len(f["ids"]) == n and int(f["seed"]) == seed:
                return torch.from_numpy(f["ids"]).long(), torch.from_numpy(f["labels"]).long()

    device = teacher.codebook().device
    labels = torch.arange(n) % num_classes
    ids = []
    for b in tqdm(range(0, n, batch_size), desc="teacher pool", dynamic_ncols=True):
        g = torch.Generator(device=device).manual_seed(rng.derived_seed(seed * 7919 + b))
        ids.append(sample_tokens(teacher, labels[b:b + batch_size].to(device), sampling, g).cpu())
    ids = torch.cat(ids)

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=ids.numpy().astype(np.int32), labels=labels.numpy(), seed=seed)

    ckpt.atomic_write(path, write)
    return ids, labels


class TuneObjective(torch.nn.Module):
    """forward(ids, labels, head_only, generator) -> (loss, logs): one stage-1 loss evaluation (DDP-wrappable).

    In the head-only phase the backbone features are detached, so the backbone gets no gradient. ``loss``: "gts" (the
    paper's) or "dsm" (its ablation: the Monte-Carlo target eps - x0)."""

    def __init__(self, model: ARDiffusion, teacher, sampling: SamplingConfig, cfg: TuneConfig, loss: str = "gts"):
        super().__init__()
        if loss not in ("gts", "dsm"):
            raise ValueError(f"loss must be 'gts' or 'dsm', got {loss!r}")
        self.model, self.cfg, self.sampling, self.loss = model, cfg, sampling, loss
        self.teacher = [teacher]  # a list: not a submodule, so DDP does not see the frozen teacher

    def forward(self, ids: Tensor, labels: Tensor, head_only: bool, generator: torch.Generator | None):
        teacher, cfg = self.teacher[0], self.cfg
        cb = teacher.codebook()
        q = cb[ids]
        if self.loss == "gts":
            with torch.no_grad():
                log_p = teacher_log_probs(teacher, q, labels, self.sampling)
            return gts_loss(self.model, q, labels, log_p, cb, cfg.m_noise, generator, cfg.t_min, not head_only)
        return dsm_loss(self.model, q, labels, cfg.m_noise, generator, cfg.t_min, not head_only)


# ---- stage 1 -----------------------------------------------------------------------------------------
def tune(run_dir: str | Path, teacher_dir: str | Path, cfg: TuneConfig, sampling: SamplingConfig,
         info: DistInfo | None = None, loss: str = "gts") -> Path:
    """Stage 1 end to end: pool of teacher samples, GTS training, ``final/`` + ``metrics.json``.

    ``loss="dsm"`` is the paper's ablation (Table 4), recorded in the run's config as ``ablation``."""
    info = info or DistInfo()
    rng.seed_everything(cfg.seed)
    teacher, tconf, _ = load_teacher(teacher_dir, info.device, with_tokenizer=False)
    # a VAR teacher reads code vectors natively (through f_hat): its family needs no stage 0
    if family_of(tconf).needs_stage0 and tconf["model"].get("input_embedding") != "mlp":
        raise ValueError(f"{teacher_dir} is not a continuous-input teacher: run `onestep dd2 adapt` (stage 0) first")
    teacher.requires_grad_(False).eval()
    model = build_ardiffusion(teacher, cfg)
    config = {"kind": "dd2-ardiffusion", "stage": "dd2-tune", "tune": cfg, "sampling": sampling,
              "teacher_dir": ref_to(teacher_dir, run_dir), "model": ardiffusion_config(tconf, model.head)}
    if loss != "gts":
        config["ablation"] = {"loss": loss}
    run_dir = prepare_run_dir(run_dir, config, info)
    t0, c0 = time.time(), time.process_time()
    pool_built = not (Path(run_dir) / "pool.npz").exists()
    ids, labels = teacher_pool(Path(run_dir) / "pool.npz", teacher, cfg.n_pool, teacher.num_classes, sampling, cfg.seed)
    if info.is_main and pool_built:
        add_run_time(run_dir, t0, c0, phase="pool")
    objective = TuneObjective(model, teacher, sampling, cfg, loss)
    opt = make_optimizer(torch.optim.AdamW, [{"params": list(model.backbone.parameters())}, {"params": list(model.head.parameters())}],
                            betas=(0.9, 0.95), weight_decay=0.0)
    wrapped = wrap_ddp(objective, info, find_unused_parameters=True)
    loop = TrainLoop(run_dir, LoopConfig(cfg.steps, cfg.batch_size, cfg.seed, cfg.log_every, cfg.ckpt_every),
                     {"model": model}, {"model": opt}, {"model": config}, info, desc="dd2 tune")
    sched = BatchSchedule(len(ids), cfg.batch_size, cfg.seed, info)

    def step_fn(step: int) -> dict:
        head_only = step < cfg.head_only_steps
        model.train()
        opt.param_groups[0]["lr"] = 0.0 if head_only else warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        opt.param_groups[1]["lr"] = warmup_cosine(step, cfg.steps, cfg.head_lr, cfg.warmup_steps)
        idx = sched.indices(step)
        loss, logs = wrapped(ids[idx].to(info.device), labels[idx].to(info.device), head_only, loop.generator)
        ok = guarded_step(loss, opt, model.parameters(), cfg.grad_clip)
        return {**logs, "head_only": head_only, "nonfinite": not ok}

    clock = RunClock(run_dir, phase="train")
    loop.run(step_fn, clock=clock)
    final = Path(run_dir) / "final"
    if info.is_main:
        metrics = clock.add()
        ckpt.save_model(final, model, {**config, "metrics": metrics})
    return final


# ---- Table 7 evaluation: per-token Euler sampling ----------------------------------------------------
@torch.no_grad()
def euler_sample(model: ARDiffusion, labels: Tensor, generator: torch.Generator | None = None,
                 euler_steps: int = 10) -> Tensor:
    """AR sampling with the AR-diffusion model: each position by an ``euler_steps`` Euler solve of
    dx/dt = v(x, t, f_i) from t = 1 (noise) to 0; the continuous result is fed back (KV cache).
    Returns continuous tokens (B, L, C)."""
    bb = model.backbone
    B, device = labels.shape[0], labels.device
    L, C = bb.seq_len, bb.code_dim
    cache = bb.new_cache(B, device)
    ts = torch.linspace(1.0, 0.0, euler_steps + 1, device=device)
    out = torch.empty(B, L, C, device=device)
    x_prev = None
    for k, (a, b) in enumerate(bb.ar_steps()):
        f = bb.step(cache, x_prev, labels, k)  # (B, b - a, D)
        x = rng.randn((B, b - a, C), generator, device)
        for j in range(euler_steps):
            t, dt = ts[j], ts[j] - ts[j + 1]
            x = x - dt * model.velocity(x, t.expand(B, b - a), f)
        out[:, a:b] = x
        x_prev = x
    return out
