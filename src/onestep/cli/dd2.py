"""``onestep dd2 adapt | tune | fit-map | train | flow``: DD2's stages as resumable commands (method.md section 3).

    # the flow recipe (onestep.dd2.flowhead, the default): the generator's conditional in closed form, one stage
    onestep dd2 train --teacher T --run-dir F    # = onestep dd2 flow --teacher T --run-dir F
    onestep sample --run F --sampling-steps K

    # the paper's recipe (--recipe csd, implied by --tune)
    onestep dd2 adapt --teacher T  --run-dir A   # stage 0: continuous-input teacher
    onestep dd2 tune  --teacher A  --run-dir B   # stage 1: AR-diffusion tuning (GTS loss)
    onestep dd2 train --tune B     --run-dir C   # stage 2: CSD (+ optional performance alignment)

    # the map-start recipe (onestep.dd2.mapstart): the generator regressed onto DD1's pairs, then CSD
    onestep dd2 fit-map --tune B --pairs P --run-dir M
    onestep dd2 train   --tune B --generator-init M --guidance-warmup 50 --lr 2e-5 --lr-schedule cosine --run-dir C
    onestep sample --method dd2 --run C --sampling-steps K
"""
from __future__ import annotations

import argparse

from onestep.argtypes import nonneg_float, nonneg_int, positive_float, positive_int, unit_interval
from onestep.cli.flags import (DEFAULT_CFG_SCALE, PRESETS, add_common, add_data, add_preset, add_run_dir, add_sampling,
                               given, override)


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


PREFIX_CODES_HELP = ("flow recipe: each position also reads the teacher's embedding of the code DD1's map gives the "
                     "earlier positions' noise under the generator's running marginal (one more ODE map per sample; "
                     "default: the preset's, off)")
PREFIX_ODE_HELP = "flow recipe: the ODE steps of the prefix codes' map (default: the map's own, 16)"

# ``dd2 train``'s flags that only the CSD recipe reads
CSD_FLAGS = ("guidance_batch_size", "guidance_lr", "guidance_steps", "m_noise", "align_at", "align_steps",
             "generator_t", "condition_on_codes", "lr_schedule", "final_lr_ratio", "guidance_warmup", "generator_init")


def train_recipe(args) -> str:
    """``dd2 train``'s recipe: ``--recipe``, else csd when ``--tune`` is given, else flow; checks the inputs."""
    recipe = args.recipe or ("csd" if args.tune else "flow")
    flag = lambda n: "--" + n.replace("_", "-")  # noqa: E731
    if recipe == "flow":
        if args.tune:
            raise ValueError("--tune is the CSD recipe's input (a stage-1 run); the flow recipe reads --teacher")
        if not args.teacher:
            raise ValueError("dd2 train needs --teacher (a teacher run: the flow recipe) or --tune (a stage-1 run: "
                             "the CSD recipe)")
        extra = [flag(n) for n, v in given(args, *CSD_FLAGS).items() if v is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)}: the CSD recipe's flags (--recipe csd --tune RUN); the flow recipe "
                             f"does not read them")
    else:
        if args.teacher or not args.tune:
            raise ValueError("the CSD recipe reads --tune (a stage-1 run, onestep dd2 tune), not --teacher")
        for name in ("divergence", "prefix_codes", "prefix_ode_steps"):
            if getattr(args, name, None) is not None:
                raise ValueError(f"--{name.replace('_', '-')} is the flow recipe's flag; the CSD recipe does not read it")
        from onestep.samplers import sampling_config_from_args
        from onestep.teacher.sampling import SamplingConfig

        if sampling_config_from_args(args) != SamplingConfig(cfg_scale=DEFAULT_CFG_SCALE):  # a rule flag was given
            raise ValueError("the CSD recipe distils under its stage-1 run's sampling rule; set --cfg-scale and the "
                             "other rule flags on onestep dd2 tune")
    return recipe


def cmd_train(args) -> None:
    if train_recipe(args) == "flow":
        return cmd_flow(args)
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


def cmd_fit_map(args) -> None:
    from onestep.dd2.mapstart import MAP_FIT_PRESETS, fit_map
    from onestep.distributed import cleanup, setup

    cfg = override(MAP_FIT_PRESETS[args.preset], **given(args, "steps", "batch_size", "lr", "generator_t", "seed"))
    info = setup(args.device)
    final = fit_map(args.run_dir, args.tune, args.pairs, cfg, info)
    if info.is_main:
        print(f"map-fit generator written to {final}")
    cleanup(info)


def cmd_flow(args) -> None:
    from onestep.dd2.flowhead import FLOW_PRESETS, train_flow
    from onestep.distributed import cleanup, setup
    from onestep.samplers import sampling_config_from_args

    cfg = override(FLOW_PRESETS[args.preset], **given(args, "steps", "batch_size", "lr", "divergence", "prefix_codes",
                                                       "prefix_ode_steps", "seed"))
    info = setup(args.device)
    final = train_flow(args.run_dir, args.teacher, cfg, sampling_config_from_args(args), info)
    if info.is_main:
        print(f"DD2 flow-head generator written to {final}")
    cleanup(info)


def register(sub) -> None:
    p = sub.add_parser("dd2", help="DD2: adapt (stage 0), tune (stage 1), train (stage 2, CSD); flow (the flow-head "
                                   "recipe)",
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

    r = s.add_parser("train", help="the one-step generator: the flow recipe (default, from --teacher) or CSD (stage 2, "
                                   "from --tune)",
                     description="The DD2 generator. Flow recipe (default; --teacher T): as `onestep dd2 flow`. CSD "
                                 "recipe (--recipe csd, implied by --tune B; the paper's stage 2): generator and "
                                 "guidance network start from the stage-1 model; K guidance (DSM) updates per "
                                 "generator (SiD-form CSD) update; EMA generator; optional performance alignment "
                                 "(--align-at, --align-steps).")
    r.add_argument("--recipe", choices=("flow", "csd"), default=None,
                   help="flow: the flow-head generator on the teacher's conditionals; csd: conditional score "
                        "distillation from a stage-1 run (default: csd with --tune, else flow)")
    r.add_argument("--teacher", default=None, help="teacher run directory (the flow recipe)")
    r.add_argument("--tune", default=None, help="stage-1 run, onestep dd2 tune (the CSD recipe)")
    add_run_dir(r, "runs/dd2")
    add_preset(r, PRESETS["dd2 train"], "small", "flow-recipe or stage-2")
    r.add_argument("--steps", type=positive_int, default=None, help="training steps (CSD: generator updates)")
    r.add_argument("--batch-size", type=positive_int, default=None,
                   help="generated sequences per (generator) update (default: the preset's)")
    r.add_argument("--lr", type=positive_float, default=None, help="(generator) learning rate (after warm-up)")
    r.add_argument("--divergence", choices=("forward", "reverse"), default=None,
                   help="flow recipe: forward KL(teacher || generator) per position (default) or reverse")
    r.add_argument("--prefix-codes", action=argparse.BooleanOptionalAction, default=None, help=PREFIX_CODES_HELP)
    r.add_argument("--prefix-ode-steps", type=positive_int, default=None, help=PREFIX_ODE_HELP)
    r.add_argument("--guidance-lr", type=positive_float, default=None,
                   help="guidance network's learning rate (default: the preset's)")
    r.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help="after the warm-up: constant LRs, or both LRs on a cosine to --final-lr-ratio x their LR at the "
                        "last step (default: the preset's, constant)")
    r.add_argument("--final-lr-ratio", type=nonneg_float, default=None,
                   help="the cosine's end, as a fraction of the LR")
    r.add_argument("--guidance-steps", type=positive_int, default=None, help="K guidance updates per generator update")
    r.add_argument("--guidance-batch-size", type=positive_int, default=None,
                   help="generated sequences per guidance update (default: the preset's, i.e. --batch-size)")
    r.add_argument("--m-noise", type=positive_int, default=None, help="noise draws per sequence in the guidance loss")
    r.add_argument("--generator-t", type=unit_interval, default=None,
                   help="time s in (0, 1] at which the generator's head reads the noise: x = s eps - s v(s eps, s); "
                        "1 = the paper's x = eps - v(eps, 1) (default); s < 1 starts CSD from a noise-dependent "
                        "generator instead of the per-position mean")
    r.add_argument("--condition-on-codes", action=argparse.BooleanOptionalAction, default=None,
                   help="the teacher's and psi's prefix conditions read the generated prefix snapped to the nearest "
                        "codes (psi then learns the generator's conditional given the quantised prefix); default: the "
                        "preset's (on in small, off in tiny); --no-condition-on-codes gives the paper's continuous "
                        "conditions")
    r.add_argument("--align-at", type=nonneg_int, default=None,
                   help="performance alignment at this generator step (0 = off)")
    r.add_argument("--align-steps", type=nonneg_int, default=None, help="guidance-only steps of the alignment")
    r.add_argument("--guidance-warmup", type=nonneg_int, default=None,
                   help="guidance-only steps before the first generator step (the map-start recipe)")
    r.add_argument("--generator-init", default=None,
                   help="map-fit run (onestep dd2 fit-map) to start the generator from: the map-start recipe")
    add_sampling(r)  # the flow recipe's; the CSD recipe's rule is its stage-1 run's
    add_common(r, seed=None)
    r.set_defaults(func=cmd_train)

    m = s.add_parser("fit-map", help="map-start recipe, phase 1: regress the generator onto DD1's pairs",
                     description="Regress a copy of the stage-1 model, used as the one-step generator, onto DD1's "
                                 "noise-to-token pairs (onestep dd1 pairs, same teacher sampling rule); then "
                                 "`onestep dd2 train --generator-init RUN` refines it by CSD.")
    m.add_argument("--tune", required=True, help="stage-1 run (onestep dd2 tune)")
    m.add_argument("--pairs", required=True, help="DD1 pairs directory (onestep dd1 pairs)")
    add_run_dir(m, "runs/dd2-map")
    add_preset(m, PRESETS["dd2 fit-map"], "small", "map-fit")
    m.add_argument("--steps", type=positive_int, default=None, help="regression steps (default: the preset's)")
    m.add_argument("--batch-size", type=positive_int, default=None, help="pairs per step (default: the preset's)")
    m.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
    m.add_argument("--generator-t", type=unit_interval, default=None,
                   help="time s in (0, 1] at which the generator's head reads the noise (default: the preset's; small: 0.5, as dd2 train's small preset)")
    add_common(m, seed=None)
    m.set_defaults(func=cmd_fit_map)

    f = s.add_parser("flow", help="the flow recipe: a flow-head generator trained on the teacher's conditionals",
                     description="DD2 with a flow head: a copy of the teacher reads the noise of the earlier positions "
                                 "and gives each position's logits; the position's token is the closed-form ODE map of "
                                 "its own noise under them, so the generator's conditional is known exactly and CSD's "
                                 "guidance network is not needed. Trained on its own samples against the teacher's "
                                 "conditionals (one teacher pass per batch); needs no stage 0, stage 1 or DD1 pairs.")
    f.add_argument("--teacher", required=True, help="teacher run directory")
    add_run_dir(f, "runs/dd2-flow")
    add_preset(f, PRESETS["dd2 flow"], "small", "flow-recipe")
    f.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the preset's)")
    f.add_argument("--batch-size", type=positive_int, default=None, help="generated sequences per step (default: the preset's)")
    f.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
    f.add_argument("--divergence", choices=("forward", "reverse"), default=None,
                   help="forward: KL(teacher || generator) per position, mass-covering (default); reverse: "
                        "KL(generator || teacher), mode-seeking")
    f.add_argument("--prefix-codes", action=argparse.BooleanOptionalAction, default=None, help=PREFIX_CODES_HELP)
    f.add_argument("--prefix-ode-steps", type=positive_int, default=None, help=PREFIX_ODE_HELP)
    add_sampling(f)
    add_common(f, seed=None)
    f.set_defaults(func=cmd_flow)
