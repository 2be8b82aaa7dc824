"""DD2 stage 0: a continuous-input teacher (method.md section 3, "Stage 0").

The LlamaGen teacher embeds token ids with a table, but DD2's generator emits vectors that are not
exactly codebook entries, and the teacher must condition on them. Stage 0 replaces ``tok_embeddings``
by an MLP on the code vectors (``tok_mlp``), in two phases:

1. fit: regress mlp(c_j) onto emb(j) for all V codes (MSE; every other weight copied unchanged);
2. fine-tune: the whole model with its ordinary AR loss (next-token cross-entropy) on the training
   tokens, fed as code vectors, until it has lost nothing (held-out NLL within 1% of the original).

The result is the teacher from then on (DD2 stages 1 and 2 use it). The acceptance (:data:`ACCEPT_REL_NLL`): the
adapted teacher's held-out NLL at most 1% above the original's. A run that ends beyond it says so in a warning line
and records ``"accepted": false`` in metrics.json (and its final config); it is still written, as the teacher the
later stages read.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from onestep import checkpoint as ckpt
from onestep import rng
from onestep.data import check_image_shape, load_dataset
from onestep.distributed import DistInfo, wrap_ddp
from onestep.runs import final_dir, recorded_data, ref_to, resolve_ref, stage_data, tokenizer_image_shape
from onestep.teacher.families import family_of
from onestep.teacher.llamagen import GPT, continuous_copy
from onestep.teacher.load import load_teacher
from onestep.teacher.train import cached_tokens, heldout_nll, subset
from onestep.trainer import (BatchSchedule, LoopConfig, RunClock, TrainLoop, add_run_time, guarded_step, make_optimizer,
                             prepare_run_dir, set_lr, warmup_cosine)


@dataclass(frozen=True)
class AdaptConfig:
    fit_steps: int = 2000        # phase 1: MLP regression onto the embedding table (cheap: V rows)
    fit_lr: float = 3e-3
    steps: int = 600             # phase 2: fine-tuning with the AR loss
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 200
    max_items: int | None = None  # use the first N train/test images only (tiny smoke runs)

    def to_dict(self) -> dict:
        return asdict(self)


# stage 0's acceptance: nll_adapted / nll_teacher - 1 at most this (method.md section 3, "Stage 0")
ACCEPT_REL_NLL = 0.01

ADAPT_PRESETS = {"tiny": AdaptConfig(fit_steps=50, steps=4, batch_size=16, log_every=2, ckpt_every=2, max_items=1024),
                 "small": AdaptConfig()}


def acceptance(nll_teacher: float, nll_adapted: float) -> dict:
    """Stage 0's acceptance figures: ``nll_rel_change`` (the adapted teacher's held-out NLL relative to the
    original's, minus 1), ``accepted`` (at most :data:`ACCEPT_REL_NLL`), ``within_1pct`` (the same, under its older
    name) and ``acceptance`` (the criterion in words)."""
    rel = nll_adapted / nll_teacher - 1.0
    ok = bool(rel <= ACCEPT_REL_NLL)
    return {"nll_rel_change": rel, "accepted": ok, "within_1pct": ok,
            "acceptance": f"held-out NLL within {100 * ACCEPT_REL_NLL:g}% of the original teacher's"}


def fit_embedding_mlp(student: GPT, table: torch.Tensor, steps: int, lr: float, seed: int = 0,
                      progress: bool = False) -> float:
    """Phase 1: regress tok_mlp(c_j) onto the table row emb(j); returns the final relative MSE. ``progress``: a bar
    labelled "dd2 adapt: MLP fit" (with its ETA) on stderr."""
    torch.manual_seed(seed)
    cb = student.codebook()
    opt = make_optimizer(torch.optim.Adam, student.tok_mlp.parameters(), lr=lr)
    target = table.detach()
    scale = target.pow(2).mean()
    for i in tqdm(range(steps), desc="dd2 adapt: MLP fit", disable=not progress, dynamic_ncols=True,
                  mininterval=1.0, unit="step"):
        set_lr(opt, warmup_cosine(i, steps, lr, warmup=0, min_ratio=0.01))
        loss = (student.tok_mlp(cb) - target).pow(2).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def adapt_teacher(run_dir: str | Path, teacher_dir: str | Path, cfg: AdaptConfig, info: DistInfo | None = None,
                  data: str | None = None, data_root: str | None = None) -> Path:
    """Stage 0 end to end; writes ``final/`` (kind "teacher", input_embedding "mlp") and ``metrics.json``.

    The fine-tuning data: ``data`` / ``data_root``, by default the teacher run's own (an imported teacher records
    none: then they must be given, e.g. ``data="folder"`` with class sub-folders, resized to the tokenizer's size).
    Images of another channel count or size than the tokenizer's are refused before anything is written."""
    info = info or DistInfo()
    rng.seed_everything(cfg.seed)
    teacher, tconf, tokenizer = load_teacher(teacher_dir, info.device)
    if not family_of(tconf).needs_stage0:
        raise ValueError(f"{teacher_dir} is a {tconf['family']!r} teacher: it reads code vectors natively and needs no "
                         "stage 0; run `onestep dd2 tune --teacher` on it directly")
    data, data_root = stage_data(data, data_root, recorded_data(teacher_dir), fallback=None)
    if data is None:
        raise ValueError(f"{teacher_dir} records no data set (an imported teacher): stage 0 fine-tunes the teacher "
                         "with its AR loss on images, so pass --data (fashion-mnist, mnist, or folder with "
                         "--data-root DIR of class sub-folders)")
    shape = tokenizer_image_shape(tokenizer)
    size = shape[1] if data == "folder" else None
    train = load_dataset(data, "train", root=data_root, image_size=size)
    check_image_shape(train, shape, f"the teacher {teacher_dir}'s tokenizer")
    train = subset(train, cfg.max_items)
    test = subset(load_dataset(data, "test", root=data_root, image_size=size), cfg.max_items)
    config = {"kind": "teacher", "family": "llamagen", "stage": "dd2-adapt", "adapt": cfg,
              "teacher_dir": ref_to(teacher_dir, run_dir), "data": data, "data_root": data_root}
    t_start, c_start = time.time(), time.process_time()
    student = continuous_copy(teacher)
    config["model"] = student.args.to_dict()
    # the adapted teacher refers to the same tokenizer as the original one
    config["tokenizer_dir"] = ref_to(resolve_ref(tconf["tokenizer_dir"], final_dir(teacher_dir)), run_dir)
    run_dir = prepare_run_dir(run_dir, config, info)
    ids = cached_tokens(run_dir, tokenizer, train, "train", info.device)
    ids_test = cached_tokens(run_dir, tokenizer, test, "test", info.device)
    metrics_path = Path(run_dir) / "metrics.json"
    metrics = ckpt.read_json(metrics_path) if metrics_path.exists() else {}
    if "nll_teacher" not in metrics:
        bar = info.is_main
        metrics["nll_teacher"] = heldout_nll(teacher, ids_test, test.labels,
                                             progress="dd2 adapt: held-out NLL, original teacher" if bar else None)
        metrics["fit_rel_mse"] = fit_embedding_mlp(student, teacher.tok_embeddings.weight, cfg.fit_steps, cfg.fit_lr,
                                                   cfg.seed, progress=bar)
        metrics["nll_after_fit"] = heldout_nll(student, ids_test, test.labels,
                                               progress="dd2 adapt: held-out NLL, after the MLP fit" if bar else None)
        if info.is_main:
            ckpt.write_json(metrics_path, metrics)
            metrics = add_run_time(run_dir, t_start, c_start, phase="fit")
            ckpt.save_model(Path(run_dir) / "fitted", student, config)
    else:
        ckpt.load_model_weights(Path(run_dir) / "fitted", student)

    opt = make_optimizer(torch.optim.AdamW, student.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ddp = wrap_ddp(student, info)
    loop = TrainLoop(run_dir, LoopConfig(cfg.steps, cfg.batch_size, cfg.seed, cfg.log_every, cfg.ckpt_every),
                     {"model": student}, {"model": opt}, {"model": config}, info, desc="dd2 adapt")
    sched = BatchSchedule(len(ids), cfg.batch_size, cfg.seed, info)
    labels = train.labels

    def step_fn(step: int) -> dict:
        student.train()
        set_lr(opt, warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps))
        idx = sched.indices(step)
        x, y = ids[idx].to(info.device), labels[idx].to(info.device)
        y = student.drop_labels(y, loop.generator)
        logits = ddp(student.ids_to_codes(x), y)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x.reshape(-1))
        ok = guarded_step(loss, opt, student.parameters(), cfg.grad_clip)
        return {"loss": loss.item(), "nonfinite": not ok}

    clock = RunClock(run_dir, phase="finetune")
    loop.run(step_fn, clock=clock)
    final = Path(run_dir) / "final"
    if info.is_main:
        if loop.steps_run > 0 or "nll_adapted" not in metrics:  # a finished run re-run keeps its measurement
            metrics["nll_adapted"] = heldout_nll(student, ids_test, test.labels,
                                                 progress="dd2 adapt: held-out NLL, adapted teacher")
        metrics.update(acceptance(metrics["nll_teacher"], metrics["nll_adapted"]))
        if not metrics["accepted"]:
            print(f"[dd2 adapt] warning: not accepted: the adapted teacher's held-out NLL {metrics['nll_adapted']:.4f} "
                  f"is {100 * metrics['nll_rel_change']:.2f}% above the original teacher's {metrics['nll_teacher']:.4f}, "
                  f"beyond stage 0's acceptance ({metrics['acceptance']}); metrics.json records \"accepted\": false; "
                  f"more fine-tuning (--steps) may close the gap", file=sys.stderr, flush=True)
        ckpt.write_json(metrics_path, metrics)
        config["metrics"] = metrics = clock.add()
        ckpt.save_model(final, student, config)
    return final
