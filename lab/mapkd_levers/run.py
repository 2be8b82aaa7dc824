"""MapKD's levers on the shipped Fashion-MNIST teacher: the divergence and the training length, one change at a time.

Question: which divergence between the teacher's conditional p_T and the generator's q (forward KL, reverse KL,
their mixtures, a schedule from forward to reverse), how many training steps, and which teacher sampling rule as the
target (top-k truncation, CFG scale) give MapKD the lowest one-step classifier FID with precision at least DD1's? Every variant is `onestep mapkd train` from the shipped teacher with
the `small` preset (600 steps of 64, LR 1e-3, seed 0, CFG 2.0) and one change; every generator is evaluated on the
same 2,000 balanced labels at two evaluation seeds (classifier FID, precision, recall), so a difference counts only
beyond the seeds' spread. The generator's network and sampler are those of the shipped MapKD in every row, so its
latency is the same (benchmarks/results/latency-bound.md).

    OMP_NUM_THREADS=1 python lab/mapkd_levers/run.py --root runs/lab/mapkd-levers            # resumable: re-run
    OMP_NUM_THREADS=1 python lab/mapkd_levers/run.py --root runs/lab/mapkd-levers --only jeffreys-600
    python lab/mapkd_levers/run.py --root runs/lab/mapkd-levers --report   # -> lab/results/mapkd-levers.{json,md}

Each variant is a resumable onestep run directory under --root; its evaluations are cached beside it
(eval-seed<k>.json), so re-running trains and scores only what is missing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEACHER = "assets/fashion-mnist/teacher"
RULE = ["--cfg-scale", "2.0"]
# name -> the flags that differ from the small preset, in the order they are run
VARIANTS = {
    "jeffreys-600": ["--divergence", "mixture", "--reverse-weight", "0.5"],
    "mixture-0.25-600": ["--divergence", "mixture", "--reverse-weight", "0.25"],
    "forward-1200": ["--steps", "1200"],
    "schedule-0-to-0.5-600": ["--divergence", "mixture", "--reverse-weight", "0", "--reverse-weight-end", "0.5"],
    # the teacher's sampling rule as the target: its top-k truncation (the generator then samples under the same
    # top-k, MapKDGenerator.top_k), and a stronger CFG
    "topk-64-600": ["--top-k", "64"],
    "mixture-0.25-1200": ["--steps", "1200", "--divergence", "mixture", "--reverse-weight", "0.25"],
    # prefix codes with a 4-step map for the codes (the latency bound), at the longer length
    "prefix-codes-4-1200": ["--steps", "1200", "--prefix-codes", "--prefix-ode-steps", "4"],
    "cfg-3-600": ["--cfg-scale", "3.0"],
    "forward-600": [],
}
SEEDS = (0, 1)
REFERENCES = {"teacher (shipped; 49 AR steps)": "teacher", "DD1 (shipped)": "dd1",
              "MapKD (shipped: the small preset)": "mapkd"}


def onestep(*args: str) -> None:
    cmd = [sys.executable, "-m", "onestep", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def evaluate(run: Path, method: str, seed: int, n: int) -> dict:
    out = run / f"eval-seed{seed}.json"
    if not out.exists():
        onestep("eval", "--run", str(run), "--method", method, "-n", str(n), "--n-inception", "0", "--seed", str(seed),
                "--out", str(out))
    return json.loads(out.read_text())


def train_and_score(root: Path, names: list[str], n: int) -> None:
    for name in names:
        run = root / name
        onestep("mapkd", "train", "--teacher", TEACHER, "--run-dir", str(run), *RULE, *VARIANTS[name])
        for seed in SEEDS:
            evaluate(run, "mapkd", seed, n)


def report(root: Path, n: int) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import provenance, write_results

    def row(name: str, run: Path, method: str, flags: str, cpu) -> dict | None:
        if not all((run / f"eval-seed{s}.json").exists() for s in SEEDS):
            return None
        ev = [json.loads((run / f"eval-seed{s}.json").read_text()) for s in SEEDS]
        mean = {k: sum(e[k] for e in ev) / len(ev) for k in ("fid_classifier", "precision", "recall")}
        return {"variant": name, "flags": flags, **{k: round(v, 4) for k, v in mean.items()},
                "fid_seed_spread": round(abs(ev[0]["fid_classifier"] - ev[1]["fid_classifier"]), 3),
                "train_cpu_s": cpu, "n": n}

    per_step = next(r["cpu_s_per_unit"] for r in json.loads(
        (ROOT / "benchmarks" / "results" / "training-cost.json").read_text())["rows"] if r["item"] == "MapKD")

    def cpu(run: Path) -> tuple[float | None, str]:
        """The run's training CPU from its record, or, where the record missed invocations that were stopped (runs
        older than the per-checkpoint record: its wall time short of the loop's), its steps times MapKD's measured
        CPU per step (benchmarks/results/training-cost.md)."""
        m = run / "metrics.json"
        if not m.exists():
            return None, ""
        metrics, logs = json.loads(m.read_text()), (run / "log.jsonl").read_text().splitlines()
        last = json.loads(logs[-1])
        if metrics["wall_time_s"] >= 0.9 * last["time_s"]:
            return metrics["cpu_time_s"], "measured"
        return round(last["step"] * per_step, 1), f"{last['step']} steps x {per_step:.2f} s"

    rows = []
    for name, flags in VARIANTS.items():
        c, how = cpu(root / name)
        r = row(name, root / name, "mapkd", " ".join(flags) or "(the small preset)", c)
        if r:
            rows.append({**r, "train_cpu_from": how})
    for name, method in REFERENCES.items():
        r = row(name, root / f"ref-{method}", method, f"assets/fashion-mnist/{method}", None)
        if r:
            rows.append(r)
    result = {**provenance(), "teacher": TEACHER, "rule": " ".join(RULE), "eval_seeds": list(SEEDS), "rows": rows}
    write_results(ROOT / "lab" / "results" / "mapkd-levers", result,
                  "MapKD's levers: one-step classifier FID (2k, mean of two evaluation seeds) by divergence and length")


def reference(root: Path, n: int) -> None:
    """The shipped teacher, DD1 and MapKD generators scored by the same protocol: the FID every variant is measured
    against (the teacher's), the precision it must keep (DD1's), and the small preset's own generator (the
    `forward-600` recipe, trained on another machine)."""
    for method in REFERENCES.values():
        run = root / f"ref-{method}"
        for seed in SEEDS:
            out = run / f"eval-seed{seed}.json"
            if not out.exists():
                run.mkdir(parents=True, exist_ok=True)
                onestep("eval", "--run", f"assets/fashion-mnist/{method}", "--method", method, "-n", str(n),
                        "--n-inception", "0", "--seed", str(seed), "--out", str(out))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="runs/lab/mapkd-levers")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=None, help="these variants (default: all)")
    ap.add_argument("--report", action="store_true", help="write lab/results/mapkd-levers.{json,md}")
    ap.add_argument("--references", action="store_true", help="score the shipped generators only")
    ap.add_argument("-n", type=int, default=2000)
    a = ap.parse_args()
    root = Path(a.root).resolve()
    if a.report:
        report(root, a.n)
    elif a.references:
        reference(root, a.n)
    else:
        reference(root, a.n)
        train_and_score(root, a.only or list(VARIANTS), a.n)
