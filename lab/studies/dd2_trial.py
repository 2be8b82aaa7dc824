"""One ``fit_tabular`` run on a rung of the ladder with config changes given as JSON; prints one line of TVs.

    OMP_NUM_THREADS=1 python lab/studies/dd2_trial.py v4-n2-c2-random gts 20000 '{"csd": {"steps": 600}}'

Arguments: the rung (lab/studies/dd2_ladder.py's RUNGS), the recipe (gts | map), the evaluation sample count, and the
changes to ``TabularRunConfig`` (``csd`` / ``map_csd`` take a dict of CSDConfig fields). The lines of the runs quoted
in lab/dd2-convergence.md are collected in lab/results/dd2-trials.md.
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from dd2_ladder import make_teacher  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: lab.*
from lab.tabular import TabularRunConfig, fit_tabular  # noqa: E402

torch.set_num_threads(1)
rung, recipe, n_eval, change = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
cfg = TabularRunConfig(recipe=recipe, n_eval=n_eval).changed(**change)
t0 = time.time()
r = fit_tabular(make_teacher(rung), cfg)
print(f"{rung} {recipe} {json.dumps(change)}: ema {r['tv_dd2_ema']:.4f} raw {r['tv_dd2']:.4f} start "
      f"{r['tv_csd_start']:.4f} map {r.get('tv_map_fit')} floor {r['tv_teacher_samples']:.4f} tune {r['tune_time_s']} "
      f"csd {r['csd_time_s']} total {time.time() - t0:.0f}s", flush=True)
