"""``onestep demo`` and ``onestep bench``: the whole job of :mod:`onestep.pipeline`, quick or full."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from onestep.argtypes import positive_int
from onestep.cli.flags import DATA_SETS, PRESETS, add_common, override

# the library (and torch with it) is imported inside each command function, when the command runs: building the
# parser imports none, so that ``onestep --help`` answers at once


def _print_outputs(root: Path, outputs: dict) -> None:
    print("\nDone. Everything is under", root.resolve())
    for k, v in outputs.items():
        print(f"  {k:>18}: {v}")
    metrics = root / "metrics.json"
    for note in json.loads(metrics.read_text()).get("notes", []) if metrics.exists() else []:
        print(f"Note: {note}")


def cmd_pipeline(args) -> None:
    import torch

    from onestep.pipeline import PIPELINE_PRESETS, Pipeline, default_workers

    preset = args.preset or ("quick" if args.command == "demo" else "full")
    cfg = PIPELINE_PRESETS[preset]
    cfg = override(cfg, data=getattr(args, "data", None) or None, use_assets=False if args.no_assets else None)
    if os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(os.cpu_count() or 1)
    root = Path(args.out or f"runs/{preset}")
    command = "onestep " + " ".join(args.argv) if getattr(args, "argv", None) else f"onestep {args.command}"
    workers = args.workers if args.workers is not None else default_workers(args.device)
    outputs = Pipeline(root, cfg, args.device, args.seed, args.data_root, command, workers=workers).run()
    _print_outputs(root, outputs)


# the first paragraph of onestep.pipeline's docstring (the package imports torch; building the parser does not)
DESCRIPTION = ("The main job: one command from data to the comparison table (onestep demo quick, onestep bench full): "
               "tokenizer, teacher, the DD1 and DD2 stages, the evaluation of every method, the tables and the "
               "report, each stage in its own run directory and resumed when re-run.")


def register(sub) -> None:
    for name, help_ in (("demo", "the quick pipeline on the default data (README's main command, <= 20 min)"),
                        ("bench", "the full pipeline: the papers' tables at small scale (<= 90 min)")):
        p = sub.add_parser(name, help=help_, description=f"{DESCRIPTION} {name}: {help_}.")
        p.add_argument("--preset", default=None, choices=sorted(PRESETS["pipeline"]),
                       help=f"pipeline preset (default: {'quick' if name == 'demo' else 'full'})")
        p.add_argument("--out", default=None,
                       help="output folder: the runs, tables, grids and report (default: runs/<preset>)")
        # the spelling of the commands recorded in benchmarks/results (onestep bench --root runs/bench-v4)
        p.add_argument("--root", dest="out", default=None, help=argparse.SUPPRESS)
        p.add_argument("--data", default=None, choices=DATA_SETS,
                       help="data set (default: the preset's, fashion-mnist)")
        p.add_argument("--data-root", default=None, help="override the data location (required for --data folder)")
        p.add_argument("--no-assets", action="store_true", help="train the tokenizer and teacher instead of using shipped ones")
        add_common(p)
        p.add_argument("--workers", type=positive_int, default=None,
                       help="processes for the DD1 / DD2 branches and the evaluations (default: 2 on a multi-core CPU, "
                            "else 1 = sequential)")
        p.set_defaults(func=cmd_pipeline)
