"""``onestep dd2 adapt|tune|train``: the three DD2 stages as resumable commands (method.md section 3)."""
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


def cmd_tune(args) -> None:
    from onestep.distributed import cleanup, setup
    from onestep.dd2.stages import TUNE_PRESETS, tune

    cfg = _override(TUNE_PRESETS[args.preset], args, ("steps", "batch_size", "lr", "seed", "loss", "n_sequences"))
    info = setup(args.device)
    final = tune(args.run_dir, args.teacher, cfg, info)
    if info.is_main:
        print(f"AR-diffusion model written to {final}")
    cleanup(info)


def cmd_train(args) -> None:
    from onestep.distributed import cleanup, setup
    from onestep.dd2.stages import CSD_PRESETS, distill

    cfg = _override(CSD_PRESETS[args.preset], args, ("steps", "batch_size", "lr", "seed", "guidance_steps",
                                                     "align_steps"))
    info = setup(args.device)
    final = distill(args.run_dir, args.init, cfg, info)
    if info.is_main:
        print(f"one-step generator written to {final}")
    cleanup(info)


def register(sub) -> None:
    p = sub.add_parser("dd2", help="DD2: adapt (stage 0), tune (stage 1), train (stage 2, CSD)",
                       description="Distilled Decoding 2: conditional score distillation of an AR teacher into a "
                                   "one-step generator. Run adapt, then tune, then train; each resumes when re-run.")
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

    t = s.add_parser("tune", help="stage 1: AR-diffusion tuning with the ground-truth-score loss",
                     description="Stage 1: teacher backbone + MAR-style MLP head trained on teacher samples with the "
                                 "GTS loss (or the ordinary diffusion loss, --loss dsm, as an ablation).")
    t.add_argument("--teacher", required=True, help="continuous-input teacher (output of dd2 adapt)")
    t.add_argument("--run-dir", default="runs/dd2-tune")
    t.add_argument("--preset", default="small")
    t.add_argument("--loss", choices=["gts", "dsm"], default=None)
    t.add_argument("--n-sequences", type=int, default=None, help="teacher samples to train on")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--device", default="cpu")
    t.add_argument("--seed", type=int, default=None)
    t.set_defaults(func=cmd_tune)

    c = s.add_parser("train", help="stage 2: conditional score distillation (generator + guidance network)",
                     description="Stage 2: CSD. Generator and guidance network start from the stage-1 model; K guidance "
                                 "updates per generator update; optional performance alignment.")
    c.add_argument("--init", required=True, help="stage-1 run directory (dd2 tune)")
    c.add_argument("--run-dir", default="runs/dd2")
    c.add_argument("--preset", default="small")
    c.add_argument("--steps", type=int, default=None, help="generator steps")
    c.add_argument("--guidance-steps", type=int, default=None, help="K: guidance updates per generator update")
    c.add_argument("--align-steps", type=int, default=None, help="performance alignment: guidance-only steps (0 = off)")
    c.add_argument("--batch-size", type=int, default=None)
    c.add_argument("--lr", type=float, default=None)
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=None)
    c.set_defaults(func=cmd_train)
