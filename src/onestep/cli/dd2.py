"""``onestep dd2 adapt | tune | train``: DD2, the paper's recipe, as resumable commands (method.md section 3).

    onestep dd2 adapt --teacher T  --run-dir A   # stage 0: continuous-input teacher
    onestep dd2 tune  --teacher A  --run-dir B   # stage 1: AR-diffusion tuning (GTS loss)
    onestep dd2 train --tune B     --run-dir C   # stage 2: CSD (+ optional performance alignment)
    onestep sample --run C --sampling-steps K    # one step, or K steps (--multistep alg4 | jacobi)

    # a variant (not the paper's, lab/mapstart.py): the generator first regressed onto DD1's pairs, then CSD
    python lab/mapstart.py --tune B --pairs P --run-dir M
    onestep dd2 train --tune B --generator-init M --guidance-warmup 50 --lr 2e-5 --lr-schedule cosine --run-dir C

The project's own method, MapKD, has its own group: ``onestep mapkd train`` (:mod:`onestep.cli.mapkd`).
"""
from __future__ import annotations

import argparse

from onestep.argtypes import nonneg_float, nonneg_int, positive_float, positive_int, unit_interval
from onestep.cli.flags import PRESETS, add_common, add_data, add_preset, add_run_dir, add_sampling, given, override

# the library (and torch with it) is imported inside each command function, when the command runs: building the
# parser imports none, so that ``onestep --help`` answers at once


def cmd_adapt(args) -> None:
    from onestep.dd2.adapt import ADAPT_PRESETS, adapt_teacher
    from onestep.distributed import cleanup, setup

    cfg = override(ADAPT_PRESETS[args.preset], **given(args, "steps", "fit_steps", "batch_size", "lr", "seed"))
    info = setup(args.device)
    final = adapt_teacher(args.run_dir, args.teacher, cfg, info, args.data, args.data_root)
    if info.is_main:
        print(f"continuous-input teacher written to {final}")
    cleanup(info)


def cmd_tune(args) -> None:
    from onestep.dd2.tune import TUNE_PRESETS, tune
    from onestep.distributed import cleanup, setup
    from onestep.samplers import sampling_config_from_args

    cfg = override(TUNE_PRESETS[args.preset], **given(args, "steps", "head_only_steps", "batch_size", "lr", "head_lr",
                                                       "n_pool", "seed"))
    info = setup(args.device)
    final = tune(args.run_dir, args.teacher, cfg, sampling_config_from_args(args), info)
    if info.is_main:
        print(f"AR-diffusion model (stage 1) written to {final}")
    cleanup(info)


def cmd_train(args) -> None:
    from onestep.dd2.train import TRAIN_PRESETS, train
    from onestep.distributed import cleanup, setup

    cfg = override(TRAIN_PRESETS[args.preset], **given(args, "steps", "batch_size", "guidance_batch_size", "lr",
                                                        "guidance_lr", "guidance_steps", "m_noise", "align_at",
                                                        "align_steps", "seed", "generator_t", "condition_on_codes",
                                                        "lr_schedule", "final_lr_ratio", "guidance_warmup"))
    info = setup(args.device)
    final = train(args.run_dir, args.tune, cfg, info, generator_init=args.generator_init)
    if info.is_main:
        print(f"DD2 generator (EMA) written to {final}")
    cleanup(info)


def register(sub) -> None:
    p = sub.add_parser("dd2", help="DD2, the paper's recipe: adapt (stage 0), tune (stage 1), train (stage 2, CSD)",
                       description="Distilled Decoding 2: conditional score distillation of an AR teacher into a "
                                   "one-step generator. Each stage writes a run directory and resumes when re-run.")
    s = p.add_subparsers(dest="dd2_command", required=True, metavar="STAGE")

    a = s.add_parser("adapt", help="stage 0: continuous-input teacher (MLP on code vectors replaces the token table)",
                     description="Stage 0: fit an MLP on the code vectors to the token embedding table, then fine-tune "
                                 "the teacher with its AR loss; reports held-out NLL before and after.")
    a.add_argument("--teacher", required=True, help="teacher run directory")
    add_run_dir(a, "runs/dd2-adapt")
    add_preset(a, PRESETS["dd2 adapt"], "small", "stage-0")
    a.add_argument("--steps", type=positive_int, default=None, help="fine-tuning steps (default: the preset's)")
    a.add_argument("--fit-steps", type=positive_int, default=None, help="MLP regression steps (default: the preset's)")
    a.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step (default: the preset's)")
    a.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
    add_data(a, recorded="the teacher run's; needed for an imported teacher")
    add_common(a, seed=None)
    a.set_defaults(func=cmd_adapt)

    t = s.add_parser("tune", help="stage 1: AR-diffusion tuning with the GTS loss on teacher samples",
                     description="Stage 1: the continuous-input teacher's backbone + a MAR-style MLP velocity head, "
                                 "trained on teacher-sampled sequences with the Ground Truth Score loss.")
    t.add_argument("--teacher", required=True, help="continuous-input teacher run (onestep dd2 adapt)")
    add_run_dir(t, "runs/dd2-tune")
    add_preset(t, PRESETS["dd2 tune"], "small", "stage-1")
    t.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the preset's)")
    t.add_argument("--head-only-steps", type=nonneg_int, default=None, help="first steps train the head only (0 = off)")
    t.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step (default: the preset's)")
    t.add_argument("--lr", type=positive_float, default=None, help="backbone learning rate (default: the preset's)")
    t.add_argument("--head-lr", type=positive_float, default=None,
                   help="velocity head's learning rate (default: the preset's)")
    t.add_argument("--n-pool", type=positive_int, default=None, help="number of teacher-sampled training sequences")
    add_sampling(t)
    add_common(t, seed=None)
    t.set_defaults(func=cmd_tune)

    r = s.add_parser("train", help="stage 2: conditional score distillation (CSD) from a stage-1 run",
                     description="Stage 2: generator and guidance network start from the stage-1 model; K guidance "
                                 "(DSM) updates per generator (SiD-form CSD) update; EMA generator; optional "
                                 "performance alignment (--align-at, --align-steps). Distils under the stage-1 run's "
                                 "sampling rule.")
    r.add_argument("--tune", required=True, help="stage-1 run (onestep dd2 tune)")
    add_run_dir(r, "runs/dd2")
    add_preset(r, PRESETS["dd2 train"], "small", "stage-2")
    r.add_argument("--steps", type=positive_int, default=None, help="generator updates (default: the preset's)")
    r.add_argument("--batch-size", type=positive_int, default=None,
                   help="generated sequences per generator update (default: the preset's)")
    r.add_argument("--lr", type=positive_float, default=None,
                   help="generator learning rate after the warm-up (default: the preset's)")
    r.add_argument("--guidance-lr", type=positive_float, default=None,
                   help="guidance network's learning rate (default: the preset's)")
    r.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help="after the warm-up: constant LRs, or both LRs on a cosine to --final-lr-ratio x their LR at the "
                        "last step (default: the preset's, constant)")
    r.add_argument("--final-lr-ratio", type=nonneg_float, default=None,
                   help="the cosine's end, as a fraction of the LR (default: the preset's, 0)")
    r.add_argument("--guidance-steps", type=positive_int, default=None, help="K guidance updates per generator update (default: the preset's, 5)")
    r.add_argument("--guidance-batch-size", type=positive_int, default=None,
                   help="generated sequences per guidance update (default: the preset's, i.e. --batch-size)")
    r.add_argument("--m-noise", type=positive_int, default=None, help="noise draws per sequence in the guidance loss (default: the preset's)")
    r.add_argument("--generator-t", type=unit_interval, default=None,
                   help="time s in (0, 1] at which the generator's head reads the noise: x = s eps - s v(s eps, s); "
                        "1 = the paper's x = eps - v(eps, 1); s < 1 starts CSD from a noise-dependent generator "
                        "instead of the per-position mean (default: the preset's, 0.5 in small and paper)")
    r.add_argument("--condition-on-codes", action=argparse.BooleanOptionalAction, default=None,
                   help="the teacher's and psi's prefix conditions read the generated prefix snapped to the nearest "
                        "codes (psi then learns the generator's conditional given the quantised prefix); default: the "
                        "preset's (on in small, off in tiny); --no-condition-on-codes gives the paper's continuous "
                        "conditions")
    r.add_argument("--align-at", type=nonneg_int, default=None,
                   help="performance alignment at this generator step (0 = off; default: the preset's, off)")
    r.add_argument("--align-steps", type=nonneg_int, default=None, help="guidance-only steps of the alignment (default: the preset's, 0)")
    r.add_argument("--guidance-warmup", type=nonneg_int, default=None,
                   help="guidance-only steps before the first generator step, for the map-start variant (default: 0)")
    r.add_argument("--generator-init", default=None,
                   help="a run whose generator CSD starts from instead of stage 1's (the map-start variant of lab/mapstart.py; default: none, the paper's start)")
    add_common(r, seed=None)
    r.set_defaults(func=cmd_train)
