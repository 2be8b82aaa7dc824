"""Accuracy and cost of the noise-to-token ODE map's solvers on the shipped models' conditionals.

MapKD's generator maps every position's noise through ``onestep.flow_map.ode_map`` in training and in
sampling, so the ODE's step count is part of its one-step latency, and the map's accuracy is part of its exactness
(the push-forward of N(0, I) is softmax(l) only for the exact ODE). For each solver configuration this script
reports the fraction of tokens that differ from a converged reference (AB2, 1024 steps, float64), an upper bound on
the per-token total variation of the push-forward, and the median time of the map alone at batch 1 and 64 (n = 49
positions of 512 codes each), on two sets of conditionals:

- ``generator``: the shipped MapKD generator's softmax(l_i) at its own noise (what MapKD maps);
- ``teacher``: the teacher's CFG conditionals teacher-forced on those samples (what DD1's map follows).

    OMP_NUM_THREADS=2 python benchmarks/ode_solvers.py            # benchmarks/results/ode-solvers.{json,md}
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance, write_results  # noqa: E402

from onestep.flow_map import ODEConfig, codebook_grid, ode_map  # noqa: E402
from onestep.mapkd.sampling import load_mapkd  # noqa: E402
from onestep.paths import assets_dir, results_dir  # noqa: E402
from onestep.teacher.sampling import teacher_log_probs  # noqa: E402

def configs(codebook) -> dict:
    """The solvers compared: ``ab2`` on the default grid (DD1's), ``ab2log`` on the codebook's grid (MapKD's), and both at equal step counts on either grid."""
    s_min, s_max = codebook_grid(codebook)
    grid = f"[{s_min:.2f}, {s_max:.1f}]"
    rows = {"ab2-200 [0.05, 500] (DD1's pairs)": ODEConfig(),
            "euler-32 [0.05, 500]": ODEConfig(solver="euler", n_steps=32)}
    for n in (32, 16):
        rows[f"ab2-{n} [0.05, 500]"] = ODEConfig(n_steps=n)
    rows[f"ab2-16 {grid}"] = ODEConfig(n_steps=16, s_min=s_min, s_max=s_max)
    rows["ab2log-16 [0.05, 500]"] = ODEConfig(solver="ab2log", n_steps=16)
    for n in (32, 24, 16, 12, 8):
        rows[f"ab2log-{n} {grid}" + (" (MapKD's)" if n == 16 else "")] = ODEConfig(
            solver="ab2log", n_steps=n, s_min=s_min, s_max=s_max)
    return rows


def median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


@torch.no_grad()
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mapkd", default=str(assets_dir() / "fashion-mnist" / "mapkd"), help="a MapKD run or export")
    ap.add_argument("--sequences", type=int, default=256, help="sequences whose tokens are compared")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(results_dir() / "ode-solvers"))
    a = ap.parse_args(argv)
    gen, teacher, _, sampling = load_mapkd(a.mapkd)
    g = torch.Generator().manual_seed(a.seed)
    eps = torch.randn(a.sequences, *gen.noise_shape, generator=g)
    labels = torch.arange(a.sequences) % teacher.num_classes
    cb = gen.codebook()
    log_q = gen.log_probs(eps, labels)
    ids = gen.sample_ids(eps, labels)
    sets = {"generator": log_q, "teacher": teacher_log_probs(teacher, ids, labels, sampling)}
    reference = ODEConfig(n_steps=1024, dtype="float64")
    refs = {k: ode_map(eps, lp, cb, reference) for k, lp in sets.items()}
    rows = []
    for name, cfg in configs(teacher.codebook()).items():
        row = {"solver": name, "nfe": cfg.nfe}
        for k, lp in sets.items():
            row[f"token_error_{k}"] = (ode_map(eps, lp, cb, cfg) != refs[k]).float().mean().item()
        for b in (1, 64):
            row[f"ms_b{b}"] = median_ms(lambda: ode_map(eps[:b], log_q[:b], cb, cfg), a.repeats)
        rows.append(row)
        print(row, flush=True)
    result = {**provenance(), "model": a.dd2, "sequences": a.sequences, "positions": int(eps.shape[1]),
              "codes": int(cb.shape[0]), "reference": reference.to_dict(), "rows": rows}
    write_results(a.out, result, "The ODE map's solvers: token errors against a converged reference, and time")
    return result


if __name__ == "__main__":
    main()
