"""One-step classifier FID against training CPU-seconds: DD1, MapKD, DD2 (the paper's recipe) and DD2's variants
on the Fashion-MNIST teacher.

    python benchmarks/fid_vs_cpu.py            # reads benchmarks/results/fid-vs-cpu/, writes fid-vs-cpu.*

Every point is a generator evaluated on 2000 samples (classifier FID, the bench's protocol), placed at the CPU time
its recipe spent, summed over every stage it needs:

- DD1: pairs (12k, the bench's count) + training, at 150, 300 and 900 steps; and the bench's own 900-step run. The
  pairs' CPU (``cpu.json``'s ``dd1_pairs_12k``) is that of the set re-made with the fused ODE posterior
  (``onestep.flow_map``): 317 CPU-s where the first set took 698, with the same tokens up to 25 of 588k (float
  rounding at cell boundaries), so the generators trained on the first set keep their FIDs.
- DD2, paper recipe (``gts``): stage 0 + stage 1 + CSD (the bench's 250-step run and its continuation at constant
  LR, ``lab/results/dd2-image-csd-steps.json``; the CPU time of a checkpoint inside a run segment is the segment's
  measured CPU time per step times the steps done).
- DD2, paper recipe with the paper's LR schedule (``plateau``, ``lab/dd2_plateau/run.py``): its stage 0 and 1 CPU
  as measured, plus CSD steps x the CSD CPU per step of ``training-cost.json`` (one thread, side by side with the
  others), at every scored snapshot of ``lab/results/dd2-plateau.json``.
- DD2 variant, map start (``map``): pairs + stage 0 + stage 1 + the regression onto the pairs (900 steps) + CSD.
- DD2 variant, CSD from DD1's generator (``lab/studies/dd2_from_dd1.py``): pairs + DD1 (300 steps) + CSD.
- MapKD (``onestep mapkd train``): its one stage, from the teacher (no stage 0 or 1, no pairs), at
  150, 300 and 600 steps (separate runs, each with its own cosine; ``cpu.json``'s ``flow_<steps>`` from each run's
  metrics.json). The runs shared the 2 cores with one to three other jobs, which inflates CPU seconds; the same
  costs measured one after the other on one thread: ``benchmarks/training_cost.py``.

The CPU seconds come from two machines: the bench's rows (DD1 at 900 steps, the paper recipe) from the bench's
machine, the others from a second 2-core machine (the eval JSONs record each machine).

The evaluations and CPU components are stored beside the figure (``fid-vs-cpu/``): the eval JSONs written by
``onestep eval``, and ``cpu.json`` with each run's measured CPU seconds (``metrics.json`` / the pairs manifest).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
D = RESULTS / "fid-vs-cpu"
LAB = Path(__file__).resolve().parents[1] / "lab" / "results"


def fid(name: str) -> dict:
    r = json.loads((D / name).read_text())
    return {"fid_classifier": r["fid_classifier"], "precision": r["precision"], "recall": r["recall"], "n": r["n"]}


def points() -> list[dict]:
    cpu = json.loads((D / "cpu.json").read_text())
    bench = json.loads((RESULTS / "paper-table.json").read_text())
    cost = bench["cost"]
    dd1_bench = next(r for r in bench["rows"] if r["method"] == "dd1-1step")
    rows = []

    def add(recipe, label, cpu_s, ev, parts):
        rows.append({"recipe": recipe, "point": label, "cpu_s": round(cpu_s), **ev, "cpu_parts": parts})

    pairs = cpu["dd1_pairs_12k"]
    for steps in (150, 300, 900):
        tr = cpu[f"dd1_train_{steps}"]
        add("dd1", f"DD1, {steps} steps", pairs + tr, fid(f"dd1-{steps}-steps.json"), f"pairs {pairs:.0f} + train {tr:.0f}")
    if "dd1_train_900_lr1e-3" in cpu:  # DD1 at the LR that helps the DD2 map fit (1e-3, DD1's own is 3e-4)
        tr = cpu["dd1_train_900_lr1e-3"]
        add("dd1-lr1e-3", "DD1, 900 steps at LR 1e-3", pairs + tr, fid("dd1-900-steps-lr1e-3.json"),
            f"pairs {pairs:.0f} + train {tr:.0f}")
    add("dd1 (bench)", "DD1, 900 steps (the bench's own run and pairs)", cost["dd1_pairs_cpu_s"] + cost["dd1_train_cpu_s"],
        {"fid_classifier": dd1_bench["fid_classifier"], "precision": dd1_bench["precision"],
         "recall": dd1_bench["recall"], "n": 2000},
        f"pairs {cost['dd1_pairs_cpu_s']:.0f} + train {cost['dd1_train_cpu_s']:.0f}")

    steps_tab = json.loads((LAB / "dd2-image-csd-steps.json").read_text())["rows"]
    const = {r["generator_steps_done"]: r for r in steps_tab if r["run"].startswith("constant LR")}
    s01 = cost["dd2_stage0_adapt_s"] + cost["dd2_stage1_tune_cpu_s"]
    first = const[250]["train_cpu_s"]  # the bench's 250 steps
    rate = const[1000]["train_cpu_s"] / 750  # the continuation's segment 250 -> 1000, per step
    for k, r in sorted(const.items()):
        c = s01 + first + (k - 250) * rate
        add("gts", f"DD2 paper recipe, {k} CSD steps", c,
            {"fid_classifier": r["fid_classifier"], "precision": r["precision"], "recall": r["recall"], "n": 2000},
            f"stages 0+1 {s01:.0f} + CSD {first:.0f}" + (f" + {k - 250} x {rate:.2f}" if k > 250 else ""))

    m0 = pairs + cpu["demo_stage0_adapt_wall"] + cpu["demo_stage1_tune"] + cpu["map_fit_900"]
    parts = (f"pairs {pairs:.0f} + stage 0 {cpu['demo_stage0_adapt_wall']:.0f} + stage 1 {cpu['demo_stage1_tune']:.0f}"
             f" + fit {cpu['map_fit_900']:.0f}")
    add("map", "DD2 variant, map start: regression only", m0, fid("map-fit.json"), parts)
    for name, key, label in (("map-fit-csd-150.json", "map_csd_150", "+ 50 guidance-only + 150 CSD steps"),
                             ("map-fit-csd-450.json", "map_csd_450", "+ 50 guidance-only + 450 CSD steps")):
        if (D / name).exists() and key in cpu:
            add("map", f"DD2 variant, map start {label}", m0 + cpu[key], fid(name), parts + f" + CSD {cpu[key]:.0f}")
    if "map_fit_900_lr1e-3" in cpu:  # the same fit at the map-fit preset's LR (1e-3) instead of DD1's (3e-4)
        m1 = pairs + cpu["demo_stage0_adapt_wall"] + cpu["demo_stage1_tune"] + cpu["map_fit_900_lr1e-3"]
        parts1 = parts.replace(f"fit {cpu['map_fit_900']:.0f}", f"fit {cpu['map_fit_900_lr1e-3']:.0f}")
        add("map-lr1e-3", "DD2 variant, map start, fit at LR 1e-3: regression only", m1, fid("map-fit-lr1e-3.json"), parts1)
        for recipe, name, key, label in (
                ("map-lr1e-3", "map-fit-lr1e-3-csd-150.json", "map_lr1e-3_csd_150", "+ 50 guidance-only + 150 CSD steps"),
                ("map-lr1e-3-csd-lr3e-5", "map-fit-lr1e-3-csd-150-lr3e-5.json", "map_lr1e-3_csd_150_lr3e-5",
                 "+ 50 guidance-only + 150 CSD steps at LR 3e-5")):
            if (D / name).exists() and key in cpu:
                add(recipe, f"DD2 variant, map start, fit at LR 1e-3 {label}", m1 + cpu[key], fid(name),
                    parts1 + f" + CSD {cpu[key]:.0f}")
    if (D / "dd1-300-csd-st-60.json").exists():
        c = cpu["dd1_300_csd_st_60"]
        add("dd1-start", "DD2 variant: DD1 (300 steps) + 20 guidance-only + 60 CSD steps, straight-through codes",
            pairs + cpu["dd1_train_300"] + c, fid("dd1-300-csd-st-60.json"),
            f"pairs {pairs:.0f} + train {cpu['dd1_train_300']:.0f} + CSD {c:.0f}")
    if (D / "dd1-300-csd-soft-60.json").exists():
        c = cpu["dd1_300_csd_soft_60"]
        add("dd1-start-soft", "DD2 variant: DD1 (300 steps) + 40 guidance-only + 60 CSD steps, softmax-expected codes (tau 0.1)",
            pairs + cpu["dd1_train_300"] + c, fid("dd1-300-csd-soft-60.json"),
            f"pairs {pairs:.0f} + train {cpu['dd1_train_300']:.0f} + CSD {c:.0f}")
    for steps in (150, 300, 600):
        if f"mapkd_{steps}" in cpu and (D / f"mapkd-{steps}-steps.json").exists():
            c = cpu[f"mapkd_{steps}"]
            add("mapkd", f"MapKD, {steps} steps", c, fid(f"mapkd-{steps}-steps.json"), f"train {c:.0f}")

    plateau, cost_file = LAB / "dd2-plateau.json", RESULTS / "training-cost.json"
    per_step = json.loads(cost_file.read_text())["totals"].get("dd2_csd_cpu_s_per_step") if cost_file.exists() else None
    if plateau.exists() and per_step:
        p = json.loads(plateau.read_text())
        s01 = p["cpu_s"]["adapt"] + p["cpu_s"]["tune"]
        for r in p["rows"]:
            add("plateau", f"DD2 paper recipe, paper LR schedule, {r['step']} CSD steps", s01 + r["step"] * per_step,
                {k: r[k] for k in ("fid_classifier", "precision", "recall")} | {"n": 2000},
                f"stages 0+1 {s01:.0f} + {r['step']} x {per_step:.2f}")
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.4))
    style = {"dd1": ("DD1", "tab:blue", "o"), "dd1 (bench)": ("DD1, the bench's run", "tab:cyan", "D"), "gts": ("DD2, paper recipe, the small preset (20-step warm-up, constant LR)", "tab:red", "s"),
             "plateau": ("DD2, paper recipe, paper LR schedule", "darkred", "h"),
             "map": ("DD2 variant: map start (regression + CSD)", "tab:green", "^"),
             "map-lr1e-3": ("DD2 variant: map start, fit at LR 1e-3", "tab:olive", "v"),
             "map-lr1e-3-csd-lr3e-5": ("the same, CSD at LR 3e-5", "tab:olive", "1"),
             "dd1-lr1e-3": ("DD1 at LR 1e-3", "navy", "*"),
             "dd1-start": ("DD2 variant: CSD from DD1's generator (straight-through)", "tab:purple", "x"),
             "dd1-start-soft": ("DD2 variant: CSD from DD1's generator (soft codes)", "tab:brown", "+"),
             "mapkd": ("MapKD (the project's own method)", "black", "P")}
    for recipe, (name, color, marker) in style.items():
        pts = sorted((r["cpu_s"], r["fid_classifier"]) for r in rows if r["recipe"] == recipe)
        if recipe.startswith("dd1-start") and pts:  # drawn from the DD1 generator it starts from
            pts = [next((r["cpu_s"], r["fid_classifier"]) for r in rows if r["point"] == "DD1, 300 steps"), *pts]
        if pts:
            ax.plot(*zip(*pts), marker=marker, color=color, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training CPU seconds (all stages, pairs included)")
    ax.set_ylabel("one-step classifier FID (2000 samples)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> dict:
    rows = points()
    result = {**provenance(), "points": rows}
    write_results(RESULTS / "fid-vs-cpu", result,
                  "One-step FID against training CPU time: DD1, MapKD, DD2 (paper recipe) and DD2's variants")
    plot(rows, RESULTS / "fid-vs-cpu.png")
    return result


if __name__ == "__main__":
    main()
