"""``onestep sample``: a PNG grid and the tokens (.npz) of a teacher, DD1 or DD2 run."""
from __future__ import annotations

from pathlib import Path

from onestep.argtypes import check_labels, label_list, nonneg_int, positive_int
from onestep.cli.flags import add_common, add_method, run_method, add_sampling

NPZ_FORMATS = ("onestep", "adm")  # onestep.eval.evaluate.NPZ_FORMATS (that module imports torch)


def cmd_sample(args) -> None:
    import torch

    from onestep.distributed import resolve_device
    from onestep.eval.evaluate import save_images
    from onestep.eval.report import save_grid
    from onestep.methods import build_sampler
    from onestep.samplers import class_labels, generate

    device = resolve_device(args.device)
    sampler = build_sampler(run_method(args), args.run, device=device, args=args)
    if args.labels:
        check_labels(args.labels, sampler.info["num_classes"])
        labels = torch.tensor(args.labels, device=device)
        labels = labels.repeat((args.n + len(labels) - 1) // len(labels))[: args.n]
    else:
        labels = class_labels(args.n, sampler.info["num_classes"], device)
    out = generate(sampler, labels, args.seed, batch_size=args.batch_size)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = out_dir / f"{sampler.name}.png"
    from onestep.eval.report import grid_columns
    from onestep.runs import class_names

    shown = out["images"][: args.grid]
    save_grid(shown, grid, nrow=args.nrow or grid_columns(len(shown), sampler.info["num_classes"]),
              labels=out["labels"][: args.grid], class_names=class_names(args.run))
    npz = save_images(out_dir / f"{sampler.name}.npz", out["images"], out["labels"], args.npz_format,
                      tokens=out["tokens"].numpy(), seed=args.seed)
    what = "tokens" if args.npz_format == "onestep" else "ADM-layout images"
    print(f"{len(labels)} samples from {sampler.name} ({sampler.steps} steps): grid {grid}, {what} {npz}")


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample images: PNG grid + tokens (.npz)",
                       description="Sample with the teacher, DD1 or DD2; writes METHOD.png (grid) and METHOD.npz "
                                   "(tokens, labels, images; --npz-format adm: ADM's evaluator layout).")
    p.add_argument("--run", required=True, help="run directory: a teacher run, or a DD1 / DD2 training run")
    add_method(p)
    p.add_argument("-n", "--n", type=positive_int, default=100, help="number of samples")
    p.add_argument("--labels", type=label_list, default=None,
                   help="comma-separated class labels (default: balanced over classes)")
    p.add_argument("--batch-size", type=positive_int, default=100, help="samples per forward pass")
    p.add_argument("--grid", type=positive_int, default=100, help="how many samples to put in the grid")
    p.add_argument("--nrow", type=nonneg_int, default=0,
                   help="grid columns (default: one class per column up to 16 classes, else a square grid)")
    p.add_argument("--out", default="samples", help="output folder (gets METHOD.png and METHOD.npz)")
    p.add_argument("--npz-format", choices=NPZ_FORMATS, default="onestep",
                   help="METHOD.npz's layout: onestep (uint8 'images' (N,C,H,W), 'labels', 'tokens', 'seed') or adm "
                        "(the ADM evaluator's: uint8 'arr_0' (N,H,W,3), grey repeated to 3 channels, and labels "
                        "'arr_1'); onestep eval --images reads both")
    add_sampling(p)
    add_common(p)
    p.set_defaults(func=cmd_sample)
