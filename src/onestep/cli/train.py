"""``onestep train-tokenizer`` and ``onestep train-teacher``."""
from __future__ import annotations

from onestep.argtypes import positive_float, positive_int
from onestep.cli.flags import PRESETS, add_common, add_data, add_preset, add_run_dir, override

# the library (and torch with it) is imported inside each command function, when the command runs: building the
# parser imports none, so that ``onestep --help`` answers at once


def cmd_train_tokenizer(args) -> None:
    from onestep.distributed import cleanup, setup
    from onestep.tokenizer.train import VQ_TRAIN_PRESETS, train_tokenizer

    cfg = VQ_TRAIN_PRESETS[args.preset]
    cfg = override(cfg, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    info = setup(args.device)
    final = train_tokenizer(args.run_dir, cfg, data=args.data, data_root=args.data_root, info=info)
    if info.is_main:
        print(f"tokenizer written to {final}")
    cleanup(info)


def cmd_train_teacher(args) -> None:
    from onestep.distributed import cleanup, setup
    from onestep.teacher.train import TEACHER_TRAIN_PRESETS, train_teacher

    cfg = override(TEACHER_TRAIN_PRESETS[args.preset], steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   seed=args.seed, amp=args.amp or None)
    info = setup(args.device)
    final = train_teacher(args.run_dir, args.tokenizer, cfg, data=args.data, data_root=args.data_root, info=info)
    if info.is_main:
        print(f"teacher written to {final}")
    cleanup(info)


def register(sub) -> None:
    p = sub.add_parser("train-tokenizer", help="train a VQ tokenizer (VQGAN-style, l2-normalised codebook)",
                       description="Train a VQ tokenizer on a data set; reports test PSNR and codebook usage.")
    add_data(p)
    add_preset(p, PRESETS["train-tokenizer"], "default", "tokenizer")
    add_run_dir(p, "runs/tokenizer")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per step (default: the preset's)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
    add_common(p)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("train-teacher", help="train a LlamaGen-style class-conditional AR teacher on tokens",
                       description="Train the raster-order AR transformer (LlamaGen GPT design) on a tokenizer's ids.")
    add_data(p, recorded="the data set and data root the tokenizer run records")
    p.add_argument("--tokenizer", required=True, help="tokenizer run directory")
    add_preset(p, PRESETS["train-teacher"], "small", "teacher training")
    add_run_dir(p, "runs/teacher")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per step (default: the preset's)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only; off on the CPU)")
    add_common(p)
    p.set_defaults(func=cmd_train_teacher)
