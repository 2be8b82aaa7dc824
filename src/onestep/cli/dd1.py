"""``onestep dd1 pairs`` and ``onestep dd1 train``: DD1 (method.md section 2) as resumable commands.

    onestep dd1 pairs --teacher RUN --out DIR [-n N]          # noise -> tokens by the flow map (2.1)
    onestep dd1 train --pairs DIR --teacher RUN --run-dir DIR  # generator from the teacher (2.3)
    onestep sample --method dd1 --run DIR --sampling-steps K   # K = 1, 2, or >= 3 teacher-involved (2.4)

Both resume when re-run with the same arguments; the library functions (``make_pairs``, ``train_dd1``,
``DD1_PRESETS``) are in :mod:`onestep.dd1.stages`.
"""
from __future__ import annotations

from pathlib import Path

from onestep.argtypes import positive_float, positive_int
from onestep.cli.flags import PRESETS, add_common, add_preset, add_run_dir, add_sampling, given, override

# the library (and torch with it) is imported inside each command function, when the command runs: building the
# parser imports none, so that ``onestep --help`` answers at once

__all__ = ["register"]

_SAMPLING_KEYS = ("cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p")


def _preset(args):
    from onestep.dd1.stages import DD1_PRESETS

    if args.preset not in DD1_PRESETS:
        raise ValueError(f"unknown DD1 preset {args.preset!r}; choose from {sorted(DD1_PRESETS)}")
    return DD1_PRESETS[args.preset]


def _sampling(args, fallback=None):
    """The sampling rule from the flags; flags left unset (None) come from ``fallback`` (a dict)."""
    from onestep.teacher.sampling import SamplingConfig

    vals = {k: getattr(args, k) for k in _SAMPLING_KEYS}
    if fallback is not None:
        vals = {k: fallback[k] if v is None else v for k, v in vals.items()}
    return SamplingConfig(**{k: v for k, v in vals.items() if v is not None})


def cmd_pairs(args) -> None:
    from onestep.dd1.stages import make_pairs
    from onestep.distributed import cleanup, setup

    cfg = _preset(args)
    cfg = override(cfg, **given(args, "shard_size", "ode_steps", "map_batch"))
    info = setup(args.device)
    out = make_pairs(args.out, args.teacher, args.n, args.seed, _sampling(args), info.device, cfg, info)
    if info.is_main:
        print(f"DD1 pairs written to {out}")
    cleanup(info)


def cmd_train(args) -> None:
    from onestep.dd1.pairs import MANIFEST, read_manifest
    from onestep.dd1.stages import train_dd1
    from onestep.distributed import cleanup, setup

    cfg = _preset(args)
    cfg = override(cfg, seed=args.seed, **given(args, "steps", "batch_size", "lr"))
    fallback = read_manifest(args.pairs)["sampling"] if (Path(args.pairs) / MANIFEST).exists() else None
    info = setup(args.device)
    final = train_dd1(args.run_dir, args.pairs, args.teacher, cfg, info, sampling_cfg=_sampling(args, fallback))
    if info.is_main:
        print(f"DD1 generator written to {final}")
    cleanup(info)


def register(sub) -> None:
    p = sub.add_parser("dd1", help="DD1 baseline: flow-map pairs, then the one-step generator",
                       description="Distilled Decoding 1 (the baseline): map noise to tokens with the teacher's "
                                   "deterministic flow map (pairs), then train a generator initialised from the "
                                   "teacher to predict the tokens from noise. Both stages resume when re-run.")
    s = p.add_subparsers(dest="dd1_command", required=True, metavar="STAGE")

    a = s.add_parser("pairs", help="map N noise sequences to tokens (sharded .npz, resumable)",
                     description="Sample N noise sequences and map each to tokens with the teacher's flow map "
                                 "(AB2 ODE per position, in the teacher's AR order). Writes shard_*.npz and "
                                 "manifest.json (seeds, sampling rule, wall time); re-running resumes, a larger -n "
                                 "extends the set.")
    a.add_argument("--teacher", required=True, help="teacher run directory")
    a.add_argument("--out", required=True, help="output directory of the pairs")
    a.add_argument("-n", "--n", type=positive_int, default=None, help="number of pairs (default: the preset's)")
    add_preset(a, PRESETS["dd1"], "small", "DD1")
    a.add_argument("--shard-size", type=positive_int, default=None, help="pairs per shard file (default: the preset's)")
    a.add_argument("--ode-steps", type=positive_int, default=None,
                   help="AB2 steps of the flow-map ODE (default: the preset's)")
    a.add_argument("--map-batch", type=positive_int, default=None,
                   help="sequences mapped at once (default: the preset's)")
    add_sampling(a)
    add_common(a)
    a.set_defaults(func=cmd_pairs, resumable=True)

    t = s.add_parser("train", help="train the DD1 generator on pairs (resumable)",
                     description="Train the DD1 generator (a copy of the teacher reading trajectory points with a "
                                 "noise-or-data flag per position) with cross-entropy on the map's tokens at X_1 and "
                                 "intermediate points. Writes RUN/final (kind dd1) and metrics.json (held-out "
                                 "accuracy, wall times of pairs and training).")
    t.add_argument("--pairs", required=True, help="pairs directory (onestep dd1 pairs --out)")
    t.add_argument("--teacher", required=True, help="the teacher run the pairs were made with")
    add_run_dir(t, "runs/dd1")
    add_preset(t, PRESETS["dd1"], "small", "DD1")
    t.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the preset's)")
    t.add_argument("--batch-size", type=positive_int, default=None, help="pairs per step (default: the preset's)")
    t.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
    add_sampling(t)
    t.set_defaults(**{k: None for k in _SAMPLING_KEYS})  # default: the pairs' rule (must match it)
    for act in t._actions:
        if act.dest in _SAMPLING_KEYS:
            act.help = "default: the pairs' rule (a different value is refused)"
    add_common(t)
    t.set_defaults(func=cmd_train)
