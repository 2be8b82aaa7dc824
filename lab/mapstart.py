"""A variant of DD2 (not the paper's recipe), "map start": regress the one-step generator onto DD1's noise-to-token
pairs, then refine it by CSD.

    python lab/mapstart.py --tune B --pairs P --run-dir M [--preset small]        # phase 1: the map fit
    onestep dd2 train --tune B --generator-init M ...                              # phase 2: CSD from it (Python API:
                                                                                   # onestep.dd2.train.train(generator_init=M))

DMD's first version anchored distribution matching with a regression loss on ODE pairs; this recipe does the
same in two phases instead of one sum. Phase 1 fits the generator G(eps) = eps - v(eps, 1 | f(eps_<i)) of
:class:`~onestep.dd2.model.ARDiffusion` to DD1's deterministic map (method.md sections 1 and 2.1): noise
eps (B, n, C) -> the code vectors of the tokens the ODE lands on, with the mean squared error

    L_reg = E_eps sum_i |G(eps)_i - c_{q_i(eps)}|^2

(a continuous regression target: the DD2 generator outputs vectors, and its quantised samples are what the
map's push-forward is measured on). Phase 2 is ordinary CSD (:mod:`onestep.dd2.csd`) started from that
generator, with ``CSDConfig.guidance_warmup`` guidance-only steps first (psi catches up with a generator it
was not initialised from) and a low, decaying generator LR: the exact map is a fixed point of CSD
(Proposition 1), and at a working LR CSD's noisy gradient pushes the generator off it
(lab/dd2-convergence.md).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from onestep.dd2.model import ARDiffusion
from onestep.trainer import guarded_step, make_optimizer, warmup_cosine


def regression_loss(generator: ARDiffusion, eps: Tensor, labels: Tensor, target: Tensor,
                    codebook: Tensor | None = None, ids: Tensor | None = None, cells_temperature: float = 0.0) -> Tensor:
    """L_reg = mean over samples and positions of |G(eps)_i - target_i|^2, target (B, n, C) the map's code vectors.

    With ``cells_temperature`` tau > 0 (and ``codebook`` (V, C), ``ids`` (B, n) the map's tokens) the loss is instead
    the cross-entropy of the map's token under logits_j = -|G(eps)_i - c_j|^2 / tau: what counts is the Voronoi
    cell the output lands in (the token it quantises to), not its distance to the code, as in DD1's token loss."""
    x = generator.generate(eps, labels)
    if cells_temperature <= 0:
        return (x - target).pow(2).sum(-1).mean()
    logits = -torch.cdist(x.float().reshape(-1, x.shape[-1]), codebook.float()).pow(2) / cells_temperature
    return torch.nn.functional.cross_entropy(logits, ids.reshape(-1))


def fit_to_map(generator: ARDiffusion, batches: Callable[[int], tuple[Tensor, Tensor, Tensor]], steps: int,
               lr: float, warmup: int = 0, grad_clip: float = 1.0,
               log: Callable[[int, float], None] | None = None, log_every: int = 100) -> float:
    """Phase 1: ``steps`` Adam steps of :func:`regression_loss`; ``batches(step)`` returns (eps, labels, target).

    Returns the last loss. Adam betas (0.9, 0.95) as in CSD; the LR warms up linearly, then
    follows a cosine to 0 (:func:`onestep.trainer.warmup_cosine`)."""
    opt = make_optimizer(torch.optim.Adam, generator.parameters(), lr=lr, betas=(0.9, 0.95))
    generator.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, steps, lr, warmup, min_ratio=0.0)
        eps, labels, target = batches(step)
        loss = regression_loss(generator, eps, labels, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(generator.parameters(), grad_clip)
        opt.step()
        if log is not None and (step + 1) % log_every == 0:
            log(step + 1, loss.item())
    return loss.item()


# ---- the map fit as a resumable stage on an image teacher ---------------------------------------------
@dataclass(frozen=True)
class MapFitConfig:
    """Phase 1 of the map-start recipe on an image teacher (``onestep dd2 fit-map``)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    grad_clip: float = 1.0
    generator_t: float = 1.0     # the generator's parameterisation (ARDiffusion.generate), kept by stage 2
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 100

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MapFitAblation:
    """Variants of the map fit that the benchmarks measure (lab/dd2-convergence.md, section 6); the defaults are the
    recipe's squared error on the plain generator.

    cells_temperature: > 0: the cross-entropy of the map's token over -|x - c_j|^2 / tau (:func:`regression_loss`).
    noise_stream: eps_i also enters the backbone's input row i (:class:`ARDiffusion`, zero-initialised).
    """

    cells_temperature: float = 0.0
    noise_stream: bool = False

    def changes(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v != getattr(MapFitAblation, k)}


MAP_FIT_PRESETS = {
    "tiny": MapFitConfig(steps=4, batch_size=4, warmup_steps=1, log_every=1, ckpt_every=2),
    # reads the noise at s = 0.5, as the small CSD preset does, so `dd2 train --generator-init` continues it as is
    "small": MapFitConfig(generator_t=0.5),
}




def fit_map(run_dir: str | Path, tune_dir: str | Path, pairs_dir: str | Path, cfg: MapFitConfig,
            info=None, ablation: MapFitAblation | None = None) -> Path:
    """Regress a copy of the stage-1 AR-diffusion model, used as a one-step generator, onto DD1's pairs.

    The pairs (``onestep dd1 pairs``) must come from a teacher with the same codebook and sampling rule as the
    stage-1 run's teacher; the targets are the code vectors of the mapped tokens. Writes ``final/`` as a
    ``dd2-generator`` model directory (``onestep sample --method dd2 --run RUN`` samples it; ``onestep dd2 train
    --generator-init RUN`` starts CSD from it) and ``metrics.json`` with the wall and CPU time. A non-default
    ``ablation`` is recorded in the run's config."""
    from onestep import checkpoint as ckpt
    from onestep.dd1.pairs import load_pairs, read_manifest
    from onestep.dd2.tune import load_ardiffusion
    from onestep.distributed import DistInfo, wrap_ddp
    from onestep.rng import seed_everything
    from onestep.runs import final_dir, ref_to, resolve_ref
    from onestep.teacher.load import load_teacher
    from onestep.trainer import BatchSchedule, LoopConfig, TrainLoop, add_run_time, prepare_run_dir

    info = info or DistInfo()
    seed_everything(cfg.seed)
    model, tune_cfg = load_ardiffusion(tune_dir, info.device)
    teacher_dir = resolve_ref(tune_cfg["teacher_dir"], final_dir(tune_dir))
    teacher, _, _ = load_teacher(teacher_dir, info.device, with_tokenizer=False)
    man = read_manifest(pairs_dir)
    if man.get("sampling") and man["sampling"] != tune_cfg["sampling"]:
        raise ValueError(f"pairs in {pairs_dir} were mapped with sampling {man['sampling']}, stage 1 used "
                         f"{tune_cfg['sampling']}: make pairs with the same rule")
    pairs = load_pairs(pairs_dir)
    cb = teacher.codebook().detach()
    if pairs["ids"].shape[1] != teacher.seq_len or int(pairs["ids"].max()) >= cb.shape[0]:
        raise ValueError(f"pairs in {pairs_dir} do not fit the teacher ({teacher.seq_len} positions, {cb.shape[0]} codes)")
    ablation = ablation or MapFitAblation()
    model.generator_t = cfg.generator_t
    if ablation.noise_stream:
        model = ARDiffusion(model.backbone, model.head, cfg.generator_t, noise_stream=True).to(info.device)
    model.train().requires_grad_(True)
    model_cfg = {**tune_cfg["model"], "generator_t": cfg.generator_t, "noise_stream": ablation.noise_stream}
    config = {"kind": "dd2-generator", "stage": "dd2-fit-map", "map_fit": cfg, "sampling": tune_cfg["sampling"],
              "teacher_dir": ref_to(teacher_dir, run_dir), "tune_dir": ref_to(tune_dir, run_dir),
              "pairs_dir": ref_to(pairs_dir, run_dir), "model": model_cfg}
    if ablation.changes():
        config["ablation"] = ablation.changes()
    run_dir = prepare_run_dir(run_dir, config, info)
    opt = make_optimizer(torch.optim.Adam, model.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    wrapped = wrap_ddp(_Regression(model, cb, ablation.cells_temperature), info)
    loop = TrainLoop(run_dir, LoopConfig(cfg.steps, cfg.batch_size, cfg.seed, cfg.log_every, cfg.ckpt_every),
                     {"generator": model}, {"generator": opt}, {"generator": config}, info, desc="dd2 fit-map")
    sched = BatchSchedule(len(pairs["ids"]), cfg.batch_size, cfg.seed, info)

    def step_fn(step: int) -> dict:
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps, min_ratio=0.0)
        idx = sched.indices(step)
        ids = pairs["ids"][idx].to(info.device)
        loss = wrapped(pairs["eps"][idx].to(info.device), pairs["labels"][idx].to(info.device), cb[ids], ids)
        ok = guarded_step(loss, opt, model.parameters(), cfg.grad_clip)
        return {"regression": loss.item(), "nonfinite": not ok}

    t0, c0 = time.time(), time.process_time()
    loop.run(step_fn)
    final = Path(run_dir) / "final"
    if info.is_main:
        metrics = add_run_time(run_dir, t0, c0)
        ckpt.save_model(final, model.eval(), {**config, "weights": "map-fit generator", "metrics": metrics})
    return final


class _Regression(torch.nn.Module):
    """forward(eps, labels, target) -> L_reg (DDP-wrappable)."""

    def __init__(self, generator: ARDiffusion, codebook: Tensor, cells_temperature: float):
        super().__init__()
        self.generator, self.cells_temperature = generator, cells_temperature
        self.register_buffer("codebook", codebook, persistent=False)

    def forward(self, eps: Tensor, labels: Tensor, target: Tensor, ids: Tensor) -> Tensor:
        return regression_loss(self.generator, eps, labels, target, self.codebook, ids, self.cells_temperature)


def main(argv=None) -> None:
    """Phase 1 from the command line (a resumable run directory, like every onestep stage)."""
    import argparse
    from dataclasses import replace

    p = argparse.ArgumentParser(description="Regress a copy of the stage-1 model, used as the one-step generator, onto "
                                            "DD1's noise-to-token pairs (onestep dd1 pairs, same sampling rule).")
    p.add_argument("--tune", required=True, help="stage-1 run (onestep dd2 tune)")
    p.add_argument("--pairs", required=True, help="DD1 pairs directory (onestep dd1 pairs)")
    p.add_argument("--run-dir", default="runs/dd2-map", help="the run directory (default: runs/dd2-map)")
    p.add_argument("--preset", choices=list(MAP_FIT_PRESETS), default="small", help="preset (default: small)")
    p.add_argument("--steps", type=int, default=None, help="regression steps (default: the preset's)")
    p.add_argument("--generator-t", type=float, default=None, help="noise read at this s (default: the preset's)")
    a = p.parse_args(argv)
    cfg = MAP_FIT_PRESETS[a.preset]
    cfg = replace(cfg, **{k: v for k, v in (("steps", a.steps), ("generator_t", a.generator_t)) if v is not None})
    print(f"map-fit generator written to {fit_map(a.run_dir, a.tune, a.pairs, cfg)}")


if __name__ == "__main__":
    main()
