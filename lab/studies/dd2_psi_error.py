"""The guidance network's error at the optimum: psi trained on a generator that sits at the exact map's fit.

    OMP_NUM_THREADS=1 python lab/studies/dd2_psi_error.py

On the ladder's lowest rung (``TabularTeacher(4, 1, 2, seed=1)``), the ``map`` recipe of ``fit_tabular`` with no
CSD step (the map fit, then ``guidance_warmup`` guidance-only steps) for several trainings of psi; then, at each t,
E|x0_psi - x0_T|^2 on 20k noised generator samples against the teacher's exact denoiser, beside the stage-1
model's error (GTS, exact targets). Results: lab/results/dd2-psi-error.{json,md}.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402

from onestep import flow  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: lab.*
from lab.tabular import TabularRunConfig, fit_tabular  # noqa: E402
from onestep.teacher.tabular import TabularTeacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TS = (0.05, 0.2, 0.5, 0.9)
# (guidance lr, noise draws per sequence, guidance batch, guidance-only steps)
TRAININGS = [(2e-3, 1, 128, 100), (5e-4, 1, 128, 100), (5e-4, 8, 128, 100), (2e-4, 8, 128, 300), (5e-4, 8, 512, 100)]


@torch.no_grad()
def errors(model, x, teacher, g) -> dict:
    lab = torch.zeros(len(x), dtype=torch.long)
    f, lp = model.features(x, lab), teacher.features(x, lab)
    out = {}
    for t in TS:
        q = (1 - t) * x + t * torch.randn(x.shape, generator=g)
        out[f"t={t}"] = (model.denoise(q, t, f) - flow.denoise(q, t, lp, teacher.codebook())).pow(2).sum(-1).mean().item()
    return out


def main() -> None:
    torch.set_num_threads(1)
    teacher = TabularTeacher(4, 1, 2, seed=1)
    rows = []
    for glr, m, gb, warm in TRAININGS:
        cfg = TabularRunConfig(recipe="map", n_eval=20000)
        cfg = dataclasses.replace(cfg, map_csd=dataclasses.replace(cfg.map_csd, steps=0, guidance_lr=glr, m_noise=m,
                                                                   guidance_batch_size=gb, guidance_warmup=warm))
        t0 = time.time()
        r = fit_tabular(teacher, cfg)
        g = torch.Generator().manual_seed(5)
        eps = torch.randn(20000, 1, 2, generator=g)
        x = r["models"]["generator"].generate(eps, torch.zeros(20000, dtype=torch.long)).detach()
        rows.append({"psi": f"lr {glr}, m {m}, batch {gb}, {warm} steps", **errors(r["models"]["guidance"], x, teacher, g),
                     "seconds": round(time.time() - t0, 1)})
        if len(rows) == 1:
            stage1 = {"psi": "stage-1 model (GTS, exact targets)", **errors(r["models"]["gts"], x, teacher, g)}
        print(rows[-1], flush=True)
    write_results(ROOT / "lab/results/dd2-psi-error", {**provenance(), "table": rows + [stage1]},
                  "The guidance network's x0 error against the exact teacher denoiser, generator at the map fit")


if __name__ == "__main__":
    main()
