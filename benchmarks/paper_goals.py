"""The papers' claims checked on a pipeline's measurements, and the CSD-initialisation table (Table 4).

    python benchmarks/paper_goals.py                                   # the bench: benchmarks/results/paper-table.json
    python benchmarks/paper_goals.py --metrics runs/bench/metrics.json --out /tmp/goals

Reads the rows and the training cost that ``onestep bench`` / ``onestep demo`` write into metrics.json, and Table 4
from benchmarks/results/dd2-init-ablation.json (``benchmarks/dd2_init_ablation.py``, on the tabular teacher). Writes
``OUT.json`` and ``OUT.md`` (default benchmarks/results/paper-goals).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance  # noqa: E402


def goals(by: dict[str, dict], cost: dict) -> dict:
    """The papers' claims checked on the rows (by method) and the cost: each goal's figures and whether it holds."""
    out = {}
    t, d1, d2 = by.get("teacher"), by.get("dd1-1step"), by.get("dd2-1step")
    if t and d1 and d2:
        gap1, gap2 = d1["fid_classifier"] - t["fid_classifier"], d2["fid_classifier"] - t["fid_classifier"]
        out["dd2_gap_le_third_of_dd1_gap"] = {"dd1_gap": gap1, "dd2_gap": gap2, "ratio": gap2 / gap1 if gap1 else None,
                                              "holds": bool(gap2 <= gap1 / 3)}
        if d2.get("speedup_b1") is not None:
            out["speedup_b1_ge_20x"] = {"speedup_b1": d2["speedup_b1"], "holds": bool(d2["speedup_b1"] >= 20)}
    if by.get("dd2-3step") and by.get("dd1-2step"):
        out["dd2_3step_beats_dd1_2step"] = {"dd2_3step": by["dd2-3step"]["fid_classifier"],
                                            "dd1_2step": by["dd1-2step"]["fid_classifier"],
                                            "holds": bool(by["dd2-3step"]["fid_classifier"] < by["dd1-2step"]["fid_classifier"])}
    if cost.get("dd2_total_s") is not None and cost.get("dd1_total_s") is not None:
        out["dd2_train_time_le_dd1"] = {"dd2_total_s": cost["dd2_total_s"], "dd1_total_s": cost["dd1_total_s"],
                                        "holds": bool(cost["dd2_total_s"] <= cost["dd1_total_s"])}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", default=str(RESULTS / "paper-table.json"), help="a pipeline's metrics.json")
    p.add_argument("--init-ablation", default=str(RESULTS / "dd2-init-ablation.json"))
    p.add_argument("--out", default=str(RESULTS / "paper-goals"), help="output path without extension")
    a = p.parse_args(argv)
    table = json.loads(Path(a.metrics).read_text())
    shown = os.path.relpath(a.metrics, Path(__file__).resolve().parents[1])  # as the checkout names it
    abl = Path(a.init_ablation)
    res = {**provenance(), "metrics": shown, "metrics_commit": table.get("commit"),
           "goals": goals({r["method"]: r for r in table["rows"]}, table.get("cost", {})),
           "init_ablation": json.loads(abl.read_text()) if abl.exists() else None}
    md = ["# The papers' goals at small scale", "", f"- command: `{res['command']}`", f"- commit: `{res['commit']}`",
          f"- measurements: `{shown}` (commit `{res['metrics_commit']}`)", "",
          "| goal | holds | figures |", "|---|---|---|"]
    md += [f"| {k} | {'yes' if v['holds'] else 'no'} | {json.dumps({x: y for x, y in v.items() if x != 'holds'})} |"
           for k, v in res["goals"].items()]
    if res["init_ablation"]:
        md += ["", "## Table 4: CSD's initialisation (the tabular teacher, TV to its exact joint)", "",
               f"`{res['init_ablation']['command']}`", "",
               "| stage-1 init | DD2 raw | DD2 EMA | init as a one-step generator |", "|---|---|---|---|"]
        md += [f"| {r['init']} | {r['tv_dd2']:.4f} | {r['tv_dd2_ema']:.4f} | {r['tv_init']:.4f} |"
               for r in res["init_ablation"]["rows"]]
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return res


if __name__ == "__main__":
    main()
