"""The map-start recipe on the image teacher, at the demo's budget: is the regression-only DD2 generator as good as DD1?

    onestep demo --out runs/quick                                    # teacher, DD1 (2048 pairs, 150 steps), DD2
    onestep dd2 fit-map --tune runs/quick/dd2-tune --pairs runs/quick/dd1-pairs --run-dir runs/quick/dd2-map \\
        --steps 150 --batch-size 64 --lr 3e-4 --generator-t 0.5
    # the two variants of the fit (library only: MapFitAblation), into runs/quick/dd2-map-cells and -stream
    python -c "from lab.mapstart import *; fit_map('runs/quick/dd2-map-cells', 'runs/quick/dd2-tune', \
        'runs/quick/dd1-pairs', MapFitConfig(steps=150, batch_size=64, lr=3e-4, generator_t=0.5), \
        ablation=MapFitAblation(cells_temperature=0.05))"                   # or MapFitAblation(noise_stream=True)
    onestep dd2 train --tune runs/quick/dd2-tune --generator-init runs/quick/dd2-map --run-dir runs/quick/dd2-from-map \\
        --steps 40 --guidance-warmup 20 --lr 2e-5 --lr-schedule cosine --generator-t 0.5
    onestep eval --run RUN --method dd2 -n 1000 --n-inception 0 --out runs/quick/evals-extra/NAME.json
    # the bench's budget (DD1's small preset: 12k pairs, 900 steps, batch 64, LR 3e-4), from the same stage-1 model
    onestep dd1 pairs --teacher assets/fashion-mnist/teacher --out runs/bench-map/dd1-pairs -n 12000 --cfg-scale 2.0
    onestep dd2 fit-map --tune runs/quick/dd2-tune --pairs runs/bench-map/dd1-pairs --run-dir runs/bench-map/dd2-map \
        --steps 900 --batch-size 64 --lr 3e-4 --generator-t 0.5
    onestep eval --run runs/bench-map/dd2-map --method dd2 -n 2000 --n-inception 0 --out runs/bench-map/dd2-map-fit.json
    python lab/studies/dd2_image_mapstart.py --root runs/quick --bench-root runs/bench-map

The map fits use DD1's pairs, steps, batch and LR, so their cost is DD1's training cost. This script collects the
evaluations (classifier FID on 1000 samples at the demo's budget, 2000 at the bench's) and the CPU times into
lab/results/dd2-image-mapstart.{json,md}; the bench's DD1 row is read from benchmarks/results/paper-table.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ROWS = [  # (row, recipe, eval file relative to the root, run directory whose metrics give the CPU time)
    ("teacher (49 AR steps)", "-", "evals/teacher.json", None),
    ("DD1 1-step (CE on the map's tokens, 150 steps)", "dd1", "evals/dd1-1step.json", "dd1"),
    ("DD2 1-step, paper recipe (stage 1, 40 CSD steps)", "gts", "evals/dd2-1step.json", "dd2"),
    ("DD2 generator regressed onto DD1's pairs (MSE, 150 steps)", "map fit", "evals-extra/dd2-map-fit.json", "dd2-map"),
    ("same, cross-entropy over the cells (tau 0.05)", "map fit", "evals-extra/dd2-map-fit-cells.json", "dd2-map-cells"),
    ("same as MSE, with the noise stream into the backbone", "map fit", "evals-extra/dd2-map-fit-stream.json",
     "dd2-map-stream"),
    ("MSE map fit + 20 guidance-only + 40 CSD steps (LR 2e-5)", "map", "evals-extra/dd2-from-map.json", "dd2-from-map"),
]


def cpu_s(root: Path, run: str | None):
    if run is None:
        return None
    m = json.loads((root / run / "metrics.json").read_text())
    return m.get("cpu_time_s", m.get("train_cpu_time_s"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/quick")
    p.add_argument("--bench-root", default="runs/bench-map")
    a = p.parse_args(argv)
    root = Path(a.root)
    table = []
    for name, recipe, ev, run in ROWS:
        if (root / ev).exists():
            r = json.loads((root / ev).read_text())
            table.append({"row": name, "recipe": recipe, "n": r["n"], "fid_classifier": r["fid_classifier"],
                          "inception_score": r["inception_score"], "precision": r["precision"], "recall": r["recall"],
                          "class_accuracy": r["class_accuracy"], "train_cpu_s": cpu_s(root, run)})
    floor = json.loads((root / "evals-extra/dd2-map-fit.json").read_text())["data_floor"]["fid_classifier"]
    bench = []
    dd1 = next(r for r in json.loads((ROOT / "benchmarks/results/paper-table.json").read_text())["rows"]
               if r["method"] == "dd1-1step")
    bench.append({"row": "DD1 1-step, the bench (benchmarks/results/paper-table.json)", "recipe": "dd1", "n": 2000,
                  "fid_classifier": dd1["fid_classifier"], "inception_score": dd1.get("inception_score"),
                  "precision": dd1.get("precision"), "recall": dd1.get("recall"),
                  "class_accuracy": dd1.get("class_accuracy")})
    fit = Path(a.bench_root) / "dd2-map-fit.json"
    if fit.exists():
        r = json.loads(fit.read_text())
        bench.append({"row": "DD2 generator regressed onto the bench's 12k pairs (MSE, 900 steps)", "recipe": "map fit",
                      "n": r["n"], "fid_classifier": r["fid_classifier"], "inception_score": r["inception_score"],
                      "precision": r["precision"], "recall": r["recall"], "class_accuracy": r["class_accuracy"],
                      "train_cpu_s": cpu_s(Path(a.bench_root), "dd2-map"),
                      "pairs_cpu_s": json.loads((Path(a.bench_root) / "dd1-pairs/manifest.json").read_text())["cpu_s"]})
    result = {**provenance(), "root": str(root), "data_floor_fid_classifier_1000": floor, "table": table,
              "bench_budget": bench}
    write_results(ROOT / "lab/results/dd2-image-mapstart", result,
                  "DD2's map-start recipe on the Fashion-MNIST teacher at the demo's budget")
    return result


if __name__ == "__main__":
    main()
