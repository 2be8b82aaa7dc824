"""``onestep dd2 adapt``: DD2 stage 0 as a resumable command (method.md section 3).

Stages 1 (tune) and 2 (CSD train) exist as library code (dd2/losses.py, dd2/csd.py) and are exercised on
the tabular teacher; their commands on image teachers are not wired yet.
"""
from __future__ import annotations

from dataclasses import replace


def _override(cfg, args, names):
    return replace(cfg, **{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})


def cmd_adapt(args) -> None:
    from onestep.dd2.adapt import ADAPT_PRESETS, adapt_teacher
    from onestep.distributed import cleanup, setup

    cfg = _override(ADAPT_PRESETS[args.preset], args, ("steps", "fit_steps", "batch_size", "lr", "seed"))
    info = setup(args.device)
    final = adapt_teacher(args.run_dir, args.teacher, cfg, info)
    if info.is_main:
        print(f"continuous-input teacher written to {final}")
    cleanup(info)


def register(sub) -> None:
    p = sub.add_parser("dd2", help="DD2 stage 0: adapt (continuous-input teacher)",
                       description="Distilled Decoding 2: conditional score distillation of an AR teacher into a "
                                   "one-step generator. Stage 0 (adapt) is available here; it resumes when re-run.")
    s = p.add_subparsers(dest="dd2_command", required=True, metavar="STAGE")

    a = s.add_parser("adapt", help="stage 0: continuous-input teacher (MLP on code vectors replaces the token table)",
                     description="Stage 0: fit an MLP on the code vectors to the token embedding table, then fine-tune "
                                 "the teacher with its AR loss; reports held-out NLL before and after.")
    a.add_argument("--teacher", required=True, help="teacher run directory")
    a.add_argument("--run-dir", default="runs/dd2-adapt")
    a.add_argument("--preset", default="small", help="tiny, small")
    a.add_argument("--steps", type=int, default=None, help="fine-tuning steps")
    a.add_argument("--fit-steps", type=int, default=None, help="MLP regression steps")
    a.add_argument("--batch-size", type=int, default=None)
    a.add_argument("--lr", type=float, default=None)
    a.add_argument("--device", default="cpu")
    a.add_argument("--seed", type=int, default=None)
    a.set_defaults(func=cmd_adapt)
