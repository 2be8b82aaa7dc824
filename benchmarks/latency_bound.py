"""The one-forward latency bound beside the teacher and the one-step generators, timed side by side.

The bound is what no one-step generator built on the teacher's transformer can beat: ONE parallel pass of the teacher
over the whole sequence (teacher forcing on a token sequence: backbone + logits head, argmax), plus the tokenizer's
decoder. The rows are that bound, the teacher (CFG + KV cache, its AR steps), DD1 in one step, MapKD in one step (one
pass and the ODE map of every position) and DD2 (the paper's CSD) in one step (the MLP head),
each the full path from labels to uint8 images, at batch 1 and 64 (``onestep.eval.speed.measure``: round-robin
repeats, median seconds per call). A generator's ratio to the bound is its overhead over one teacher pass.

    OMP_NUM_THREADS=2 python benchmarks/latency_bound.py       # the shipped Fashion-MNIST models
    python benchmarks/latency_bound.py --dd1 runs/dd1 --mapkd runs/mapkd --dd2 runs/dd2 --repeats 20

Writes benchmarks/results/latency-bound.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import onestep
from onestep.data import to_uint8
from onestep.eval.speed import git_commit, measure
from onestep.paths import assets_dir, results_dir
from onestep.api import RULE_FIELDS
from onestep.samplers import num_params, teacher_sampler
from onestep.teacher.load import load_teacher
from onestep.teacher.sampling import SamplingConfig


def bound_sampler(teacher, tokenizer, device):
    """labels -> uint8 images through one teacher-forcing pass on a token sequence and the decoder."""
    n = teacher.seq_len

    def fn(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        ids = torch.randint(0, teacher.codebook().shape[0], (labels.shape[0], n), generator=g, device=device)
        return to_uint8(tokenizer.decode_ids(teacher(ids, labels).argmax(-1)).float().cpu())
    return fn


def shown(p: Path) -> Path:
    """``p`` relative to the working directory when it lies under it (as a command line shows it)."""
    return p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p


def main(argv=None) -> dict:
    root = shown(assets_dir() / "fashion-mnist")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dd1", default=str(root / "dd1"), help="a DD1 run or export")
    ap.add_argument("--mapkd", default=str(root / "mapkd"), help="a MapKD run or export")
    ap.add_argument("--dd2", default=str(root / "dd2"), help="a DD2 run or export (the paper's CSD)")
    ap.add_argument("--teacher", default=str(root / "teacher"), help="the teacher run (the bound and the teacher row)")
    ap.add_argument("--extra", nargs="*", default=[], metavar="NAME=RUN",
                    help="more one-step generators, each a row NAME (e.g. mapkd-prefix-codes=runs/mapkd-codes)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(results_dir() / "latency-bound"), help="output path without extension")
    a = ap.parse_args(argv)
    if any("=" not in e for e in a.extra):
        ap.error("--extra takes NAME=RUN pairs")
    extra = dict(e.split("=", 1) for e in a.extra)
    torch.manual_seed(0)
    dd1 = onestep.load(a.dd1, device=a.device)
    mapkd = onestep.load(a.mapkd, device=a.device)
    dd2 = onestep.load(a.dd2, device=a.device)
    teacher, _, tokenizer = load_teacher(a.teacher, a.device)
    rule = {k: getattr(mapkd.spec, k) for k in RULE_FIELDS}  # the rule MapKD was distilled under (CFG): the teacher row
    t_sampler = teacher_sampler(teacher, tokenizer, SamplingConfig(**rule))
    s1 = dd1.sampler()
    s2 = mapkd.sampler()
    s3 = dd2.sampler()
    g = torch.Generator(device=a.device).manual_seed(0)
    labels = lambda b: torch.arange(b, device=a.device) % teacher.num_classes  # noqa: E731
    bound = bound_sampler(teacher, tokenizer, a.device)
    fns = {"one-forward bound": lambda b: bound(labels(b), g),
           "teacher (CFG, KV cache)": lambda b: t_sampler.images(labels(b), g),
           "dd1-1step": lambda b: s1.images(labels(b), g),
           "mapkd-1step": lambda b: s2.images(labels(b), g),
           "dd2-1step": lambda b: s3.images(labels(b), g)}
    more = {name: onestep.load(run, device=a.device).sampler() for name, run in extra.items()}
    fns.update({name: (lambda s: lambda b: s.images(labels(b), g))(s) for name, s in more.items()})
    res = measure(fns, batch_sizes=tuple(a.batch_sizes), warmup=a.warmup, repeats=a.repeats,
                  reference="teacher (CFG, KV cache)", device=a.device)
    params = {"one-forward bound": num_params(teacher, tokenizer), "teacher (CFG, KV cache)": num_params(teacher, tokenizer),
              "dd1-1step": s1.params, "mapkd-1step": s2.params, "dd2-1step": s3.params,
              **{name: s.params for name, s in more.items()}}
    bound_row = next(r for r in res["rows"] if r["method"] == "one-forward bound")
    for r in res["rows"]:
        r["params"] = params[r["method"]]
        for b in a.batch_sizes:
            r[f"x_bound_b{b}"] = r[f"latency_b{b}_s"] / bound_row[f"latency_b{b}_s"]
    res.update(command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               commit=git_commit(), teacher=a.teacher, dd1=a.dd1, mapkd=a.mapkd, dd2=a.dd2, extra=extra, sampling=rule,
               bound="one teacher-forcing pass over the whole sequence (backbone + logits, argmax) + the decoder")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    bs = a.batch_sizes
    lines = ["# One-step latency against the one-forward bound", "",
             f"- command: `{res['command']}`", f"- commit: `{res['commit']}`",
             f"- machine: {json.dumps(res['machine'])}",
             f"- models: teacher `{a.teacher}` (the bound and the teacher row), DD1 `{a.dd1}`, DD2 `{a.dd2}`, "
             f"DD2 by CSD `{a.dd2_csd}`; " + "".join(f"{k} `{v}`; " for k, v in extra.items()) +
             f"teacher rule {rule}",
             f"- bound: {res['bound']}",
             f"- timing: {res['timing']}, {a.warmup} warm-up calls, {a.repeats} repeats, labels to uint8 images", "",
             "| method | params | " + " | ".join(f"latency b={b} (ms) | x bound b={b} | speed-up b={b}" for b in bs) + " |",
             "|---|---|" + "---|---|---|" * len(bs)]
    for r in res["rows"]:
        cells = [f"{r[f'latency_b{b}_s'] * 1e3:.1f} | {r[f'x_bound_b{b}']:.2f} | {r[f'speedup_b{b}']:.1f}x" for b in bs]
        lines.append(f"| {r['method']} | {r['params'] / 1e6:.2f}M | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
