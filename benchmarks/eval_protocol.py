"""Two checks of the evaluation protocol, (benchmarks/results/eval-protocol.{json,md}).

1. The data floor against the sample size: real TEST images scored against the TRAIN reference, as each row is.
   FID's bias grows as the sample shrinks, so the floor beside a table must use the rows' sample size (it used
   all 10,000 test images beside rows of 1,000-2,000 samples).
2. DD1 on its own training noise: with the old evaluation seed rule (batch b drawn from seed b), seed 0's batch b
   drew exactly the noise of DD1's pair shard b. A DD1 run is scored on that noise and on fresh noise
   (``rng.stream_seed``, three seeds), on the same balanced labels.

    python benchmarks/eval_protocol.py --dd1 runs/quick/dd1 -n 1000
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("fid_classifier", "inception_score", "precision", "recall", "class_accuracy")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dd1", required=True, help="a DD1 run directory trained on pairs of seed 0")
    p.add_argument("-n", type=int, default=1000, help="samples per DD1 evaluation (a multiple of 250)")
    p.add_argument("--floor-n", type=int, nargs="+", default=[1000, 2000, 10000])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/eval-protocol"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from onestep import rng
    from onestep.eval.evaluate import Evaluator
    from onestep.methods import build_sampler
    from onestep.samplers import class_labels

    ev = Evaluator("fashion-mnist")
    floor = [{"n_test": n, **{k: round(v, 3) for k, v in ev.data_floor(n_inception=0, n_test=n).items() if k in KEYS}}
             for n in a.floor_n]
    for r in floor:
        print("floor", r, flush=True)
    s, labels, batch = build_sampler("dd1", a.dd1), class_labels(a.n, 10), 250
    dd1 = []
    for name, seed_of in (("old rule: seed b (DD1's training shard b)", lambda b: b),
                          *((f"stream_seed({k}, b)", lambda b, k=k: rng.stream_seed(k, b)) for k in range(3))):
        imgs = [s.decode(s.sample(labels[b * batch:(b + 1) * batch], torch.Generator().manual_seed(seed_of(b))))
                for b in range(a.n // batch)]
        r = ev.evaluate(torch.cat(imgs), labels, n_inception=0)
        dd1.append({"noise": name, **{k: round(r[k], 3) for k in KEYS}})
        print(dd1[-1], flush=True)
    res = {**provenance(), "dd1_run": a.dd1, "n": a.n, "data_floor": floor, "dd1_noise": dd1}
    write_results(a.out, res, "Evaluation protocol: the data floor's sample size, DD1 on its training noise")
    return res


if __name__ == "__main__":
    main()
