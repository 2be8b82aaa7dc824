"""Training CPU of DD1, MapKD and DD2 (the paper's recipe), measured side by side on one thread.

    OMP_NUM_THREADS=1 python benchmarks/training_cost.py     # -> benchmarks/results/training-cost.{json,md}

CPU seconds measured while other jobs share the cores come out inflated, by different amounts for runs made at
different times. This script measures each recipe's cost per unit of work in one process tree, one after the
other, on the shipped teacher with the `small` presets, and scales it to the presets' lengths:

- DD1's pairs: ``onestep dd1 pairs -n 1024`` (CPU per pair from its manifest) x 12000 pairs;
- DD1's training: ``onestep dd1 train`` grown from 5 to 65 steps (CPU of the 60 steps, ``metrics.json``) x 900;
- MapKD: ``onestep mapkd train`` grown from 5 to 65 steps x 600;
- the same with prefix codes (``--prefix-codes``, their map at 16 and at 4 ODE steps) x 600;
- DD2's three stages, each grown from 5 to 65 steps: ``onestep dd2 adapt`` (stage 0, x 600), ``dd2 tune`` (stage 1,
  x 400, CFG 2.0; every step timed with the backbone training, an upper bound for the preset's first 50 head-only
  steps), ``dd2 train --preset paper`` (stage 2, CSD, per generator update with its guidance updates,
  x 8000, the paper preset's length). Stages 0 and 1 also have a fixed cost, counted once: stage 0's regression fit
  and NLL acceptance check, stage 1's pool of teacher samples (the CPU of the 5-step run less its 5 steps).

Each per-step figure comes from two fresh runs, of 5 and of 65 steps. The first 5 steps (start-up, first allocations) are left out of the per-step figure. The machine's load average
while it ran is recorded (``load_avg``): CPU seconds taken beside other jobs come out inflated.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TEACHER = "assets/fashion-mnist/teacher"
FIRST, LAST = 5, 65


def onestep(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "onestep", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def cpu(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["cpu_time_s"]


def per_step(cmd: list[str], run: Path) -> float:
    return grown(cmd, run)[0]


def grown(cmd: list[str], run: Path) -> tuple[float, float]:
    """(CPU per step, fixed CPU): two fresh runs of FIRST and LAST steps, so that what a run does once (a pool of
    samples, a regression fit, an acceptance check) cancels in the per-step figure and is the fixed part."""
    onestep(*cmd, "--run-dir", str(run / "first"), "--steps", str(FIRST))
    onestep(*cmd, "--run-dir", str(run / "last"), "--steps", str(LAST))
    first, last = cpu(run / "first"), cpu(run / "last")
    step = (last - first) / (LAST - FIRST)
    return step, max(0.0, first - FIRST * step)


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onestep("dd1", "pairs", "--teacher", TEACHER, "--out", str(tmp / "pairs"), "-n", "1024", "--shard-size", "1024")
        pair_s = json.loads((tmp / "pairs" / "manifest.json").read_text())["cpu_s"] / 1024
        dd1_step = per_step(["dd1", "train", "--teacher", TEACHER, "--pairs", str(tmp / "pairs")], tmp / "dd1")
        mapkd_step = per_step(["mapkd", "train", "--teacher", TEACHER], tmp / "mapkd")
        prefix = {k: per_step(["mapkd", "train", "--teacher", TEACHER, "--prefix-codes", "--prefix-ode-steps", str(k)],
                              tmp / f"prefix{k}") for k in (16, 4)}
        adapt = grown(["dd2", "adapt", "--teacher", TEACHER, "--preset", "small"], tmp / "adapt")
        tune = grown(["dd2", "tune", "--teacher", str(tmp / "adapt" / "first"), "--preset", "small", "--cfg-scale",
                      "2.0", "--head-only-steps", "0"], tmp / "tune")
        csd = grown(["dd2", "train", "--tune", str(tmp / "tune" / "first"), "--preset", "paper"], tmp / "csd")
        load = os.getloadavg()
    rows = [{"item": "DD1 pairs", "unit": "pair", "cpu_s_per_unit": pair_s, "units": 12000, "cpu_s": pair_s * 12000},
            {"item": "DD1 training", "unit": "step", "cpu_s_per_unit": dd1_step, "units": 900, "cpu_s": dd1_step * 900},
            {"item": "MapKD", "unit": "step", "cpu_s_per_unit": mapkd_step, "units": 600,
             "cpu_s": mapkd_step * 600}]
    rows += [{"item": f"MapKD + prefix codes ({k}-step map)", "unit": "step", "cpu_s_per_unit": v,
              "units": 600, "cpu_s": v * 600} for k, v in prefix.items()]
    dd2 = [("DD2 stage 0 (adapt)", adapt, 600), ("DD2 stage 1 (tune)", tune, 400), ("DD2 stage 2 (CSD)", csd, 8000)]
    rows += [{"item": name, "unit": "step", "cpu_s_per_unit": step, "units": units, "fixed_cpu_s": fixed,
              "cpu_s": fixed + step * units} for name, (step, fixed), units in dd2]
    totals = {"dd1_pairs_plus_training_cpu_s": rows[0]["cpu_s"] + rows[1]["cpu_s"], "mapkd_cpu_s": rows[2]["cpu_s"],
              **{f"mapkd_prefix_codes_{k}_cpu_s": v * 600 for k, v in prefix.items()},
              "dd2_stages_0_1_cpu_s": rows[-3]["cpu_s"] + rows[-2]["cpu_s"],
              "dd2_csd_cpu_s_per_step": csd[0],
              "dd2_paper_preset_cpu_s": sum(r["cpu_s"] for r in rows[-3:])}
    for r in rows:
        print(r, flush=True)
    result = {**provenance(), "teacher": TEACHER, "threads": 1, "load_avg": load, "rows": rows, "totals": totals}
    write_results(RESULTS / "training-cost", result, "Training CPU of DD1, MapKD and DD2, one thread")
    return result


if __name__ == "__main__":
    main()
