"""``onestep sample``: a PNG grid and the tokens (.npz) of a teacher, DD1 or DD2 run."""
from __future__ import annotations

import shutil
from pathlib import Path

from onestep.argtypes import check_labels, label_list, nonneg_int, positive_int
from onestep.cli.flags import RULE_FLAGS, add_common, add_method, add_sampling, run_method

# the library (and torch with it) is imported inside each command function, when the command runs: building the
# parser imports none, so that ``onestep --help`` answers at once

NPZ_FORMATS = ("onestep", "adm")  # onestep.eval.evaluate.NPZ_FORMATS (that module imports torch)


def free_disk(path: Path) -> int:
    """Bytes free on the file system that holds ``path`` (or would hold it: its nearest existing parent)."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def cmd_sample(args) -> None:
    """Sample ``-n`` images batch by batch and stream them to METHOD.npz (:class:`onestep.eval.evaluate.NpzWriter`:
    memory holds one batch and the grid's images); sizes that do not fit (a batch's memory, the file's bytes on the
    disk) are refused with one line before anything is written."""
    import torch

    from onestep.api import sampling_rule
    from onestep.distributed import resolve_device
    from onestep.eval.evaluate import NpzWriter
    from onestep.eval.report import grid_columns, save_grid
    from onestep.methods import build_sampler
    from onestep.runs import class_names, tokenizer_image_shape
    from onestep.samplers import check_batch_size, sample_batches

    device = resolve_device(args.device)
    method = run_method(args)
    for k, v in sampling_rule(method, args.run, {k: getattr(args, k) for k in RULE_FLAGS}).items():
        setattr(args, k, v)
    sampler = build_sampler(method, args.run, device=device, args=args)
    if args.labels:
        check_labels(args.labels, sampler.info["num_classes"])
    pattern = torch.tensor(args.labels or range(sampler.info["num_classes"]), device=device)
    check_batch_size(sampler, min(args.batch_size, args.n), device)
    c, h, w = tokenizer_image_shape(sampler.tokenizer)
    with torch.inference_mode():  # one sample's tokens, for their size
        tokens = sampler.sample(pattern[:1], torch.Generator(device=device).manual_seed(0))
    row = c * h * w + 8 + tokens.element_size() * tokens.numel() if args.npz_format == "onestep" else 3 * h * w + 8
    out_dir = Path(args.out)
    need, have = 2 * row * args.n, free_disk(out_dir)  # the arrays, then the .npz packed from them
    if need > have:
        raise ValueError(f"argument -n/--n: {args.n} samples take about {need / 2 ** 30:.3g} GiB on disk while "
                         f"{sampler.name}.npz is written, more than the {have / 2 ** 30:.3g} GiB free in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = NpzWriter(out_dir / f"{sampler.name}.npz", args.n, args.npz_format, seed=args.seed)
    shown, shown_labels = [], []
    try:
        for images, labels, tokens in sample_batches(sampler, pattern, args.seed, args.batch_size, n=args.n):
            writer.write(images, labels, tokens)
            if writer.done - len(images) < args.grid:
                shown.append(images[: args.grid - (writer.done - len(images))])
                shown_labels.append(labels[: len(shown[-1])])
    except BaseException:  # an interruption or a fault: no partial arrays left behind
        writer.discard()
        raise
    npz = writer.close()
    shown, shown_labels = torch.cat(shown), torch.cat(shown_labels)
    grid = save_grid(shown, out_dir / f"{sampler.name}.png",
                     nrow=args.nrow or grid_columns(len(shown), sampler.info["num_classes"]), labels=shown_labels,
                     class_names=class_names(args.run))
    what = "tokens" if args.npz_format == "onestep" else "ADM-layout images"
    print(f"{args.n} samples from {sampler.name} ({sampler.steps} steps): grid {grid}, {what} {npz}")


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
    add_sampling(p, recorded=True)
    add_common(p)
    p.set_defaults(func=cmd_sample)
