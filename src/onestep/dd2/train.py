"""DD2 stage 2: conditional score distillation on an image teacher (method.md section 3, "Stages" 2-3).

Generator theta and guidance psi are both initialised from the stage-1 AR-diffusion model; the teacher
is the stage-0 continuous-input teacher that stage 1 was tuned on, with the SAME sampling rule (read
from the stage-1 run). One outer step = K guidance updates + one generator update
(:class:`~onestep.dd2.csd.CSDSchedule`), inside the shared resumable :class:`~onestep.trainer.TrainLoop`
(checkpoints hold generator, guidance, EMA and both optimisers). Performance alignment is the
``align_at`` / ``align_steps`` option of :class:`~onestep.dd2.csd.CSDConfig`.

Outputs: ``final/`` = the EMA generator (what ``onestep sample --method dd2`` uses), ``raw/`` = the
generator itself, ``metrics.json`` with the wall time.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from onestep import checkpoint as ckpt
from onestep.dd2.csd import DD2, RETIRED_CSD_FIELDS, CSDAblation, CSDConfig, CSDSchedule
from onestep.distributed import DistInfo, wrap_ddp
from onestep.rng import seed_everything
from onestep.trainer import LoopConfig, TrainLoop, add_run_time, prepare_run_dir

TRAIN_PRESETS = {
    "tiny": CSDConfig(steps=2, batch_size=4, guidance_steps=1, m_noise=2, warmup_steps=1, log_every=1, ckpt_every=1),
    # sized for ~25 min on one CPU thread: few outer steps, so higher LRs than the paper's GPU runs, with the
    # generator 5x slower than the guidance network and K = 5 (two time-scales: with equal LRs CSD drifts away
    # from the teacher, benchmarks/results/dd2-first-position.md), and the head reading the noise at s = 0.5
    # (generator_t: at s = 1 the stage-1 head returns each position's mean whatever eps_i is); the prefix
    # conditions read the generated prefix snapped to the codes (condition_on_codes: classifier FID 300 against 375
    # after 250 steps, 432-436 against 476-480 after 80 steps on two seeds, benchmarks/results/dd2-image-csd-codes.md)
    "small": CSDConfig(steps=250, batch_size=32, lr=2e-4, guidance_lr=1e-3, guidance_steps=5, m_noise=2,
                       warmup_steps=20, generator_t=0.5, condition_on_codes=True, log_every=10, ckpt_every=50),
}


def train(run_dir: str | Path, tune_dir: str | Path, cfg: CSDConfig, info: DistInfo | None = None,
          save_at: tuple = (), on_checkpoint=None, generator_init: str | Path | None = None,
          ablation: CSDAblation | None = None) -> Path:
    """Stage 2 end to end from a finished stage-1 run; returns ``RUN/final`` (the EMA generator).

    ``generator_init``: a map-fit run (``onestep dd2 fit-map``, the map-start recipe of
    :mod:`onestep.dd2.mapstart`) whose generator replaces stage 1's as CSD's starting point; psi still starts
    from stage 1. Its parameterisation (``generator_t``) is the map fit's.

    ``ablation``: a variant of CSD that a benchmark measures (:class:`~onestep.dd2.csd.CSDAblation`; None = the
    paper's loss), recorded in the run's config when it is not the default.

    ``save_at``: extra checkpoint steps; ``on_checkpoint(step)`` is called after each checkpoint (the pipeline
    branches the alignment run off the plain run's checkpoint at ``align_at`` this way)."""
    from onestep.dd2.tune import load_ardiffusion
    from onestep.runs import final_dir, load_teacher, ref_to, resolve_ref
    from onestep.teacher.sampling import SamplingConfig

    info = info or DistInfo()
    seed_everything(cfg.seed)
    for name, n in (("batch size", cfg.batch_size), ("guidance batch size", cfg.guidance_batch)):
        if n % info.world_size:
            raise ValueError(f"{name} {n} is not divisible by world size {info.world_size}")
    init, tune_cfg = load_ardiffusion(tune_dir, info.device)
    teacher_dir = resolve_ref(tune_cfg["teacher_dir"], final_dir(tune_dir))
    teacher, _, _ = load_teacher(teacher_dir, info.device, with_tokenizer=False)
    sampling = SamplingConfig(**tune_cfg["sampling"])
    guidance = copy.deepcopy(init).train()
    if generator_init is None:
        generator = copy.deepcopy(init).train()
    else:
        fitted, fit_cfg = load_ardiffusion(generator_init, info.device)
        if fit_cfg.get("stage") != "dd2-fit-map" or \
                resolve_ref(fit_cfg["tune_dir"], final_dir(generator_init)).resolve() != Path(tune_dir).resolve():
            raise ValueError(f"{generator_init} is not a map fit of the stage-1 run {tune_dir}")
        if fitted.generator_t != cfg.generator_t:
            raise ValueError(f"the map fit reads the noise at generator_t {fitted.generator_t}, the CSD config at "
                             f"{cfg.generator_t}: pass --generator-t {fitted.generator_t}")
        generator = fitted.train()
    dd2 = DD2(generator, guidance, teacher, sampling, cfg, ablation)  # applies the head gain and generator_t
    model_cfg = {**tune_cfg["model"], "head": generator.head.config(), "generator_t": cfg.generator_t,
                 "noise_stream": generator.noise_stream is not None}
    config = {"kind": "dd2-generator", "stage": "dd2-train", "csd": cfg, "sampling": tune_cfg["sampling"],
              "teacher_dir": ref_to(teacher_dir, run_dir), "tune_dir": ref_to(tune_dir, run_dir),
              "model": model_cfg, "recipe": "gts" if generator_init is None else "map"}
    if generator_init is not None:
        config["generator_init"] = ref_to(generator_init, run_dir)
    if dd2.ablation.changes():
        config["ablation"] = dd2.ablation.changes()
    # psi keeps stage 1's parameterisation (the head gain and generator_t are the generator's): its checkpoint
    # directories record its own head, so that they load as what they hold
    guidance_config = {**config, "model": {**tune_cfg["model"], "head": guidance.head.config()},
                       "weights": "guidance network"}
    run_dir = prepare_run_dir(run_dir, config, info, retired=RETIRED_CSD_FIELDS)
    generator.requires_grad_(True)
    guidance.requires_grad_(True)
    wrapped = wrap_ddp(dd2, info, find_unused_parameters=True)
    sched = CSDSchedule(dd2, wrapped)
    loop = TrainLoop(run_dir, LoopConfig(cfg.total_steps, cfg.batch_size, cfg.seed, cfg.log_every, cfg.ckpt_every,
                                          save_at=tuple(save_at)),
                     {"generator": generator, "guidance": guidance, "ema": sched.ema},
                     {"generator": sched.opt_gen, "guidance": sched.opt_guid},
                     {"generator": config, "guidance": guidance_config, "ema": config}, info, desc="dd2 train")

    def sample_labels(n: int):  # this rank's share of a turn's global batch of n sequences
        return torch.randint(teacher.num_classes, (n // info.world_size,), generator=loop.generator).to(info.device)

    def step_fn(step: int) -> dict:
        logs = sched.step(step, sample_labels, loop.generator)
        return {k: v for k, v in logs.items() if k != "phase"} | {"align": logs["phase"] == "align"}

    t0, c0 = time.time(), time.process_time()
    loop.run(step_fn, on_checkpoint)
    final = Path(run_dir) / "final"
    if info.is_main:
        metrics = add_run_time(run_dir, t0, c0, nonfinite_steps=loop.nonfinite_total)
        ckpt.save_model(Path(run_dir) / "raw", generator, {**config, "weights": "raw generator"})
        ckpt.save_model(final, sched.ema, {**config, "weights": "EMA generator", "metrics": metrics})
    return final
