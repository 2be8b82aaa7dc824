"""Training CPU per step of DD1 and MapKD, measured side by side on one idle thread.

    OMP_NUM_THREADS=1 python benchmarks/training_cost.py     # -> benchmarks/results/training-cost.{json,md}

CPU seconds measured while other jobs share the cores come out inflated, by different amounts for runs made at
different times. This script measures each recipe's cost per unit of work in one process tree, one after the
other, on the shipped teacher with the `small` presets, and scales it to the presets' lengths:

- DD1's pairs: ``onestep dd1 pairs -n 1024`` (CPU per pair from its manifest) x 12000 pairs;
- DD1's training: ``onestep dd1 train`` grown from 5 to 65 steps (CPU of the 60 steps, ``metrics.json``) x 900;
- MapKD: ``onestep mapkd train`` grown from 5 to 65 steps x 600;
- the same with prefix codes (``--prefix-codes``, their map at 16 and at 4 ODE steps) x 600.

The first 5 steps (start-up, first allocations) are left out of the per-step figure.
"""
from __future__ import annotations

import json
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
    onestep(*cmd, "--run-dir", str(run), "--steps", str(FIRST))
    first = cpu(run)
    onestep(*cmd, "--run-dir", str(run), "--steps", str(LAST))
    return (cpu(run) - first) / (LAST - FIRST)


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onestep("dd1", "pairs", "--teacher", TEACHER, "--out", str(tmp / "pairs"), "-n", "1024", "--shard-size", "1024")
        pair_s = json.loads((tmp / "pairs" / "manifest.json").read_text())["cpu_s"] / 1024
        dd1_step = per_step(["dd1", "train", "--teacher", TEACHER, "--pairs", str(tmp / "pairs")], tmp / "dd1")
        flow_step = per_step(["mapkd", "train", "--teacher", TEACHER], tmp / "mapkd")
        prefix = {k: per_step(["mapkd", "train", "--teacher", TEACHER, "--prefix-codes", "--prefix-ode-steps", str(k)],
                              tmp / f"prefix{k}") for k in (16, 4)}
    rows = [{"item": "DD1 pairs", "unit": "pair", "cpu_s_per_unit": pair_s, "units": 12000, "cpu_s": pair_s * 12000},
            {"item": "DD1 training", "unit": "step", "cpu_s_per_unit": dd1_step, "units": 900, "cpu_s": dd1_step * 900},
            {"item": "MapKD", "unit": "step", "cpu_s_per_unit": flow_step, "units": 600,
             "cpu_s": flow_step * 600}]
    rows += [{"item": f"MapKD + prefix codes ({k}-step map)", "unit": "step", "cpu_s_per_unit": v,
              "units": 600, "cpu_s": v * 600} for k, v in prefix.items()]
    totals = {"dd1_pairs_plus_training_cpu_s": rows[0]["cpu_s"] + rows[1]["cpu_s"], "mapkd_cpu_s": rows[2]["cpu_s"],
              **{f"mapkd_prefix_codes_{k}_cpu_s": v * 600 for k, v in prefix.items()}}
    for r in rows:
        print(r, flush=True)
    result = {**provenance(), "teacher": TEACHER, "threads": 1, "rows": rows, "totals": totals}
    write_results(RESULTS / "training-cost", result, "Training CPU of DD1 and MapKD, one idle thread")
    return result


if __name__ == "__main__":
    main()
