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
from pathlib import Path

import torch

from onestep import checkpoint as ckpt
from onestep.dd2.csd import DD2, CSDConfig, CSDSchedule
from onestep.dd2.tune import load_ardiffusion
from onestep.distributed import DistInfo, wrap_ddp
from onestep.rng import seed_everything
from onestep.runs import final_dir, ref_to, resolve_ref
from onestep.teacher.load import load_teacher
from onestep.teacher.sampling import SamplingConfig
from onestep.trainer import LoopConfig, RunClock, TrainLoop, prepare_run_dir

TRAIN_PRESETS = {
    "tiny": CSDConfig(steps=2, batch_size=4, guidance_steps=1, m_noise=2, warmup_steps=1, log_every=1, ckpt_every=1),
    # the bench's CPU budget (250 generator steps at batch 32). Its deviations from the paper, each measured
    # (lab/results/): a short LR warm-up (20 steps, where the paper warms up over about two thirds of training) and
    # a guidance LR 5x the generator's (the paper's: 2x), for two time-scales in few steps (with equal LRs CSD drifts
    # away from the teacher, dd2-first-position.md); the head reads the noise at s = 0.5 (at s = 1 the stage-1 head
    # returns each position's mean whatever eps_i is); the prefix conditions read the prefix snapped to the codes
    # (classifier FID 300 against 375 after 250 steps, dd2-image-csd-codes.md)
    "small": CSDConfig(steps=250, batch_size=32, lr=2e-4, guidance_lr=1e-3, guidance_steps=5, m_noise=2,
                       warmup_steps=20, generator_t=0.5, condition_on_codes=True, log_every=10, ckpt_every=50),
    # the paper's schedule: the generator's LR warmed up linearly from 1e-6 over two thirds of the generator steps,
    # the guidance LR twice the generator's, K = 5, at 8000 generator steps (32x the bench's budget; the lab's
    # plateau run, lab/dd2_plateau/run.py); the noise at s = 0.5 and the prefix snapped to codes as in `small`
    "paper": CSDConfig(steps=8000, batch_size=32, lr=2e-4, guidance_lr=4e-4, guidance_steps=5, m_noise=2,
                       warmup_steps=5333, generator_t=0.5, condition_on_codes=True, log_every=50, ckpt_every=250),
}


def train(run_dir: str | Path, tune_dir: str | Path, cfg: CSDConfig, info: DistInfo | None = None,
          save_at: tuple = (), on_checkpoint=None, generator_init: str | Path | None = None,
          wrapper=DD2) -> Path:
    """Stage 2 end to end from a finished stage-1 run; returns ``RUN/final`` (the EMA generator).

    ``generator_init``: a map-fit run (the map-start variant, ``lab/mapstart.py`` in the checkout) whose generator replaces stage 1's as CSD's starting point; psi still starts
    from stage 1. Its parameterisation (``generator_t``) is the map fit's.

    ``wrapper``: what builds the generator/guidance wrapper from (generator, guidance, teacher, sampling, cfg):
    :class:`~onestep.dd2.csd.DD2` (the paper's loss), or a study's variant of it (``lab/csd_variants.py``), whose
    ``record`` goes into the run's config.

    ``save_at``: extra checkpoint steps; ``on_checkpoint(step)`` is called after each checkpoint (the pipeline
    branches the alignment run off the plain run's checkpoint at ``align_at`` this way)."""
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
    dd2 = wrapper(generator, guidance, teacher, sampling, cfg)  # sets generator_t
    model_cfg = {**tune_cfg["model"], "head": generator.head.config(), "generator_t": cfg.generator_t,
                 "noise_stream": generator.noise_stream is not None}
    config = {"kind": "dd2-generator", "stage": "dd2-train", "csd": cfg, "sampling": tune_cfg["sampling"],
              "teacher_dir": ref_to(teacher_dir, run_dir), "tune_dir": ref_to(tune_dir, run_dir),
              "model": model_cfg, "recipe": "gts" if generator_init is None else "map"}
    if generator_init is not None:
        config["generator_init"] = ref_to(generator_init, run_dir)
    config.update(dd2.record)
    # psi keeps stage 1's parameterisation (the head gain and generator_t are the generator's): its checkpoint
    # directories record its own head, so that they load as what they hold
    guidance_config = {**config, "model": {**tune_cfg["model"], "head": guidance.head.config()},
                       "weights": "guidance network"}
    run_dir = prepare_run_dir(run_dir, config, info)
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

    clock = RunClock(run_dir)
    loop.run(step_fn, on_checkpoint, clock=clock)
    final = Path(run_dir) / "final"
    if info.is_main:
        metrics = clock.add(nonfinite_steps=loop.nonfinite_total)
        ckpt.save_model(Path(run_dir) / "raw", generator, {**config, "weights": "raw generator"})
        ckpt.save_model(final, sched.ema, {**config, "weights": "EMA generator", "metrics": metrics})
    return final
