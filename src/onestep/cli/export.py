"""``onestep export RUN OUT``: a run as one self-contained folder (:mod:`onestep.export`)."""
from __future__ import annotations

# the library (and torch with it) is imported inside each command function, when the command runs: building the
# parser imports none, so that ``onestep --help`` answers at once


def cmd_export(args) -> None:
    from onestep import checkpoint as ckpt
    from onestep.export import export_run

    out = export_run(args.run, args.out, half=args.half)
    card = ckpt.read_json(out / "export.json")
    total = sum(v["bytes"] for v in card["components"].values())
    print(f"exported {args.run} ({card['method']}) to {out}: {', '.join(card['components'])} "
          f"({total / 2 ** 20:.1f} MiB of weights); load it with onestep.load({str(out)!r})")


def register(sub) -> None:
    p = sub.add_parser("export", help="a run as one self-contained folder (weights, configs, model card)",
                       description="Copy a teacher, DD1 or DD2 run's final weights, and those of the teacher and "
                                   "tokenizer it samples with, into one folder whose configs refer only to paths "
                                   "inside it, with a model card (README.md) and export.json. The folder loads with "
                                   "onestep.load(OUT) or onestep sample --run OUT from any location.")
    p.add_argument("run", help="run directory: a teacher, DD1 (dd1 train), DD2 (dd2 train) or MapKD (mapkd train) run")
    p.add_argument("out", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--half", action="store_true",
                   help="store float32 weights as float16 (half the size; loaded back into float32)")
    p.set_defaults(func=cmd_export)
