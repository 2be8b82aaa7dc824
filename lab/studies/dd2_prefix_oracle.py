"""Where the flow recipe's error arises on the ladder's upper rungs, and what exact prefix tokens would buy.

    OMP_NUM_THREADS=1 python lab/studies/dd2_prefix_oracle.py      # -> lab/results/dd2-prefix-oracle.{json,md}

For each row: the TV of the joint of the first k positions (k = 1..n) against the teacher's, beside the sampling floor
of the same prefix (200k samples each), on the ladder's five-position rungs (random and near-deterministic tables;
rows the last results hold are kept, so the command resumes). Rows (``_TabularFlow.prefix_codes``):
- "map": the one-step prefix codes (DD1's map under the running marginal);
- "staged": one pass through two networks, the second reading the codes the map gives under the first one's logits;
- "map+1", "map+2": two or three passes of the same network, each reading the codes the map gives under the previous
  pass's logits;
- "tokens": an oracle, not a one-step generator: the backbone reads the generator's own tokens at the earlier
  positions (found by n - 1 passes without gradient).
If the oracle reaches the floor at this width and budget, the remaining gap of the one-step rows is the quality of
their guess of the earlier tokens; if not, it is the backbone's capacity or the optimisation.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402
from dd2_guidance_estimates import N_EVAL, flow_row  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
MODES = ("map", "staged", "map+1", "tokens")
ROWS = [("v6-n5-c3-random", {"prefix_codes": m, "width": 256, "lr": 3e-3}) for m in MODES]  # flow_row's keywords
ROWS += [("v6-n5-c3-peaked", {"prefix_codes": m, "width": 256, "lr": 3e-3})
         for m in ("staged", "map+1", "map+2", "tokens")]
STEPS = 6000


def main() -> dict:
    """Runs the rows the last results lack (a row is its rung and prefix codes) and keeps the others."""
    torch.set_num_threads(1)
    out = RESULTS / "dd2-prefix-oracle.json"
    done = {(r["rung"], r["prefix_codes"]): r for r in (json.loads(out.read_text())["rows"] if out.exists() else [])}
    rows = []
    for rung, kw in ROWS:
        if (rung, kw["prefix_codes"]) in done:
            rows.append(done[rung, kw["prefix_codes"]])
            continue
        r = flow_row(rung, steps=STEPS, **kw)
        rows.append({"rung": rung, **kw, "steps": STEPS, "tv": r["tv"], "floor": r["floor"],
                     "tv_over_floor": round(r["tv"] / r["floor"], 2), "tv_prefix": r["tv_prefix"],
                     "floor_prefix": r["floor_prefix"], "train_s": r["train_s"]})
        print(rows[-1], flush=True)
    result = {**provenance(), "n_eval": N_EVAL, "rows": rows}
    write_results(RESULTS / "dd2-prefix-oracle", result, "The flow recipe's error by prefix length, and an oracle")
    return result


if __name__ == "__main__":
    main()
