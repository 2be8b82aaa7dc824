"""DD2's stage 1 trained to its plateau: the Euler-10 sampler's FID against stage 1's length.

Question: when does stage 1 (the AR-diffusion model, `onestep dd2 tune`) stop improving on the Fashion-MNIST
teacher? The paper trains LlamaGen-L's stage 1 for 100k iterations at batch 512 and reports its Euler-10 sampler
(Table 7: each token solved by 10 Euler steps, quantised to the nearest code) at FID-5k 15.66. Here: fresh stage-1
runs of the `small` preset (batch 32, CFG 2.0) at several lengths, all from the plateau run's stage 0, each scored by
the same Euler-10 sampler on 2,000 balanced labels (classifier FID, precision, recall; seed 0).

    OMP_NUM_THREADS=1 python lab/dd2_stage1_length/run.py                 # resumable: trains and scores what is missing
    python lab/dd2_stage1_length/run.py --report                          # -> lab/results/dd2-stage1-length.{json,md}

Every length is its own run directory (ROOT/tune-<steps>, resumable); the 400-step run is the plateau run's own
stage 1 when it exists (lab/dd2_plateau/run.py), so its CSD starts from a measured point of this curve.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from onestep.dd2.sampling import ardiffusion_sampler
from onestep.dd2.tune import load_ardiffusion
from onestep.runs import final_dir, resolve_ref
from onestep.samplers import class_labels
from onestep.teacher.load import load_teacher

ROOT = Path(__file__).resolve().parents[2]
LENGTHS = (400, 800, 1600, 3200)
EULER_STEPS = 10


def onestep(*args: str) -> None:
    cmd = [sys.executable, "-m", "onestep", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def run_dir(root: Path, plateau: Path, steps: int) -> Path:
    own = plateau / "tune"
    if steps == 400 and (own / "final").exists():
        return own
    return root / f"tune-{steps}"


@torch.no_grad()
def score(tune: Path, out: Path, n: int) -> dict:
    if not out.exists():
        model, config = load_ardiffusion(tune)
        _, _, tok = load_teacher(resolve_ref(config["teacher_dir"], final_dir(tune)))  # stage 0's tokenizer
        smp = ardiffusion_sampler(model.eval(), tok, EULER_STEPS)
        labels, g, images = class_labels(n, smp.info["num_classes"]), torch.Generator().manual_seed(0), []
        for i in range(0, n, 100):
            images.append(smp.images(labels[i:i + 100], g))
        npz = out.with_suffix(".npz")
        np.savez(npz, images=torch.cat(images).numpy(), labels=labels.numpy())
        onestep("eval", "--images", str(npz), "-n", str(n), "--n-inception", "0", "--out", str(out))
    return json.loads(out.read_text())


def main(root: Path, plateau: Path, n: int) -> None:
    adapt = plateau / "adapt"
    for steps in LENGTHS:
        d = run_dir(root, plateau, steps)
        if d.parent == root:
            onestep("dd2", "tune", "--teacher", str(adapt), "--run-dir", str(d), "--preset", "small", "--cfg-scale",
                    "2.0", "--steps", str(steps))
        print(steps, {k: score(d, root / f"euler10-{steps}.json", n).get(k)
                      for k in ("fid_classifier", "precision", "recall")}, flush=True)


def report(root: Path, plateau: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import provenance, write_results

    rows = []
    for steps in LENGTHS:
        f, m = root / f"euler10-{steps}.json", run_dir(root, plateau, steps) / "metrics.json"
        if f.exists():
            r = json.loads(f.read_text())
            rows.append({"stage1_steps": steps, "batch_size": 32, **{k: r.get(k) for k in
                         ("fid_classifier", "precision", "recall", "class_accuracy")},
                         "train_cpu_s": json.loads(m.read_text()).get("cpu_time_s") if m.exists() else None})
    write_results(ROOT / "lab" / "results" / "dd2-stage1-length", {**provenance(), "euler_steps": EULER_STEPS,
                  "n": 2000, "rows": rows}, "DD2's stage 1 by length: the Euler-10 sampler's classifier FID (2k)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="runs/lab/dd2-stage1-length")
    ap.add_argument("--plateau", default="runs/lab/dd2-plateau", help="the plateau run's root (its stage 0)")
    ap.add_argument("--report", action="store_true", help="write lab/results/dd2-stage1-length.{json,md}")
    ap.add_argument("-n", type=int, default=2000)
    a = ap.parse_args()
    root, plateau = Path(a.root).resolve(), Path(a.plateau).resolve()
    report(root, plateau) if a.report else main(root, plateau, a.n)
