"""Table 4 of the DD2 paper at tiny scale: CSD's initialisation, on the tabular teacher of the exactness check.

    OMP_NUM_THREADS=1 python lab/studies/dd2_init_ablation.py [--rerun]

Stage 2 (CSD, the tested configuration of ``TabularRunConfig``) starts from a stage-1 model tuned with the
GTS loss (DD2), with the ordinary diffusion loss (Monte-Carlo target), or from fresh networks (no stage 1).
Each variant is ``lab/dd2_tabular_example.py --seed 0 --tune-loss V``; its output is re-used when present
(``--rerun`` runs it again). Metric: TV between the one-step generator's quantised joint (20k samples)
and the teacher's exact joint. Writes lab/results/dd2-init-ablation.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RES = ROOT / "benchmarks" / "results"
VARIANTS = {"gts": RES / "dd2-tabular", "dsm": RES / "dd2-init-ablation-dsm", "none": RES / "dd2-init-ablation-none"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rerun", action="store_true")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "examples"))
    import dd2_tabular

    rows = []
    for v, stem in VARIANTS.items():
        if a.rerun or not stem.with_suffix(".json").exists():
            out = stem.relative_to(ROOT) if Path.cwd().resolve() == ROOT else stem  # a portable command line
            dd2_tabular.main(["--seed", "0", "--tune-loss", v, "--out", str(out)])
        d = json.loads(stem.with_suffix(".json").read_text())
        r = next(r for r in d["runs"] if r.get("seed", d["config"].get("seed")) == 0) if len(d["runs"]) > 1 else d["runs"][0]
        rows.append({"init": v, "tv_dd2": r["tv_dd2"], "tv_dd2_ema": r["tv_dd2_ema"], "tv_init": r["tv_gts_init"],
                     "tv_onestep_star": r["tv_onestep_star"], "tv_noise_floor": r["tv_teacher_samples"],
                     "source": stem.name + ".json", "command": d["command"], "commit": d["commit"]})
    out = {"command": "python " + " ".join(["lab/studies/dd2_init_ablation.py", *(argv or sys.argv[1:])]),
           "metric": "TV to the exact joint, 20k samples, seed 0", "rows": rows}
    stem = RES / "dd2-init-ablation"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    md = ["# Table 4 (tiny scale): CSD's initialisation, tabular teacher", "", f"Command: `{out['command']}`", "",
          "| stage-1 init | DD2 raw | DD2 EMA | init as a one-step generator | onestep* | noise floor | made by (commit) |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['init']} | {r['tv_dd2']:.4f} | {r['tv_dd2_ema']:.4f} | {r['tv_init']:.4f} | {r['tv_onestep_star']:.4f} | "
           f"{r['tv_noise_floor']:.4f} | `{r['command']}` ({r['commit']}) |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return out


if __name__ == "__main__":
    main()
