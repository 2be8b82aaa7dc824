"""DD1 as two resumable stages (method.md section 2): pairs (2.1) and generator training (2.3).

- :func:`make_pairs` maps N noise sequences to tokens with the teacher's flow map and writes the shards
  of :mod:`onestep.dd1.pairs` (resumable, seeds and pair-generation wall time in ``manifest.json``).
- :func:`train_dd1` trains the DD1 generator (:mod:`onestep.dd1.model`, initialised from the teacher)
  with cross-entropy on the map's tokens at X_1 and intermediate trajectory points
  (:mod:`onestep.dd1.train`) through the shared :class:`onestep.trainer.TrainLoop` (checkpoints, resume,
  ``log.jsonl``, NaN guard, DDP), then writes ``final/`` (kind "dd1") and ``metrics.json``.

Cost: the pairs manifest records ``wall_s`` (sum of the shards' generation times, so a
resumed run counts only the work that made the kept shards); the training run's ``metrics.json``
records ``train_wall_time_s`` (sum of the optimisation steps' wall times, saved with each checkpoint,
so steps redone after a crash count once), copies ``pairs_wall_time_s`` and gives their sum
``total_wall_time_s``, with the thread count and device the times were measured with. Process CPU
times (``*_cpu_time_s``) are recorded too: on a shared machine they measure the work, wall time does not.

Presets (:data:`DD1_PRESETS`): "tiny" runs in seconds on the tiny test teacher; "small" is the
benchmark's run on the shipped Fashion-MNIST teacher (49 positions, 512 codes): see its comment.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from onestep import checkpoint as ckpt
from onestep.dd1.load import load_dd1, new_generator
from onestep.dd1.pairs import MANIFEST, finalize_manifest, generate_pairs, load_pairs, read_manifest
from onestep.dd1.sampling import default_split, one_step, two_step
from onestep.dd1.train import TrajectoryConfig, TrajectorySampler, dd1_loss
from onestep.distributed import DistInfo, barrier, wrap_ddp
from onestep.flow_map import ODEConfig
from onestep.rng import seed_everything
from onestep.runs import ref_to
from onestep.teacher.load import load_teacher
from onestep.teacher.sampling import SamplingConfig
from onestep.trainer import (BatchSchedule, LoopConfig, TrainLoop, guarded_step, make_optimizer, prepare_run_dir,
                             set_lr, warmup_cosine)

# load_dd1 is re-exported: the stage that writes a DD1 run also reads it
__all__ = ["DD1Config", "DD1_PRESETS", "make_pairs", "train_dd1", "load_dd1", "check_pairs"]


@dataclass(frozen=True)
class DD1Config:
    """Everything a DD1 run needs; the pairs fields are recorded in the pairs manifest, the rest in the
    training run's config. Documented choices (the DD1 paper publishes neither loss nor schedule):
    cross-entropy on the map's tokens (the released generators keep the teacher's logits head), half of
    each batch at X_1 and half at a uniformly drawn AR-step boundary (``p_all_noise``), loss on the
    noise positions only (``loss_on``), AdamW (0.9, 0.95), linear warm-up then cosine decay."""

    # pairs (method.md 2.1)
    n_pairs: int = 12_000
    shard_size: int = 1024
    ode_steps: int = 200          # AB2 steps of the flow-map ODE (flow_map.ODEConfig; 200 = 1.1% of sequences off)
    map_batch: int = 256
    eps_dtype: str = "float16"
    # training (method.md 2.3)
    steps: int = 900
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    p_all_noise: float = 0.5      # share of X_1 examples (the one-step input)
    clean_counts: tuple[int, ...] | None = None  # intermediate points (None: every AR-step boundary)
    loss_on: str = "noise"
    input_mode: str = "table"
    n_val: int = 256              # pairs held out of training (the last ones) for the accuracy check
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 100

    def __post_init__(self):
        if self.n_pairs < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("n_pairs, steps and batch_size must be >= 1")
        if self.eps_dtype not in ("float16", "float32"):
            raise ValueError("eps_dtype must be 'float16' or 'float32'")

    def to_dict(self) -> dict:
        return asdict(self)

    def ode(self):
        return ODEConfig(n_steps=self.ode_steps)

    def trajectory(self):
        return TrajectoryConfig(self.p_all_noise, self.clean_counts, self.loss_on)


DD1_PRESETS: dict[str, DD1Config] = {
    # unit tests / smoke runs on the tiny test teacher (seconds)
    "tiny": DD1Config(n_pairs=256, shard_size=128, ode_steps=24, map_batch=128, steps=20, batch_size=16, lr=1e-3,
                      warmup_steps=2, n_val=32, log_every=5, ckpt_every=10),
    # the benchmark run on the shipped Fashion-MNIST teacher, sized for ~30 min on ONE CPU thread:
    # 12k pairs (~45 s per 1k on one thread: ~9 min) + 900 steps of batch 64 (~1.4 s each: ~21 min),
    # i.e. ~4.8 epochs over the pairs. More pairs help against memorising the map, more steps help fit
    # it; at this budget both are scarce, and the split puts ~2/3 of the time into training.
    "small": DD1Config(),
}


# ---- pairs -------------------------------------------------------------------------------------------
def make_pairs(out_dir: str | Path, teacher_dir: str | Path, n: int | None = None, seed: int = 0,
               sampling_cfg: SamplingConfig | None = None, device: str | torch.device = "cpu",
               cfg: DD1Config | None = None, info: DistInfo | None = None, progress: bool = True) -> Path:
    """DD1 pairs (method.md 2.1): ``n`` noise sequences mapped to tokens by the teacher's flow map.

    Writes ``out_dir/shard_*.npz`` and ``manifest.json`` (seeds, sampling rule, ODE, relative teacher
    path, pair-generation wall time, threads). Re-running resumes: finished shards are kept. Changing
    ``n`` extends or shrinks the set (shards whose size changes are regenerated; every shard depends only
    on ``seed + index``); any other change raises. ``sampling_cfg`` defaults to CFG 2.0 (the teacher's
    sampling). Under torchrun shards are split over ranks. Returns ``out_dir``.
    """
    cfg = cfg or DD1_PRESETS["small"]
    n = cfg.n_pairs if n is None else n
    if n < 1:
        raise ValueError(f"the number of pairs must be >= 1, got {n}")
    info = info or DistInfo(device=torch.device(device))
    sampling_cfg = sampling_cfg or SamplingConfig(cfg_scale=2.0)
    teacher, _, _ = load_teacher(teacher_dir, info.device, with_tokenizer=False)
    out = Path(out_dir)
    if info.is_main:
        ckpt.lock_run_dir(out)  # one writer: another process making these pairs is refused, naming it
    meta = {"teacher_dir": ref_to(teacher_dir, out)}
    man = generate_pairs(teacher, n, out, shard_size=cfg.shard_size, seed=seed, sampling_cfg=sampling_cfg,
                         ode=cfg.ode(), eps_dtype=cfg.eps_dtype, map_batch=cfg.map_batch, device=info.device,
                         rank=info.rank, world_size=info.world_size, progress=progress, finalize=False, meta=meta)
    barrier(info)
    if info.is_main:
        man = finalize_manifest(out)
        man["threads"] = torch.get_num_threads()
        man["device"] = str(info.device)
        man["world_size"] = info.world_size
        ckpt.write_json(out / "manifest.json", man)
        print(f"[dd1 pairs] {man['n']} pairs in {out}: {man['wall_s']:.1f} s of generation "
              f"({man['wall_s_per_1k']:.1f} s per 1k, {man['threads']} threads); snap moved {man['snap_moved']:.2e}",
              flush=True)
    barrier(info)
    return out


def check_pairs(pairs_dir: str | Path, teacher_dir: str | Path, teacher=None) -> dict:
    """The pairs' manifest, after checking they are complete and were made with this teacher."""
    pairs_dir = Path(pairs_dir)
    if not (pairs_dir / MANIFEST).exists():
        raise ckpt.CheckpointError(f"{pairs_dir} holds no DD1 pairs (no {MANIFEST}); run `onestep dd1 pairs` first")
    man = read_manifest(pairs_dir)
    if not man.get("complete"):
        raise ckpt.CheckpointError(f"the pairs in {pairs_dir} are incomplete; re-run `onestep dd1 pairs` to finish them")
    ref = man.get("teacher_dir")
    if ref is not None:
        made_with = (pairs_dir / ref).resolve()
        if made_with != Path(teacher_dir).resolve():
            raise ValueError(f"the pairs in {pairs_dir} were made with the teacher {made_with}, not {Path(teacher_dir).resolve()}")
    if teacher is not None:
        t = man["teacher"]
        got = {"seq_len": teacher.seq_len, "vocab_size": teacher.vocab_size, "code_dim": teacher.code_dim,
               "num_classes": teacher.num_classes}
        if any(t[k] != v for k, v in got.items()):
            raise ValueError(f"the pairs in {pairs_dir} do not fit the teacher: {t} vs {got}")
    return man


# ---- training ------------------------------------------------------------------------------------------
@torch.no_grad()
def _val_accuracy(model, val: dict, device, batch: int = 128) -> dict:
    """Held-out token accuracy of 1-step and 2-step sampling against the map's tokens (same noise)."""

    model.eval()
    one, two = [], []
    for a in range(0, len(val["ids"]), batch):
        e, lab = val["eps"][a:a + batch].to(device), val["labels"][a:a + batch].to(device)
        one.append(one_step(model, e, lab).cpu())
        two.append(two_step(model, e, lab).cpu())
    one, two, ids = torch.cat(one), torch.cat(two), val["ids"]
    s = default_split(ids.shape[1], model.ar_steps())
    return {"val_acc_1step": (one == ids).float().mean().item(), "val_acc_2step": (two == ids).float().mean().item(),
            "val_acc_1step_first_s": (one[:, :s] == ids[:, :s]).float().mean().item(),
            "val_seq_exact_1step": (one == ids).all(1).float().mean().item(), "n_val": len(ids)}


def train_dd1(run_dir: str | Path, pairs_dir: str | Path, teacher_dir: str | Path, cfg: DD1Config | None = None,
              info: DistInfo | None = None, sampling_cfg: SamplingConfig | None = None) -> Path:
    """Train (or resume) the DD1 generator on the pairs (method.md 2.3); returns ``run_dir/final``.

    The generator starts from the teacher's weights (:meth:`DD1Generator.from_teacher`). Batches come
    from :class:`onestep.trainer.BatchSchedule` over the pairs minus the last ``cfg.n_val`` (held out),
    trajectory points from the loop's saved generator, so a resumed run continues exactly. ``final/``
    holds ``model.safetensors`` and ``config.json`` (kind "dd1", relative ``teacher_dir`` and
    ``pairs_dir``, the pairs manifest path, the sampling rule, the ODE, the model and training config);
    ``metrics.json`` the held-out accuracies and the wall times (module docstring). ``sampling_cfg``
    must equal the pairs' rule (default: taken from the pairs).
    """
    cfg = cfg or DD1_PRESETS["small"]
    info = info or DistInfo()
    seed_everything(cfg.seed)
    teacher, tconf, _ = load_teacher(teacher_dir, info.device, with_tokenizer=False)
    man = check_pairs(pairs_dir, teacher_dir, teacher)
    pair_sampling = SamplingConfig(**man["sampling"])
    if sampling_cfg is not None and sampling_cfg != pair_sampling:
        raise ValueError(f"sampling rule {sampling_cfg.to_dict()} differs from the one the pairs were made with "
                         f"({pair_sampling.to_dict()}); the generator distils that rule's map")
    data = load_pairs(pairs_dir)
    N = len(data["ids"])
    if N - cfg.n_val < cfg.batch_size:
        raise ValueError(f"{N} pairs leave {N - cfg.n_val} for training after holding out {cfg.n_val}: "
                         f"fewer than one batch of {cfg.batch_size}")
    train = {k: v[: N - cfg.n_val] for k, v in data.items()}
    val = {k: v[N - cfg.n_val:] for k, v in data.items()}

    model = new_generator(teacher, tconf, cfg.input_mode)
    del teacher
    config = {"kind": "dd1", "method": "DD1 (method.md section 2)", "train": cfg,
              "teacher_dir": ref_to(teacher_dir, run_dir), "pairs_dir": ref_to(pairs_dir, run_dir),
              "pairs_manifest": ref_to(Path(pairs_dir) / MANIFEST, run_dir),
              "pairs": {"n": man["n"], "seed": man["seed"], "wall_s": man.get("wall_s")},
              "sampling": pair_sampling.to_dict(), "ode": man["ode"], "model": model.config(),
              "data": tconf.get("data")}
    run_dir = prepare_run_dir(run_dir, config, info)
    opt = make_optimizer(torch.optim.AdamW, model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    ddp = wrap_ddp(model, info)
    extra = {"train_wall_s": 0.0, "train_cpu_s": 0.0}
    loop = TrainLoop(run_dir, LoopConfig(cfg.steps, cfg.batch_size, cfg.seed, cfg.log_every, cfg.ckpt_every),
                     {"model": model}, {"model": opt}, {"model": config}, info, desc="dd1 train", extra_state=extra)
    sched = BatchSchedule(len(train["ids"]), cfg.batch_size, cfg.seed, info)
    traj = TrajectorySampler(cfg.trajectory(), model.seq_len, model.ar_steps())

    def step_fn(step: int) -> dict:
        t0, c0 = time.time(), time.process_time()
        model.train()
        set_lr(opt, warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio))
        idx = sched.indices(step)
        batch = {k: train[k][idx].to(info.device) for k in ("eps", "ids", "labels")}
        batch["n_clean"] = traj(len(idx), loop.generator, info.device)
        loss, logs = dd1_loss(ddp, batch, cfg.loss_on)
        ok = guarded_step(loss, opt, model.parameters(), cfg.grad_clip)
        logs["nonfinite"] = float(not ok)
        logs["lr"] = opt.param_groups[0]["lr"]
        extra["train_wall_s"] += time.time() - t0
        extra["train_cpu_s"] += time.process_time() - c0
        return logs

    logs = loop.run(step_fn)
    final = Path(run_dir) / "final"
    if info.is_main:
        metrics_path = Path(run_dir) / "metrics.json"
        if not logs and metrics_path.exists():  # a finished run re-run: nothing trained, keep its last logs
            logs = ckpt.read_json(metrics_path).get("final_logs", {})
        metrics = {"steps": cfg.steps, "final_logs": logs, **_val_accuracy(model, val, info.device)}
        pairs_s = float(man.get("wall_s") or 0.0)
        metrics.update({"train_wall_time_s": round(extra["train_wall_s"], 2), "pairs_wall_time_s": round(pairs_s, 2),
                        "total_wall_time_s": round(extra["train_wall_s"] + pairs_s, 2),
                        "train_cpu_time_s": round(extra["train_cpu_s"], 2), "pairs_cpu_time_s": man.get("cpu_s"),
                        # the stages' common schema (trainer.add_run_time): the run's own training time; DD1 counts
                        # the steps that made the kept checkpoints (a crash's lost steps are not counted)
                        "wall_time_s": round(extra["train_wall_s"], 2), "cpu_time_s": round(extra["train_cpu_s"], 2),
                        "threads": torch.get_num_threads(),
                        "pairs_threads": man.get("threads"), "train_threads": torch.get_num_threads(),
                        "device": str(info.device), "world_size": info.world_size,
                        "nonfinite_steps": loop.nonfinite_total})
        ckpt.write_json(metrics_path, metrics)
        ckpt.save_model(final, model, {**config, "metrics": metrics})
        print(f"[dd1 train] {final}: held-out 1-step token accuracy {metrics['val_acc_1step']:.3f}, 2-step "
              f"{metrics['val_acc_2step']:.3f}; wall time pairs {pairs_s:.0f} s + train {extra['train_wall_s']:.0f} s",
              flush=True)
    barrier(info)
    return final
