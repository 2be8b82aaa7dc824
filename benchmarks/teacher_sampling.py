"""Teacher sampling speed: latency at batch 1 and throughput at batch 64, with and without the KV cache.

Both variants run side by side in one process (round-robin repeats), so the ratio is fair. Writes
``benchmarks/results/teacher-sampling.json`` and ``.md`` with the command and the commit.

    python benchmarks/teacher_sampling.py --teacher runs/demo/teacher [--repeats 5]
    python benchmarks/teacher_sampling.py --preset small            # random weights of a preset
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from onestep.eval.speed import measure
from onestep.teacher.sampling import SamplingConfig, sample_tokens

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import provenance, write_results  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="teacher run directory (default: random weights of --preset)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(HERE / "results" / "teacher-sampling"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.teacher:
        from onestep.teacher.load import load_teacher

        teacher, _, _ = load_teacher(args.teacher)
        source = args.teacher
    else:
        from onestep.teacher.llamagen import GPT, model_args

        torch.manual_seed(0)
        teacher = GPT(model_args(args.preset)).eval()
        for p in teacher.parameters():  # non-degenerate logits (a fresh model has a zero head)
            torch.nn.init.normal_(p, std=0.02)
        source = f"random weights, preset {args.preset}"
    cfg = SamplingConfig(cfg_scale=args.cfg_scale, top_k=args.top_k)

    def sampler(use_cache):
        def run(batch_size: int):
            labels = torch.arange(batch_size) % teacher.num_classes
            return sample_tokens(teacher, labels, cfg, torch.Generator().manual_seed(0), use_cache=use_cache)
        return run

    bs = tuple(int(b) for b in args.batch_sizes.split(","))
    res = measure({"teacher-kv-cache": sampler(True), "teacher-no-cache": sampler(False)}, batch_sizes=bs,
                  warmup=args.warmup, repeats=args.repeats, reference="teacher-kv-cache")
    out = {"benchmark": "teacher-sampling", "teacher": source, "seq_len": teacher.seq_len,
           "params": sum(p.numel() for p in teacher.parameters()), "sampling": cfg.to_dict(), **res, **provenance()}
    write_results(args.out, out, title="Teacher sampling: KV cache vs full recompute")
    print(f"wrote {args.out}.json / .md")


if __name__ == "__main__":
    main()
