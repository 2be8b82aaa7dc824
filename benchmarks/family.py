"""A teacher of another shape or on another data set trained from scratch, then DD1, MapKD (and on Fashion-MNIST
DD2) distilled from it, evaluated on the same labels and seed, and timed side by side against the teacher at batch 1
and 64.

    OMP_NUM_THREADS=2 python benchmarks/family.py --setup var --root runs/var                # -> var-family.*
    OMP_NUM_THREADS=1 python benchmarks/family.py --setup raster196 --root runs/raster196    # -> raster196.*
    OMP_NUM_THREADS=1 python benchmarks/family.py --setup mnist                              # -> mnist.*
    OMP_NUM_THREADS=1 python benchmarks/family.py --setup crawl-tiles                        # -> crawl-tiles.*

Setups: ``var`` (VAR's multi-scale tokenizer and a next-scale teacher: 6 scales, 104 tokens) and ``raster196`` (a
LlamaGen-style raster teacher on the 2x-downsampling tokenizer: 14x14 = 196 tokens, 196 AR steps; the shipped
teacher has 7x7 = 49), both on Fashion-MNIST; ``mnist`` and ``crawl-tiles`` (the shipped teacher's recipe, a raster
teacher on the 4x-downsampling tokenizer, on MNIST: 7x7 tokens, and on 32x32 colour tiles: 8x8 tokens), with
teacher, DD1 and MapKD rows, classifier FID on that data set's own classifier. ``--stages`` stops after the named stages (a long run in pieces). Every stage is the CLI
command shown in the output (resumable: a finished stage is reused, so re-running only evaluates). Writes
benchmarks/results/<setup>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("+ onestep " + " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "onestep", *cmd], check=True, cwd=ROOT)


# per setup: the tokenizer preset, the teacher's sampling rule, the defaults of the flags below, the results' name
SETUPS = {
    "var": {"tokenizer": "var-small", "rule": ["--cfg-scale", "2", "--cfg-schedule", "linear"], "out": "var-family",
            "title": "The VAR family on Fashion-MNIST", "teacher_steps": 3000, "teacher_batch": 64},
    "raster196": {"tokenizer": "ds2", "rule": ["--cfg-scale", "2"], "out": "raster196",
                  "title": "A 196-token raster teacher on Fashion-MNIST", "teacher_steps": 1500, "teacher_batch": 64},
    "mnist": {"tokenizer": "default", "rule": ["--cfg-scale", "2"], "out": "mnist", "data": ["--data", "mnist"],
              "title": "The raster teacher on MNIST", "teacher_steps": 3000, "teacher_batch": 128,
              "methods": ("dd1", "mapkd")},
    "crawl-tiles": {"tokenizer": "default", "rule": ["--cfg-scale", "2"], "out": "crawl-tiles",
                    "data": ["--data", "crawl-tiles"], "title": "The raster teacher on 32x32 colour tiles",
                    "teacher_steps": 3000, "teacher_batch": 128, "methods": ("dd1", "mapkd")},
}
METHODS = ("dd1", "mapkd", "dd2")  # what a setup distils unless it names fewer
STAGES = ("tokenizer", "teacher", "dd1", "mapkd", "dd2", "eval")


def train_cpu(r: Path, method: str) -> float | None:
    """A method's training CPU-seconds over every stage it needs from the teacher (DD1: pairs and training; DD2:
    stages 0 (raster teachers), 1 and 2), from the runs' own records (``metrics.json``, the pairs' manifest)."""
    def cpu(path: str, key: str = "cpu_time_s"):
        f = r / path
        return json.loads(f.read_text()).get(key) if f.exists() else None

    parts = {"teacher": [], "dd1": [cpu("pairs/manifest.json", "cpu_s"), cpu("dd1/metrics.json")],
             "mapkd": [cpu("mapkd/metrics.json")],
             "dd2": [cpu("dd2-tune/metrics.json"), cpu("dd2/metrics.json")]
             + ([cpu("dd2-adapt/metrics.json")] if (r / "dd2-adapt").exists() else [])}[method]
    return None if not parts or None in parts else round(sum(parts), 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", choices=list(SETUPS), default="var", help="the teacher's shape (default: var)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="the stages to run, in order (default: all)")
    p.add_argument("--root", default=None, help="the runs' folder (default: runs/<setup>)")
    p.add_argument("-n", type=int, default=2000, help="samples per evaluation (classifier FID)")
    p.add_argument("--n-inception", type=int, default=0,
                   help="of which scored by Inception-v3 too (default: 0; the bench's protocol: -n 10000 "
                        "--n-inception 2000)")
    p.add_argument("--teacher-steps", type=int, default=None, help="(default: the setup's)")
    p.add_argument("--teacher-batch", type=int, default=None,
                   help="(default: the setup's; the small VAR is compute-bound on a CPU: ~4 s per step of 128 "
                        "sequences of 104 tokens)")
    p.add_argument("--pairs", type=int, default=12000)
    p.add_argument("--dd1-steps", type=int, default=600, help="DD1 training steps (the small preset's batch)")
    p.add_argument("--mapkd-steps", type=int, default=600, help="MapKD training steps (the small preset's)")
    p.add_argument("--dd2-steps", type=int, default=120, help="CSD generator steps (the small preset otherwise)")
    p.add_argument("--out", default=None, help="output path without extension (default: benchmarks/results/<name>)")
    a = p.parse_args(argv)
    setup = SETUPS[a.setup]
    r = Path(a.root or f"runs/{a.setup}")
    s = setup["rule"]
    data = setup.get("data", [])
    methods = setup.get("methods", METHODS)
    teacher = ["train-teacher", "--preset", "small", "--tokenizer", f"{r}/tok", "--run-dir", f"{r}/teacher", "--steps",
               str(a.teacher_steps or setup["teacher_steps"]), "--batch-size",
               str(a.teacher_batch or setup["teacher_batch"]), *data]
    dd2 = [["dd2", "tune", "--teacher", f"{r}/teacher", "--run-dir", f"{r}/dd2-tune", *s],
           ["dd2", "train", "--tune", f"{r}/dd2-tune", "--run-dir", f"{r}/dd2", "--steps", str(a.dd2_steps)]]
    if a.setup != "var":  # a raster teacher reads token ids: DD2's stage 0 gives it continuous inputs first
        dd2 = [["dd2", "adapt", "--teacher", f"{r}/teacher", "--run-dir", f"{r}/dd2-adapt"],
               ["dd2", "tune", "--teacher", f"{r}/dd2-adapt", "--run-dir", f"{r}/dd2-tune", *s], dd2[1]]
    plan = {"tokenizer": [["train-tokenizer", "--preset", setup["tokenizer"], "--run-dir", f"{r}/tok", *data]],
            "teacher": [teacher],
            "dd1": [["dd1", "pairs", "--teacher", f"{r}/teacher", "--out", f"{r}/pairs", "-n", str(a.pairs), *s],
                    ["dd1", "train", "--teacher", f"{r}/teacher", "--pairs", f"{r}/pairs", "--run-dir", f"{r}/dd1",
                     "--steps", str(a.dd1_steps)]],
            "mapkd": [["mapkd", "train", "--teacher", f"{r}/teacher", "--run-dir", f"{r}/mapkd", "--steps",
                       str(a.mapkd_steps), *s]],
            "dd2": dd2}
    plan = {k: v for k, v in plan.items() if k not in METHODS or k in methods}
    stages = [cmd for st in STAGES if st in plan for cmd in plan[st]]
    for st in a.stages:
        for cmd in plan.get(st, []):
            run(cmd)
    if "eval" not in a.stages:
        return {}
    rows = []
    for name, method, run_dir, extra in (("teacher", "teacher", "teacher", []), ("dd1-1step", "dd1", "dd1", []),
                                         ("dd1-dd1-2step", "dd1", "dd1", ["--sampling-steps", "2"]),
                                         ("mapkd-1step", "mapkd", "mapkd", []),
                                         ("mapkd-jacobi-2step", "mapkd", "mapkd", ["--sampling-steps", "2"]),
                                         ("dd2-1step", "dd2", "dd2", []),
                                         ("dd2-alg4-2step", "dd2", "dd2", ["--sampling-steps", "2"])):
        if method != "teacher" and method not in methods:
            continue
        out = r / f"eval-{name}.json"
        run(["eval", "--run", f"{r}/{run_dir}", "--method", method, "-n", str(a.n), "--n-inception",
             str(a.n_inception), "--out", str(out), *s, *extra])
        m = json.loads(out.read_text())
        rows.append({"method": name, "steps": m["steps"], "params": m["params"], "fid_classifier": m["fid_classifier"],
                     "fid_inception": m.get("fid_inception"), "inception_score": m.get("inception_score"),
                     "precision": m.get("precision"), "recall": m.get("recall"),
                     "class_accuracy": m.get("class_accuracy"), "train_cpu_s": train_cpu(r, method)})
    # speed side by side in this process (1 and 64 samples per call)
    from onestep.eval.speed import measure
    from onestep.methods import build_sampler
    from onestep.samplers import class_labels

    args = argparse.Namespace(cfg_scale=float(s[1]), cfg_schedule=s[3] if len(s) > 3 else "constant",
                              temperature=1.0, top_k=0, top_p=1.0, steps=1, continuous=False)
    samplers = {"teacher": build_sampler("teacher", f"{r}/teacher", "cpu", args),
                **{f"{m}-1step": build_sampler(m, f"{r}/{m}", "cpu", args) for m in methods}}
    num_classes = json.loads((r / "teacher" / "final" / "config.json").read_text())["model"]["num_classes"]
    labels = class_labels(64, num_classes)

    def fn(smp):
        return lambda b: smp.images(labels[:b], torch.Generator().manual_seed(0))

    speed = measure({k: fn(v) for k, v in samplers.items()}, (1, 64), warmup=1, repeats=5, reference="teacher")
    by = {row["method"]: row for row in speed["rows"]}
    for row in rows:
        sp = by.get(row["method"])
        if sp:
            row.update(latency_b1_s=sp["latency_b1_s"], speedup_b1=sp["speedup_b1"], speedup_b64=sp["speedup_b64"])
    teacher_fid = rows[0]["fid_classifier"]
    gaps = {row["method"]: row["fid_classifier"] - teacher_fid for row in rows[1:]}
    # the papers' measure of a one-step method against DD1: its gap to the teacher over DD1's (DD2 on VAR-d20: 0.33)
    gap_ratios = {m: g / gaps["dd1-1step"] for m, g in gaps.items() if m != "dd1-1step" and gaps.get("dd1-1step")}
    # tokenizer and teacher: the training time of their log (the last time_s; runs made before the TrainLoop kept its
    # time across invocations were trained in one invocation each, so their last time_s is the whole training)
    walls = {key: json.loads((r / run / "log.jsonl").read_text().splitlines()[-1])["time_s"]
             for key, run in (("tokenizer", "tok"), ("teacher", "teacher"))}
    for key, path, field in (("dd1_pairs_and_train", "dd1/metrics.json", "total_wall_time_s"),
                             ("mapkd", "mapkd/metrics.json", "wall_time_s"),
                             ("dd2_tune", "dd2-tune/final/config.json", None), ("dd2_train", "dd2/metrics.json", "wall_time_s")):
        f = r / path
        if f.exists():
            d = json.loads(f.read_text())
            walls[key] = d.get(field) if field else d.get("metrics", {}).get("wall_time_s")
    tok_eval = json.loads((r / "tok/final/config.json").read_text()).get("eval")
    result = {**provenance(), "stages": [" ".join(["onestep", *c]) for c in stages], "tokenizer_eval": tok_eval,
              "table": rows, "fid_gap_to_teacher": gaps, "gap_ratio_to_dd1_1step": gap_ratios, "wall_time_s": walls, "speed_protocol": {
                  k: v for k, v in speed.items() if k != "rows"}, "threads": torch.get_num_threads()}
    write_results(a.out or str(ROOT / "benchmarks/results" / setup["out"]), result,
                  f"{setup['title']} (classifier FID on {a.n} samples"
                  + (f", Inception FID on the first {a.n_inception})" if a.n_inception else ")"))
    print(json.dumps(rows, indent=2))
    return result


if __name__ == "__main__":
    main()
