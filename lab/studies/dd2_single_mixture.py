"""CSD on the lowest rung of the ladder: one position, a single Dirac mixture (plain score distillation).

    OMP_NUM_THREADS=1 python lab/studies/dd2_single_mixture.py --variant default long4 ...

Each variant is ``fit_tabular`` on ``TabularTeacher(4, 1, 2, seed=1)`` (random or peaked rows) with one change;
every ``--every`` CSD steps it records the EMA generator's TV (``--n-eval`` samples), its per-code masses against
p, the fraction of outputs farther than 0.1 from every code ("blur": the samples that can still change cell) and
the mean distance of the outputs to their code. Results: lab/results/dd2-single-mixture.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: lab.*
from lab import tabular as tab  # noqa: E402  (its CSDSchedule is wrapped below to record the EMA generator)
from lab.tabular import TabularRunConfig, fit_tabular, generator_ids, tv_of_ids  # noqa: E402
from onestep.teacher.tabular import TabularTeacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = TabularRunConfig()
VARIANTS = {
    "default": {},
    "long4": {"csd": {"steps": 4800}},
    "lr5e-4": {"csd": {"lr": 5e-4}},
    "lr5e-4-long4": {"csd": {"lr": 5e-4, "steps": 4800}},
    "tmin0.3": {"csd": {"t_min": 0.3}},
    "tmax0.3": {"csd": {"t_max": 0.3}},
    "gen-t0.3": {"csd": {"generator_t": 0.3}},
    "batch512": {"csd": {"batch_size": 512}},
    "map": {"recipe": "map"},
    "map-lr5e-5": {"recipe": "map", "map_csd": {"lr": 5e-5}},
    "map-k10": {"recipe": "map", "map_csd": {"guidance_steps": 10}},
    "map-gb512": {"recipe": "map", "map_csd": {"guidance_batch_size": 512}},
    "map-tmin0.2": {"recipe": "map", "map_csd": {"t_min": 0.2}},
    "map-tmin0.4": {"recipe": "map", "map_csd": {"t_min": 0.4}},
    "map-dmd": {"recipe": "map", "map_csd": {"loss_form": "dmd"}},
    "res": {"csd": {"guidance_residual": True}},
    "map-res": {"recipe": "map", "map_csd": {"guidance_residual": True}},
    "psi": {"csd": {"guidance_lr": 5e-4, "m_noise": 8, "guidance_batch_size": 512}},
    "map-psi": {"recipe": "map", "map_csd": {"guidance_lr": 5e-4, "m_noise": 8, "guidance_batch_size": 512}},
}


def masses(ids: torch.Tensor, V: int) -> list[float]:
    return (torch.bincount(ids[:, 0], minlength=V).double() / len(ids)).tolist()


def run(kind: str, name: str, n_eval: int, every: int) -> dict:
    lo, hi = (0.3, 3.0) if kind == "random" else (0.1, 0.3)
    teacher = TabularTeacher(4, 1, 2, seed=1, min_temp=lo, max_temp=hi)
    change = VARIANTS[name]
    cfg = BASE.changed(n_eval=n_eval, **change)
    cb = teacher.codebook()
    curve = []

    def record(step, ema):
        x, ids = generator_ids(ema, teacher, n_eval, cfg.seed + 1)
        d = (x[:, 0, None] - cb).norm(dim=-1).min(-1).values
        curve.append({"step": step, "tv": tv_of_ids(teacher, ids), "blur": (d > 0.1).float().mean().item(),
                      "mean_dist": d.mean().item(), "masses": [round(m, 5) for m in masses(ids, 4)]})

    def log(step, logs, tv, tv_ema):
        record(step, sched_ema[0])

    sched_ema = [None]
    orig = tab.CSDSchedule

    class Recording(orig):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            sched_ema[0] = self.ema

    tab.CSDSchedule = Recording
    try:
        r = fit_tabular(teacher, cfg, log=log, log_every=every)
    finally:
        tab.CSDSchedule = orig
    p = teacher.marginals()[0].tolist()
    return {"kind": kind, "variant": name, "change": change, "p": [round(v, 5) for v in p],
            "tv_dd2_ema": r["tv_dd2_ema"], "tv_floor": r["tv_teacher_samples"], "tv_csd_start": r["tv_csd_start"],
            "tv_map_fit": r.get("tv_map_fit"), "csd_s": r["csd_time_s"], "curve": curve}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", nargs="+", default=["default"], choices=list(VARIANTS))
    ap.add_argument("--kind", nargs="+", default=["random"], choices=["random", "peaked"])
    ap.add_argument("--n-eval", type=int, default=200000)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "lab/results/dd2-single-mixture"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    prev = json.loads(out.with_suffix(".json").read_text())["runs"] if out.with_suffix(".json").exists() else []
    done = {(r["kind"], r["variant"]) for r in prev}
    runs = list(prev)
    for kind in a.kind:
        for name in a.variant:
            if (kind, name) in done:
                continue
            r = run(kind, name, a.n_eval, a.every)
            print(f"{kind} {name}: TV {r['tv_dd2_ema']:.4f} (floor {r['tv_floor']:.4f}); curve "
                  + " ".join(f"{c['step']}:{c['tv']:.4f}/{c['blur']:.3f}" for c in r["curve"]), flush=True)
            runs.append(r)
            table = [{"kind": r["kind"], "variant": r["variant"], "tv_ema": r["tv_dd2_ema"], "floor": r["tv_floor"],
                      "csd_start": r["tv_csd_start"], "end_blur": r["curve"][-1]["blur"] if r["curve"] else None,
                      "csd_s": r["csd_s"]} for r in runs]
            write_results(out, {**provenance(), "table": table, "runs": runs},
                          "CSD on one position (a single Dirac mixture of 4 codes in 2-D)")


if __name__ == "__main__":
    main()
