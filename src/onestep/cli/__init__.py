"""The ``onestep`` command line: train a tokenizer and a teacher, distil them (MapKD, DD1, DD2), sample, evaluate.

Every command that trains writes a run directory (config.json, log.jsonl, checkpoints/, final/) and
resumes from it when re-run with the same arguments. ``--device`` and ``--seed`` are flags everywhere;
multi-process training: ``torchrun --nproc_per_node N -m onestep train-teacher ...``.

Each command group is a module of this package with a ``register(sub)`` that adds its sub-parsers (train, sample,
eval, mapkd, dd1, dd2, pipeline, importers, serve, export); the flags they share are in :mod:`onestep.cli.flags`. The
library modules hold no parser code: a command turns its flags into plain values and calls them.
"""
from __future__ import annotations

import argparse
import os
import sys

from onestep import __version__
from onestep.argtypes import OnestepArgumentParser
from onestep.cli import dd1, dd2, eval, export, importers, mapkd, pipeline, sample, serve, train

# the order of ``onestep --help``
COMMANDS = (train, sample, eval, mapkd, dd1, dd2, pipeline, importers, serve, export)


def _torch_threads(args) -> None:
    import torch  # here and in main, not at the top: building the parser imports no torch (--help answers at once)

    if os.environ.get("OMP_NUM_THREADS") is None and getattr(args, "device", "cpu") == "cpu":
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 16)))


def build_parser() -> argparse.ArgumentParser:
    """The ``onestep`` parser with every command's sub-parser; building it imports no torch (``--help`` and
    ``--version`` answer at once)."""
    parser = OnestepArgumentParser(
        prog="onestep",
        description="Turn an image autoregressive model into a one-step generator: MapKD (the project's own "
                    "method), Distilled Decoding 2 (the paper's conditional score distillation) and Distilled "
                    "Decoding 1 (the baseline).")
    parser.add_argument("--version", action="version", version=f"onestep {__version__}",
                        help="print onestep's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for commands in COMMANDS:
        commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded next to results
    _torch_threads(args)
    # the library, once a command runs (each command module imports what it runs inside its command function)
    from onestep.checkpoint import CheckpointError, describe_os_error, release_run_locks
    from onestep.data import DataError
    from onestep.trainer import extending

    try:
        with extending(getattr(args, "extend", False)):
            args.func(args)
    # bad input, a diverged run or an environment fault (full disk, read-only directory): one clear line
    # (ONESTEP_DEBUG=1: the traceback)
    except (DataError, CheckpointError, ValueError, FloatingPointError, OSError) as e:
        if os.environ.get("ONESTEP_DEBUG"):
            raise
        stage = getattr(args, f"{args.command}_command", None)  # onestep dd1 / dd2 / mapkd STAGE
        msg = describe_os_error(e) if isinstance(e, OSError) else e
        print(f"onestep {args.command}{' ' + stage if stage else ''}: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        resumable = getattr(args, "resumable", False)  # a training command (its run resumes); not serve, sample...
        hint = "; re-run the same command to resume from the last checkpoint" if resumable else ""
        print(f"onestep {args.command}: interrupted{hint}", file=sys.stderr)
        sys.exit(130)
    finally:
        release_run_locks()


if __name__ == "__main__":
    main()
