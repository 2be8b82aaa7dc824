"""The ``onestep`` command line: train a tokenizer and a teacher, distil them (DD1, DD2), sample, evaluate.

Every command that trains writes a run directory (config.json, log.jsonl, checkpoints/, final/) and
resumes from it when re-run with the same arguments. ``--device`` and ``--seed`` are flags everywhere;
multi-process training: ``torchrun --nproc_per_node N -m onestep train-teacher ...``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onestep.argtypes import (OnestepArgumentParser, check_labels, conti_from, device, label_list, nonneg_float,
                              nonneg_int, positive_float, positive_int, unit_interval)


def add_common(p: argparse.ArgumentParser, seed: int = 0) -> None:
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--seed", type=int, default=seed, help=f"random seed (default: {seed})")


def add_data(p: argparse.ArgumentParser, recorded: str | None = None) -> None:
    """``--data`` and ``--data-root``. With ``recorded`` (which run's record, in words) they default to the data set
    and data root recorded upstream (the command resolves them), else to Fashion-MNIST."""
    default = recorded or "fashion-mnist, from Debian's dataset-fashion-mnist"
    p.add_argument("--data", default=None if recorded else "fashion-mnist",
                   choices=["fashion-mnist", "mnist", "folder"], help=f"data set (default: {default})")
    p.add_argument("--data-root", default=None, help="override the data location (required for --data folder)")


def add_preset(p: argparse.ArgumentParser, presets, default: str, what: str) -> None:
    """``--preset`` with the names of ``presets`` as its choices."""
    p.add_argument("--preset", default=default, choices=list(presets), help=f"{what} preset (default: {default})")


def add_method(p: argparse.ArgumentParser) -> None:
    """Which sampler a run directory gives (``onestep sample`` and ``onestep eval``)."""
    p.add_argument("--method", default="teacher", choices=["teacher", "teacher-nocache", "dd1", "dd2"],
                   help="teacher (KV cache), teacher-nocache, dd1 or dd2 (default: teacher)")
    p.add_argument("--steps", type=positive_int, default=1,
                   help="dd1 / dd2: number of sampling steps (dd2: 1 step + the teacher re-samples the last k-1 AR "
                        "steps, paper Alg. 4; dd1: 1 = one step, 2 = two-step, K >= 3 = teacher-involved with K "
                        "sequential calls)")
    p.add_argument("--continuous", action="store_true",
                   help="dd2: decode the generator's continuous vectors instead of quantising to the nearest code")
    p.add_argument("--conti-from", type=conti_from, default=None, metavar="S",
                   help="dd1, released generators (onestep import-dd1): their output rule, the argmax codes before "
                        "position S and the continuous head's tokens from S on, decoded as vectors (default: the "
                        "run's recorded rule, 80 for an imported LlamaGen-DD; trained runs: argmax codes everywhere; "
                        "-1 = argmax codes everywhere)")


def add_sampling(p: argparse.ArgumentParser, cfg_scale: float = 2.0) -> None:
    g = p.add_argument_group("teacher sampling rule (also defines p for DD1's map and DD2's teacher score)")
    g.add_argument("--cfg-scale", type=nonneg_float, default=cfg_scale,
                   help=f"classifier-free guidance (default {cfg_scale}; 1 = off)")
    g.add_argument("--cfg-schedule", choices=["constant", "linear"], default="constant",
                   help="guidance over AR steps: constant (LlamaGen), or linear from 1 at the first step to the scale "
                        "at the last (VAR's ramp; VAR's cfg c is --cfg-scale 1+c)")
    g.add_argument("--temperature", type=positive_float, default=1.0)
    g.add_argument("--top-k", type=nonneg_int, default=0, help="keep the k most likely codes (0 = all)")
    g.add_argument("--top-p", type=unit_interval, default=1.0, help="nucleus mass (1 = off)")


def _torch_threads(args) -> None:
    import os

    import torch

    if os.environ.get("OMP_NUM_THREADS") is None and getattr(args, "device", "cpu") == "cpu":
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 16)))


# ---- tokenizer / teacher -------------------------------------------------------------------------------
def cmd_train_tokenizer(args) -> None:
    from onestep.distributed import cleanup, setup
    from onestep.tokenizer.train import VQ_TRAIN_PRESETS, train_tokenizer

    cfg = VQ_TRAIN_PRESETS[args.preset]
    cfg = _override(cfg, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    info = setup(args.device)
    final = train_tokenizer(args.run_dir, cfg, data=args.data, data_root=args.data_root, info=info)
    if info.is_main:
        print(f"tokenizer written to {final}")
    cleanup(info)


def cmd_train_teacher(args) -> None:
    from onestep.distributed import cleanup, setup
    from onestep.teacher.train import TEACHER_TRAIN_PRESETS, train_teacher

    cfg = _override(TEACHER_TRAIN_PRESETS[args.preset], steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed, amp=args.amp or None)
    info = setup(args.device)
    final = train_teacher(args.run_dir, args.tokenizer, cfg, data=args.data, data_root=args.data_root, info=info)
    if info.is_main:
        print(f"teacher written to {final}")
    cleanup(info)


def _override(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})


# ---- sampling -----------------------------------------------------------------------------------------
def cmd_sample(args) -> None:
    import numpy as np
    import torch

    from onestep.distributed import resolve_device
    from onestep.eval.report import save_grid
    from onestep.samplers import build_sampler, class_labels, generate

    device = resolve_device(args.device)
    sampler = build_sampler(args.method, args.run, device=device, args=args)
    if args.labels:
        check_labels(args.labels, sampler.info["num_classes"])
        labels = torch.tensor(args.labels, device=device)
        labels = labels.repeat((args.n + len(labels) - 1) // len(labels))[: args.n]
    else:
        labels = class_labels(args.n, sampler.info["num_classes"], device)
    out = generate(sampler, labels, args.seed, batch_size=args.batch_size)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = out_dir / f"{sampler.name}.png"
    from onestep.eval.report import grid_columns
    from onestep.runs import class_names

    shown = out["images"][: args.grid]
    save_grid(shown, grid, nrow=args.nrow or grid_columns(len(shown), sampler.info["num_classes"]),
              labels=out["labels"][: args.grid], class_names=class_names(args.run))
    npz = out_dir / f"{sampler.name}.npz"
    tokens = out["tokens"]
    np.savez(npz, tokens=tokens.numpy(), labels=out["labels"].numpy(), images=out["images"].numpy(), seed=args.seed)
    print(f"{len(labels)} samples from {sampler.name} ({sampler.steps} steps): grid {grid}, tokens {npz}")


# ---- parser -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from onestep.teacher.train import TEACHER_TRAIN_PRESETS
    from onestep.tokenizer.train import VQ_TRAIN_PRESETS

    parser = OnestepArgumentParser(
        prog="onestep",
        description="Turn an image autoregressive model into a one-step generator with Distilled Decoding 2 "
                    "(conditional score distillation), with Distilled Decoding 1 as the baseline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-tokenizer", help="train a VQ tokenizer (VQGAN-style, l2-normalised codebook)",
                       description="Train a VQ tokenizer on a data set; reports test PSNR and codebook usage.")
    add_data(p)
    add_preset(p, VQ_TRAIN_PRESETS, "default", "tokenizer")
    p.add_argument("--run-dir", default="runs/tokenizer")
    p.add_argument("--steps", type=positive_int, default=None, help="override the preset's number of steps")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None)
    add_common(p)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("train-teacher", help="train a LlamaGen-style class-conditional AR teacher on tokens",
                       description="Train the raster-order AR transformer (LlamaGen GPT design) on a tokenizer's ids.")
    add_data(p, recorded="the data set and data root the tokenizer run records")
    p.add_argument("--tokenizer", required=True, help="tokenizer run directory")
    add_preset(p, TEACHER_TRAIN_PRESETS, "small", "teacher training")
    p.add_argument("--run-dir", default="runs/teacher")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only; off on the CPU)")
    add_common(p)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("sample", help="sample images: PNG grid + tokens (.npz)",
                       description="Sample with the teacher; writes METHOD.png (grid) and METHOD.npz (tokens, labels, images).")
    p.add_argument("--run", required=True, help="run directory: a teacher run, or a DD1 / DD2 training run")
    add_method(p)
    p.add_argument("-n", "--n", type=positive_int, default=100, help="number of samples")
    p.add_argument("--labels", type=label_list, default=None,
                   help="comma-separated class labels (default: balanced over classes)")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--grid", type=positive_int, default=100, help="how many samples to put in the grid")
    p.add_argument("--nrow", type=nonneg_int, default=0,
                   help="grid columns (default: one class per column up to 16 classes, else a square grid)")
    p.add_argument("--out", default="samples")
    add_sampling(p)
    add_common(p)
    p.set_defaults(func=cmd_sample)

    for mod in ("onestep.eval.commands", "onestep.dd1.commands", "onestep.dd2.commands", "onestep.pipeline",
                "onestep.importers", "onestep.serve", "onestep.export"):
        __import__(mod, fromlist=["register"]).register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded next to results
    _torch_threads(args)
    from onestep.checkpoint import CheckpointError, describe_os_error
    from onestep.data import DataError

    try:
        args.func(args)
    # bad input, a diverged run or an environment fault (full disk, read-only directory): one clear line
    # (ONESTEP_DEBUG=1: the traceback)
    except (DataError, CheckpointError, ValueError, FloatingPointError, OSError) as e:
        import os

        if os.environ.get("ONESTEP_DEBUG"):
            raise
        stage = getattr(args, f"{args.command}_command", None)  # onestep dd1 STAGE / dd2 STAGE
        msg = describe_os_error(e) if isinstance(e, OSError) else e
        print(f"onestep {args.command}{' ' + stage if stage else ''}: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
