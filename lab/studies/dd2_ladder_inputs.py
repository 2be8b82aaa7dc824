"""What the flow recipe's backbone reads on the ladder's upper rungs: the inputs that tell it which code each earlier
position landed on, against the raw noise and a larger network.

    OMP_NUM_THREADS=1 python lab/studies/dd2_ladder_inputs.py      # -> lab/results/dd2-ladder-inputs.{json,md}

Row i's logits must be a piecewise-constant function of eps_<i whose cells are those of the map under the earlier
rows' own logits. Each row below changes one thing of the flow recipe's tabular generator
(``dd2_guidance_estimates.flow_row``, 6000 steps at LR 1e-2 unless given): the backbone's input gain or width, or the
codes of the earlier positions beside their noise (``_TabularFlow.prefix_codes``: DD1's map under the generator's
running marginal, the same under the uniform prior or with a 4-step ODE, learnt soft Laguerre cells). DD1's
generator on the same backbone and budget (``dd2_flow_ladder.dd1_row``) is the reference. TV on 200k samples; the
floor is the teacher's own 200k samples, the ladder's goal 2x the floor; ``train_s`` CPU seconds on one thread.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402
from dd2_flow_ladder import dd1_row  # noqa: E402
from dd2_guidance_estimates import N_EVAL, flow_row  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
V6N3, V6N5 = "v6-n3-c3-random", "v6-n5-c3-random"
ROWS = [  # (rung, what the row changes, flow_row's keywords)
    (V6N3, "the recipe (raw noise, width 64, input gain 8)", {}),
    (V6N3, "width 256", {"width": 256}),
    (V6N3, "learnt soft Laguerre cells", {"prefix_codes": "soft-laguerre"}),
    (V6N3, "map codes under the uniform prior", {"prefix_codes": "map-uniform"}),
    (V6N3, "map codes, 4-step ODE", {"prefix_codes": "map-4"}),
    (V6N3, "map codes under the running marginal", {"prefix_codes": "map"}),
    (V6N5, "width 256, LR 3e-3", {"width": 256, "lr": 3e-3}),
    (V6N5, "map codes, width 256, LR 3e-3", {"prefix_codes": "map", "width": 256, "lr": 3e-3}),
]
STEPS, LR = 6000, 1e-2


def main() -> dict:
    torch.set_num_threads(1)
    rows = []
    for rung, what, kw in ROWS:
        r = flow_row(rung, steps=STEPS, **{"lr": LR, **kw})
        rows.append({"rung": rung, "generator": "flow recipe", "change": what, "tv": r["tv"], "floor": r["floor"],
                     "tv_over_floor": round(r["tv"] / r["floor"], 2), "train_s": r["train_s"]})
        print(rows[-1], flush=True)
    for rung in (V6N3,):
        r = dd1_row(rung, STEPS, LR)
        floor = next(x["floor"] for x in rows if x["rung"] == rung)
        rows.append({"rung": rung, "generator": "DD1 (same backbone, 200k exact pairs)", "change": "-", "tv": r["tv"],
                     "floor": floor, "tv_over_floor": round(r["tv"] / floor, 2), "train_s": r["train_s"]})
    result = {**provenance(), "n_eval": N_EVAL, "steps": STEPS, "rows": rows}
    write_results(RESULTS / "dd2-ladder-inputs", result, "The flow recipe's backbone inputs on the ladder")
    return result


if __name__ == "__main__":
    main()
