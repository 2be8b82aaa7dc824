"""The papers' claims checked on a pipeline's measurements, and the CSD-initialisation table (Table 4).

    python benchmarks/paper_goals.py                                   # the bench: benchmarks/results/paper-table.json
    python benchmarks/paper_goals.py --metrics runs/bench/metrics.json --out /tmp/goals

Reads the rows and the training cost that ``onestep bench`` / ``onestep demo`` write into metrics.json, and Table 4
from lab/results/dd2-init-ablation.json (``lab/studies/dd2_init_ablation.py``, on the tabular teacher). Writes
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


# the distilled methods of a pipeline, each against DD1: its 1-step row, its 3-step row (its default multi-step
# sampler), and the cost keys of its total training time in wall and in CPU seconds (None: not recorded; stage 0
# records no CPU time), against DD1's pairs + training
METHODS = {"DD2 (paper recipe)": ("dd2-1step", "dd2-alg4-3step", ("dd2_total_s",), None),
           "MapKD": ("mapkd-1step", "mapkd-jacobi-3step", ("mapkd_s",), ("mapkd_cpu_s",))}
DD1_COST = {"wall": ("dd1_total_s",), "cpu": ("dd1_pairs_cpu_s", "dd1_train_cpu_s")}
# the papers' gap ratios, DD2's gap to the teacher over DD1's (classifier FID): LlamaGen-L raster, VAR-d20
PAPER_GAP_RATIOS = {"raster": 0.62, "var": 0.33}


def _fid(row: dict) -> float:
    """A row's headline classifier FID: on the headline sample count where measured, else on the row count."""
    return row.get("fid_classifier_10000") or row["fid_classifier"]


def goals(by: dict[str, dict], cost: dict) -> dict:
    """The papers' claims checked on the rows (by method) and the cost, for each distilled method of the pipeline
    (:data:`METHODS`): each goal's figures and whether it holds."""
    out = {}
    t, d1, d1_2 = by.get("teacher"), by.get("dd1-1step"), by.get("dd1-2step")
    for recipe, (one, three, wall_keys, cpu_keys) in METHODS.items():
        d2, d2_3 = by.get(one), by.get(three)
        if t and d1 and d2:
            gap1, gap2 = _fid(d1) - _fid(t), _fid(d2) - _fid(t)
            ratio = gap2 / gap1 if gap1 else None
            out[f"{recipe}: 1-step below DD1 1-step"] = {"dd2": _fid(d2), "dd1": _fid(d1),
                                                         "holds": bool(_fid(d2) < _fid(d1))}
            for paper, bound in PAPER_GAP_RATIOS.items():
                out[f"{recipe}: gap ratio <= {bound} ({paper})"] = {"dd1_gap": gap1, "dd2_gap": gap2, "ratio": ratio,
                                                                   "holds": bool(ratio is not None and ratio <= bound)}
            if d2.get("speedup_b1") is not None:
                out[f"{recipe}: speedup at batch 1 >= 20x"] = {"speedup_b1": d2["speedup_b1"],
                                                               "holds": bool(d2["speedup_b1"] >= 20)}
        if d2_3 and d1_2:
            holds = _fid(d2_3) < _fid(d1_2)
            fig = {"dd2_3step": _fid(d2_3), "dd1_2step": _fid(d1_2)}
            if d2_3.get("fid_inception") is not None and d1_2.get("fid_inception") is not None:
                fig.update(dd2_3step_inception=d2_3["fid_inception"], dd1_2step_inception=d1_2["fid_inception"])
                holds = holds and d2_3["fid_inception"] < d1_2["fid_inception"]
            out[f"{recipe}: 3-step below DD1 2-step"] = {**fig, "holds": bool(holds)}
        for clock, keys in (("wall", wall_keys), ("cpu", cpu_keys)):
            mine, dd1 = [cost.get(k) for k in keys or ("-",)], [cost.get(k) for k in DD1_COST[clock]]
            if None not in mine + dd1:
                out[f"{recipe}: training {clock} time <= DD1's"] = {"dd2_s": sum(mine), "dd1_s": sum(dd1),
                                                                   "holds": bool(sum(mine) <= sum(dd1))}
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
    md += [f"| {k} | {'yes' if v['holds'] else 'no'} | "
           f"{json.dumps({x: round(y, 4) if isinstance(y, float) else y for x, y in v.items() if x != 'holds'})} |"
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
