"""The flow recipe on the tabular ladder at three training budgets: TV against the exact joint, and its cost.

    OMP_NUM_THREADS=1 python benchmarks/dd2_flow_ladder.py      # -> benchmarks/results/dd2-flow-ladder.{json,md}
    OMP_NUM_THREADS=1 python benchmarks/dd2_flow_ladder.py --variants-only   # re-runs the variants, keeps the rows

Each rung's generator is the ladder's causal MLP backbone with a linear logits head, its tokens the recipe's ODE map
(``FlowConfig().ode`` on the codebook's grid), trained on the forward KL to the teacher's conditionals at its own
samples (``dd2_guidance_estimates.flow_row``: batch 256, cosine LR). Budgets: 1500 steps at LR 3e-3, 6000 and 12000
steps at LR 1e-2. TV on 200k samples against the floor (the teacher's own 200k samples); the ladder's goal is at most
2x the floor. ``train_s`` is CPU seconds (one thread); ``dd1_train_s`` is DD1's generator training on the same rung
(``dd2-ladder.json``, the map recipe's rows), the cost to compare with. Variants: on v4-n2 at the first budget, a 4x
wider backbone and a 4x larger batch; the third and fourth rungs at 24000 steps.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance, write_results  # noqa: E402
from dd2_guidance_estimates import flow_row  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNGS = ("v4-n1-c2-random", "v4-n2-c2-random", "v4-n3-c2-random", "v6-n3-c3-random", "v6-n5-c3-random")
BUDGETS = ((1500, 3e-3), (6000, 1e-2), (12000, 1e-2))
VARIANTS = (("v4-n2-c2-random", {"width": 256}), ("v4-n2-c2-random", {"batch": 1024}))
LONGER = (("v4-n3-c2-random", 24000, 1e-2), ("v6-n3-c3-random", 24000, 1e-2))  # twice the last budget


def row(rung: str, ladder: dict, steps: int, lr: float, **kw) -> dict:
    r = flow_row(rung, steps=steps, lr=lr, **kw)
    out = {"rung": rung, "steps": steps, "lr": lr, "batch": kw.get("batch", 256), "width": kw.get("width", "default"),
           "tv": r["tv"], "floor": r["floor"], "tv_over_floor": round(r["tv"] / r["floor"], 2),
           "train_s": r["train_s"], "dd1_train_s": ladder.get(rung, {}).get("dd1_train_s")}
    print(out, flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants-only", action="store_true", help="keep the budget rows of the last run")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ladder = {r["rung"]: r for r in json.loads((RESULTS / "dd2-ladder.json").read_text())["table"]
              if r["recipe"] == "map"}
    if a.variants_only:
        rows = json.loads((RESULTS / "dd2-flow-ladder.json").read_text())["rows"]
    else:
        rows = [row(rung, ladder, steps, lr) for rung in RUNGS for steps, lr in BUDGETS]
    variants = [row(rung, ladder, 1500, 3e-3, **kw) for rung, kw in VARIANTS]
    variants += [row(rung, ladder, steps, lr) for rung, steps, lr in LONGER]
    result = {**provenance(), "n_eval": 200_000, "rows": rows, "variants": variants}
    write_results(RESULTS / "dd2-flow-ladder", result, "DD2's flow recipe on the tabular ladder")
    return result


if __name__ == "__main__":
    main()
