"""Every one-step method under the same multi-step samplers: the shipped DD1, MapKD and DD2 generators in 1 to 4
steps, each multi-step row under ``alg4`` (the teacher re-samples the last k - 1 AR steps) and ``jacobi`` (k - 1
parallel teacher passes re-mapping the same noise), and DD1 under its own rule too (``dd1``); the teacher beside them.
Same labels, seed and sample count in every row (docs/method.md, "Multi-step sampling").

    OMP_NUM_THREADS=1 python benchmarks/multistep.py              # resumes: one JSON file per row
    OMP_NUM_THREADS=1 python benchmarks/multistep.py -n 2000 --seed 1 --out benchmarks/results/multistep-seed1

Writes benchmarks/results/multistep.{json,md} and one JSON per row in benchmarks/results/multistep/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shipped_multistep import RESULTS, evaluate_rows  # noqa: E402

# each method's samplers (the first is its default)
SAMPLERS = {"dd1": ("dd1", "alg4", "jacobi"), "mapkd": ("jacobi", "alg4"), "dd2": ("alg4", "jacobi")}


def rows(root: Path, ks: tuple[int, ...]) -> list[tuple]:
    out = [("teacher", root / "teacher", "assets/fashion-mnist/teacher", 1, None)]
    for method, samplers in SAMPLERS.items():
        run, shown = root / method, f"assets/fashion-mnist/{method}"
        out.append((f"{method}-1step", run, shown, 1, None))
        out += [(f"{method}-{rule}-{k}step", run, shown, k, rule) for rule in samplers for k in ks]
    return out


def main(argv=None) -> dict:
    from onestep.paths import assets_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2000, help="samples per row (classifier FID; default: 2000)")
    p.add_argument("--n-inception", type=int, default=0, help="of which scored by Inception-v3 (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (default: 0)")
    p.add_argument("--steps", type=int, nargs="+", default=[2, 3, 4], help="multi-step counts (default: 2 3 4)")
    p.add_argument("--out", default=str(RESULTS / "multistep"), help="output path without extension")
    a = p.parse_args(argv)
    return evaluate_rows(rows(assets_dir() / "fashion-mnist", tuple(a.steps)), a.n, a.n_inception, a.seed,
                         Path(a.out), "Every method under the same multi-step samplers")


if __name__ == "__main__":
    main()
