"""The flow map's push-forward on the ladder's codebooks: N(0, I) mapped under a fixed distribution p, against p.

    OMP_NUM_THREADS=1 python lab/studies/ode_pushforward.py      # -> lab/results/ode-pushforward.{json,md}

For three random p per codebook (softmax of 1.5 x standard normal logits), 200k noise draws are mapped by the flow
recipe's ODE (``FlowConfig().ode``: 16 ``ab2log`` steps on the codebook's grid), by 32 and 64 steps on the same grid,
and by a converged reference (512 steps on [0.01, 2000], float64); each histogram's TV to p is set beside the floor,
the TV of 200k draws of p itself. A map whose TV sits at the floor is exact at this sample size.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402
from dd2_ladder import make_teacher  # noqa: E402

from onestep.flow_map import ODEConfig, ode_map  # noqa: E402
from onestep.mapkd.train import MapKDConfig as FlowConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
N = 200_000


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return round(0.5 * (counts / counts.sum() - p).abs().sum().item(), 4)


def main() -> dict:
    torch.set_num_threads(1)
    rows = []
    for rung in ("v4-n1-c2-random", "v6-n3-c3-random"):  # the 2-D and the 3-D codebooks of the ladder
        cb = make_teacher(rung).codebook()
        V = cb.shape[0]
        maps = {"recipe (16 steps)": FlowConfig().ode(cb), "32 steps": FlowConfig(ode_steps=32).ode(cb),
                "64 steps": FlowConfig(ode_steps=64).ode(cb),
                "reference": ODEConfig(solver="ab2log", n_steps=512, s_min=0.01, s_max=2000.0, dtype="float64")}
        g = torch.Generator().manual_seed(0)
        for trial in range(3):
            p = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
            eps = torch.randn(N, cb.shape[1], generator=g)
            row = {"codebook": f"{V} codes, {cb.shape[1]}-D ({rung})", "p": [round(x, 3) for x in p.tolist()],
                   "floor": tv(torch.bincount(torch.multinomial(p, N, True, generator=g), minlength=V).double(), p)}
            for name, ode in maps.items():
                row[name] = tv(torch.bincount(ode_map(eps, p.log().expand(N, V), cb, ode), minlength=V).double(), p)
            rows.append(row)
            print(row, flush=True)
    result = {**provenance(), "n": N, "rows": rows}
    write_results(RESULTS / "ode-pushforward", result, "The flow map's push-forward on the ladder's codebooks")
    return result


if __name__ == "__main__":
    main()
