"""DD2 (the paper's recipe) run to its plateau on the shipped Fashion-MNIST teacher.

Question: how far does the paper's recipe (stage 0 -> stage 1 -> CSD) get here when it is given the paper's
generator LR warm-up (linear from 1e-6 over the first two thirds of training), the paper's guidance/generator LR
ratio (2:1), and at least 4x the longest CSD run measured before (2,000 generator steps)?

    OMP_NUM_THREADS=1 python lab/dd2_plateau/run.py --root runs/lab/dd2-plateau        # resumable: re-run to go on
    OMP_NUM_THREADS=1 python lab/dd2_plateau/run.py --root runs/lab/dd2-plateau --eval  # score every snapshot
    python lab/dd2_plateau/run.py --root runs/lab/dd2-plateau --report   # -> lab/results/dd2-plateau.{json,md}

Stages (each a resumable onestep run directory under --root):
  adapt/  stage 0, the `small` preset (600 fine-tuning steps); its held-out NLL acceptance is printed
  tune/   stage 1, the `small` preset (400 steps on a pool of 4,096 teacher samples, CFG 2.0)
  csd/    stage 2, PLATEAU below; the EMA generator of every checkpoint is copied to csd-snapshots/step_N
Stopped and re-run, the CSD run continues bit for bit (the TrainLoop's resume). `--eval` scores each snapshot not
yet scored (2,000 samples, classifier FID, precision, recall; one step) into csd-snapshots/scores.jsonl.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from onestep.dd2.train import TRAIN_PRESETS

TEACHER = "assets/fashion-mnist/teacher"
PLATEAU = TRAIN_PRESETS["paper"]  # the paper's LR schedule (see its comment), 8000 generator steps


def onestep(*args: str) -> None:
    cmd = [sys.executable, "-m", "onestep", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(root: Path) -> None:
    from onestep.dd2.train import train as csd_train

    onestep("dd2", "adapt", "--teacher", TEACHER, "--run-dir", str(root / "adapt"), "--preset", "small")
    print(json.dumps(json.loads((root / "adapt" / "metrics.json").read_text()), indent=1))
    onestep("dd2", "tune", "--teacher", str(root / "adapt"), "--run-dir", str(root / "tune"), "--preset", "small",
            "--cfg-scale", "2.0")
    snaps = root / "csd-snapshots"
    snaps.mkdir(parents=True, exist_ok=True)

    def keep(step: int) -> None:
        src = root / "csd" / "checkpoints" / f"step_{step:08d}" / "ema"
        dst = snaps / f"step_{step:08d}"
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst.with_suffix(".tmp"), dirs_exist_ok=True)
            dst.with_suffix(".tmp").rename(dst)

    csd_train(root / "csd", root / "tune", PLATEAU, on_checkpoint=keep)


def evaluate(root: Path, n: int) -> None:
    """Score every snapshot not scored yet. A snapshot is scored as a run directory beside the others
    (ROOT/csd-step_N/final), so that its references to the stage-0 teacher resolve as the run's own do."""
    snaps = root / "csd-snapshots"
    scores = snaps / "scores.jsonl"
    done = {json.loads(l)["snapshot"] for l in scores.read_text().splitlines()} if scores.exists() else set()
    for d in sorted(p for p in snaps.glob("step_*") if p.is_dir() and p.suffix != ".tmp"):
        if d.name in done:
            continue
        run = root / f"csd-{d.name}"
        if not (run / "final").exists():
            shutil.copytree(d, run / "final")
        out = snaps / f"{d.name}.json"
        onestep("eval", "--run", str(run), "--method", "dd2", "-n", str(n), "--n-inception", "0", "--seed", "0",
                "--out", str(out))
        res = json.loads(out.read_text())
        rec = {"snapshot": d.name, "step": int(d.name.split("_")[1]),
               **{k: res.get(k) for k in ("fid_classifier", "precision", "recall")}}
        with scores.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(rec, flush=True)


def report(root: Path) -> None:
    """What the run has measured so far: stage 0's acceptance, the stages' CPU, the scored snapshots."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from _common import provenance, write_results

    def metrics(stage: str) -> dict:
        f = root / stage / "metrics.json"
        return json.loads(f.read_text()) if f.exists() else {}

    scores = root / "csd-snapshots" / "scores.jsonl"
    rows = [json.loads(l) for l in scores.read_text().splitlines()] if scores.exists() else []
    adapt = metrics("adapt")
    result = {**provenance(), "root": str(root), "csd": PLATEAU.to_dict(),
              "stage0": {k: adapt.get(k) for k in ("nll_teacher", "nll_after_fit", "nll_adapted", "nll_rel_change",
                                                   "accepted", "cpu_time_s")},
              "cpu_s": {s: metrics(s).get("cpu_time_s") for s in ("adapt", "tune", "csd")},
              "rows": sorted(rows, key=lambda r: r["step"])}
    write_results(Path(__file__).resolve().parents[1] / "results" / "dd2-plateau", result,
                  "DD2 (the paper's recipe) run to its plateau: one-step classifier FID (2k) by CSD step")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="runs/lab/dd2-plateau")
    ap.add_argument("--eval", action="store_true", help="score the snapshots instead of training")
    ap.add_argument("--report", action="store_true", help="write lab/results/dd2-plateau.{json,md}")
    ap.add_argument("-n", type=int, default=2000)
    a = ap.parse_args()
    if a.report:
        report(Path(a.root))
    else:
        (evaluate if a.eval else train)(Path(a.root), *([a.n] if a.eval else []))
