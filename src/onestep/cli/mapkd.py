"""``onestep mapkd train``: the project's own one-step method, MapKD (docs/method.md, "MapKD").

    onestep mapkd train --teacher T --run-dir M --cfg-scale 2.0   # one stage from the teacher: no pairs, no stage 0/1
    onestep sample --run M --sampling-steps K                     # one step, or K steps (--multistep jacobi | alg4)
"""
from __future__ import annotations

import argparse

from onestep.argtypes import positive_float, positive_int, weight
from onestep.cli.flags import PRESETS, add_common, add_preset, add_run_dir, add_sampling, given, override

# the library (and torch with it) is imported inside each command function, when the command runs: building the
# parser imports none, so that ``onestep --help`` answers at once


def cmd_train(args) -> None:
    from onestep.distributed import cleanup, setup
    from onestep.mapkd.train import MAPKD_PRESETS, train_mapkd
    from onestep.samplers import sampling_config_from_args

    cfg = override(MAPKD_PRESETS[args.preset], **given(args, "steps", "batch_size", "lr", "divergence", "reverse_weight",
                                                        "reverse_weight_end", "prefix_codes", "prefix_ode_steps",
                                                        "seed"))
    info = setup(args.device)
    final = train_mapkd(args.run_dir, args.teacher, cfg, sampling_config_from_args(args), info)
    if info.is_main:
        print(f"MapKD generator written to {final}")
    cleanup(info)


def register(sub) -> None:
    p = sub.add_parser("mapkd", help="MapKD, the own method: train (one stage from the teacher)",
                       description="MapKD: a one-step generator that gives logits and draws each token by DD1's "
                                   "closed-form map of its own noise, distilled on the teacher's conditionals at its "
                                   "own samples. Writes a run directory and resumes when re-run.")
    s = p.add_subparsers(dest="mapkd_command", required=True, metavar="STAGE")
    t = s.add_parser("train", help="distil a teacher run into a MapKD generator",
                     description="A copy of the teacher reads the noise of the earlier positions and gives each "
                                 "position's logits; the position's token is the closed-form ODE map of its own noise "
                                 "under them, so the generator's conditional is known exactly. Trained on its own "
                                 "samples against the teacher's conditionals (one teacher pass per batch).")
    t.add_argument("--teacher", required=True, help="teacher run directory")
    add_run_dir(t, "runs/mapkd")
    add_preset(t, PRESETS["mapkd train"], "small", "MapKD")
    t.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the preset's)")
    t.add_argument("--batch-size", type=positive_int, default=None,
                   help="generated sequences per step (default: the preset's)")
    t.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
    t.add_argument("--divergence", choices=("forward", "reverse", "mixture"), default=None,
                   help="forward: KL(teacher || generator) per position, mass-covering; reverse: KL(generator || "
                        "teacher), mode-seeking; mixture: (1-w) forward + w reverse (default: the preset's, forward)")
    t.add_argument("--reverse-weight", type=weight, default=None,
                   help="mixture: the weight w of the reverse KL (default: the preset's, 0.5)")
    t.add_argument("--reverse-weight-end", type=weight, default=None,
                   help="mixture: w at the last step, moved linearly from --reverse-weight (default: none, fixed)")
    t.add_argument("--prefix-codes", action=argparse.BooleanOptionalAction, default=None,
                   help="each position also reads the teacher's embedding of the code DD1's map gives the earlier "
                        "positions' noise under the generator's running marginal (one more ODE map per sample; "
                        "LlamaGen-family teachers only; default: the preset's, off)")
    t.add_argument("--prefix-ode-steps", type=positive_int, default=None,
                   help="the prefix codes' map's ODE steps (default: the map's own, 16)")
    add_sampling(t)
    add_common(t, seed=None)
    t.set_defaults(func=cmd_train)
