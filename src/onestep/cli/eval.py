"""``onestep eval`` and ``onestep report``."""
from __future__ import annotations

import sys
from pathlib import Path

from onestep.argtypes import nonneg_int, positive_int
from onestep.cli.flags import RULE_FLAGS, add_common, add_data, add_method, add_sampling, run_method

# the library (and torch with it) is imported inside each command function, when the command runs: building the
# parser imports none, so that ``onestep --help`` answers at once


def cmd_eval(args) -> None:
    """Score ``--images`` or samples of ``--run``; the reference data set is ``--data`` / ``--data-root``, by default
    the one the run was trained on (Fashion-MNIST for ``--images``). Images whose shape is not the data set's are
    refused before the classifier and the reference statistics are made (grey images stored as three equal channels,
    ADM's layout, are read as grey). Prints the metrics under their labels; ``--out FILE`` writes them as JSON, and
    beside it FILE's name with .png: a grid of the first 100 scored images (what ``onestep report`` shows)."""
    from onestep.data import check_image_shape, load_dataset
    from onestep.eval.evaluate import Evaluator, load_images, match_channels
    from onestep.eval.report import format_evaluation
    from onestep.runs import class_names, recorded_data, stage_data, tokenizer_image_shape

    if args.out and Path(args.out).suffix.lower() == ".png":
        raise ValueError(f"argument --out: {args.out} would be overwritten by its own grid; name the JSON file "
                         "(e.g. metrics.json), the grid goes beside it as metrics.png")
    if args.images:
        images, labels = load_images(args.images)
        images, labels = images[: args.n], (labels[: args.n] if labels is not None else None)
        source = {"images": str(args.images)}
        data, data_root = stage_data(args.data, args.data_root, (None, None))
        train = load_dataset(data, "train", root=data_root)
        images = match_channels(images, train.image_shape[0], f"the images of {args.images}")
        shape, what, names = tuple(images.shape[1:]), f"the images of {args.images}", train.class_names
    else:
        from onestep.api import sampling_rule
        from onestep.checkpoint import check_memory
        from onestep.methods import build_sampler

        recorded = recorded_data(args.run)
        named = {args.data, recorded[0]} - {None, "folder"}  # (a folder of images: checked by its image shape below)
        if len(named) == 2:
            raise ValueError(f"argument --data: {args.run} was trained on {recorded[0]}, not {args.data}: its images "
                             f"are scored against the data set it learnt (leave --data out)")
        method = run_method(args)
        for k, v in sampling_rule(method, args.run, {k: getattr(args, k) for k in RULE_FLAGS}).items():
            setattr(args, k, v)
        sampler = build_sampler(method, args.run, device=args.device, args=args)
        c, h, w = tokenizer_image_shape(sampler.tokenizer)
        check_memory(args.n * c * h * w, f"argument -n/--n: scoring {args.n} images (kept in memory)")
        data, data_root = stage_data(args.data, args.data_root, recorded)
        train = load_dataset(data, "train", root=data_root)
        shape, what, names = tokenizer_image_shape(sampler.tokenizer), f"the run {args.run}", class_names(args.run)
    check_image_shape(train, shape, what)
    ev = Evaluator(data, data_root, args.device, n_ref_inception=args.n_ref_inception,
                   n_ref_classifier=args.n_ref_classifier, ref_stats=args.ref_stats)
    if not args.images:
        from onestep.samplers import class_labels, generate

        out = generate(sampler, class_labels(args.n, sampler.info["num_classes"], args.device), args.seed,
                       batch_size=args.batch_size, keep_tokens=False)
        images, labels = out["images"], out["labels"]
        source = {"run": str(args.run), "method": sampler.name, "steps": sampler.steps, "params": sampler.params}
    res = ev.evaluate(images, labels, n_inception=args.n_inception)
    res.update({"data": data, "data_root": data_root})
    res.update(source)
    if "fid_inception" in res:
        res["inception_reference"] = ev.inception_reference()
    # the floor on as many test images as were scored (FID's bias depends on the sample size)
    res["data_floor"] = ev.data_floor(n_inception=res.get("n_inception", 0), n_test=len(images))
    res["classifier_test_accuracy"] = ev.classifier_meta.get("test_accuracy")
    if args.out:
        from onestep.checkpoint import write_json
        from onestep.eval.report import grid_columns, save_grid

        out_path = Path(args.out)
        shown = images[:100]
        grid = save_grid(shown, out_path.with_suffix(".png"), nrow=grid_columns(len(shown), len(names or []) or None),
                         labels=labels[:100] if labels is not None else None, class_names=names)
        res["grid"] = grid.name  # beside the JSON
        write_json(out_path, res)
    print(format_evaluation(res))
    if args.out:
        print(f"metrics written to {args.out}, its grid to {Path(args.out).with_suffix('.png')}")


def cmd_report(args) -> None:
    from onestep.eval.report import write_report

    path = write_report(args.runs, args.out, title=args.title,
                        warn=lambda msg: print(f"onestep report: warning: {msg}", file=sys.stderr))
    print(f"report written to {path} and {path.with_suffix('.html')}")


def register(sub) -> None:
    p = sub.add_parser("eval", help="FID (classifier and Inception features); IS, precision/recall and class "
                                    "accuracy on the classifier",
                       description="Evaluate generated images (an .npz with uint8 'images' (N,C,H,W) and optional "
                                   "'labels', or ADM's layout: uint8 'arr_0' (N,H,W,3) and labels 'arr_1'; or a "
                                   "folder of PNGs named <label>_*.png) or a model run, against the data set's train "
                                   "split. The FIDs are on the project's classifier's features and on Inception-v3's; "
                                   "IS, precision/recall and class accuracy are on the classifier (labelled so). "
                                   "Reference statistics are cached per data set and feature network.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="an .npz (this project's layout or ADM's) or a folder of PNGs")
    src.add_argument("--run", help="a run directory to sample from (see --method)")
    add_method(p)
    p.add_argument("-n", "--n", type=positive_int, default=10000, help="number of samples")
    p.add_argument("--n-inception", type=nonneg_int, default=2000, help="samples for the Inception FID (0 = skip)")
    p.add_argument("--n-ref-inception", type=positive_int, default=5000,
                   help="train images for the Inception reference")
    p.add_argument("--ref-stats", default=None, metavar="FILE",
                   help="the Inception FID's reference instead of the train split: an ADM-style .npz with 'mu' "
                        "(2048,) and 'sigma' (2048, 2048), or ADM's reference images 'arr_0' (uint8 (N,H,W,3)), "
                        "whose statistics are computed (and cached)")
    p.add_argument("--n-ref-classifier", type=positive_int, default=None,
                   help="train images in the classifier reference (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=250, help="samples per forward pass (with --run)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the metrics as JSON to FILE, and a grid of the first 100 scored images beside it "
                        "(FILE's name with .png); onestep report FILE tabulates it")
    add_data(p, recorded="with --run, the data set and data root the run records; with --images, fashion-mnist")
    add_sampling(p, recorded=True)
    add_common(p)
    p.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="write report.md / report.html with grids, the metrics table and plots",
                       description="Collect evaluations into report.md and report.html with sample grids, the "
                                   "metrics table and FID-vs-steps / FID-vs-latency plots. Each input is a run "
                                   "directory holding metrics.json, a metrics.json file (rows), or the JSON of "
                                   "onestep eval --out (one row); an input without rows is refused, and a row "
                                   "without its grid file is named in a warning.")
    r.add_argument("runs", nargs="+", metavar="INPUT",
                   help="run directories (each with metrics.json), metrics.json files or onestep eval --out files")
    r.add_argument("--out", default="report", help="output folder (gets report.md, report.html and the plots)")
    r.add_argument("--title", default="onestep report", help="the report's heading")
    r.set_defaults(func=cmd_report)
