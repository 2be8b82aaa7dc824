"""A ladder of tabular teachers: DD2 (both recipes) against DD1's exact map, onestep* and the sampling floor.

    OMP_NUM_THREADS=1 python lab/studies/dd2_ladder.py --recipe gts map --n-eval 200000

Rungs go from one position (a single Dirac mixture: plain score distillation) to 5 positions, 4 to 8 codes, 2-D
to 4-D codes, random tables (per-row temperatures 0.3-3) and near-deterministic ones (0.1-0.3). For each rung and
recipe, at ``--n-eval`` samples each (the same evaluation noise for every generator):

- ``floor``: TV of the teacher's own samples against its exact joint (the sampling floor at that size);
- ``dd1_map``: TV of DD1's exact noise-to-token map (the ODE of method.md section 1, AB2 200 steps);
- ``onestep_star``: independent per-position sampling from the exact marginals;
- ``map_fit``: DD2's generator network regressed onto DD1 pairs (the "map" recipe before CSD, i.e. a DD1-style
  generator with DD2's architecture; its cost is the DD1 cost: pairs + fit);
- ``dd2`` / ``dd2_ema``: the DD2 generator after CSD, raw and EMA, with the recipe named in every row.

Each rung and recipe is one JSON file under ``--out``/; a finished one is re-used (delete it to re-run), so an
interrupted ladder resumes. The summary is ``--out``.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402

from onestep.flow_map import map_noise_to_tokens  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: lab.*
from lab.tabular import TabularRunConfig, fit_tabular, onestep_star_tv, tv_of_ids  # noqa: E402
from onestep.teacher.sampling import SamplingConfig, sample_tokens  # noqa: E402
from onestep.teacher.tabular import TabularTeacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"random": (0.3, 3.0), "peaked": (0.1, 0.3)}
# name: (codes V, positions n, code dim C, table kind, teacher seed)
RUNGS = {
    "v4-n1-c2-random": (4, 1, 2, "random", 1),
    "v4-n1-c2-peaked": (4, 1, 2, "peaked", 1),
    "v4-n2-c2-random": (4, 2, 2, "random", 1),
    "v4-n3-c2-random": (4, 3, 2, "random", 6),
    "v6-n3-c3-random": (6, 3, 3, "random", 1),
    "v6-n5-c3-random": (6, 5, 3, "random", 1),
    "v6-n5-c3-peaked": (6, 5, 3, "peaked", 1),
    "v8-n5-c4-random": (8, 5, 4, "random", 1),
}


def make_teacher(name: str) -> TabularTeacher:
    V, n, C, kind, seed = RUNGS[name]
    lo, hi = KINDS[kind]
    return TabularTeacher(V, n, C, seed=seed, min_temp=lo, max_temp=hi)


def references(teacher: TabularTeacher, n_eval: int, seed: int) -> dict:
    """The floor, onestep* and DD1's exact map at n_eval samples, with the map's time."""
    sampling = SamplingConfig()
    ids = sample_tokens(teacher, torch.zeros(n_eval, dtype=torch.long), sampling, torch.Generator().manual_seed(seed + 7))
    t0 = time.time()
    eps = torch.randn(n_eval, teacher.seq_len, teacher.code_dim, generator=torch.Generator().manual_seed(seed + 1))
    mapped = map_noise_to_tokens(teacher, eps, torch.zeros(n_eval, dtype=torch.long), sampling)
    return {"floor": tv_of_ids(teacher, ids), "dd1_map": tv_of_ids(teacher, mapped),
            "dd1_map_s_per_1k": round(1000 * (time.time() - t0) / n_eval, 4),
            "onestep_star": onestep_star_tv(teacher, n_eval, seed + 1)}


def run_rung(name: str, recipe: str, cfg: TabularRunConfig, out_dir: Path) -> dict:
    path = out_dir / f"{name}-{recipe}.json"
    if path.exists():
        return json.loads(path.read_text())
    teacher = make_teacher(name)
    V, n, C, kind, tseed = RUNGS[name]
    cfg = dataclasses.replace(cfg, recipe=recipe)
    t0 = time.time()
    ref = references(teacher, cfg.n_eval, cfg.seed)
    r = fit_tabular(teacher, cfg)
    r.pop("models")
    row = {"rung": name, "recipe": recipe, "V": V, "n": n, "C": C, "kind": kind, "teacher_seed": tseed,
           "sequences": V ** n, "n_eval": cfg.n_eval, **ref,
           "map_fit": r.get("tv_map_fit"), "csd_start": r["tv_csd_start"], "dd2": r["tv_dd2"], "dd2_ema": r["tv_dd2_ema"],
           "dd2_over_floor": r["tv_dd2_ema"] / ref["floor"],
           "tune_s": r["tune_time_s"], "pairs_s": r.get("pairs_time_s", 0.0), "map_s": r.get("map_time_s", 0.0),
           "csd_s": r["csd_time_s"], "wall_s": round(time.time() - t0, 1), "config": cfg.to_dict(), **provenance()}
    row["dd2_train_s"] = round(row["tune_s"] + row["pairs_s"] + row["map_s"] + row["csd_s"], 1)
    row["dd1_train_s"] = round(row["pairs_s"] + row["map_s"], 1) if recipe == "map" else None
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=2, default=str))
    tmp.replace(path)
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rungs", nargs="+", default=list(RUNGS), choices=list(RUNGS))
    p.add_argument("--recipe", nargs="+", default=["gts", "map"], choices=["gts", "map"])
    p.add_argument("--n-eval", type=int, default=200000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "lab/results/dd2-ladder"))
    p.add_argument("--summary-only", action="store_true", help="only rewrite the summary from the rungs' files")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TabularRunConfig(seed=a.seed, n_eval=a.n_eval)
    out_dir = Path(a.out)
    rows = []
    for name in a.rungs:
        for recipe in a.recipe:
            path = out_dir / f"{name}-{recipe}.json"
            if a.summary_only and not path.exists():
                continue
            row = run_rung(name, recipe, cfg, out_dir)
            print(f"{name} [{recipe}]: floor {row['floor']:.4f} dd1-map {row['dd1_map']:.4f} onestep* "
                  f"{row['onestep_star']:.4f} map-fit {row['map_fit']} dd2-ema {row['dd2_ema']:.4f} "
                  f"({row['dd2_over_floor']:.1f}x floor) in {row['dd2_train_s']} s", flush=True)
            rows.append(row)
    keys = ["rung", "recipe", "sequences", "floor", "dd1_map", "onestep_star", "map_fit", "csd_start", "dd2", "dd2_ema",
            "dd2_over_floor", "dd2_train_s", "dd1_train_s"]
    table = [{k: r[k] for k in keys} for r in rows]
    result = {**provenance(), "n_eval": a.n_eval, "goal": "dd2_ema <= 2 x floor on every rung",
              "rows_ran_at": sorted({f"{r['commit']}: {r['command']}" for r in rows}),
              "rungs": {k: dict(zip(["V", "n", "C", "kind", "teacher_seed"], v)) for k, v in RUNGS.items()},
              "table": table}
    write_results(out_dir.with_suffix(""), result, "DD2 on a ladder of tabular teachers (TV against the exact joint)")
    return result


if __name__ == "__main__":
    main()
