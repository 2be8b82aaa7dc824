"""CSD on the image teacher's FIRST position alone: does stage 2 learn p_0(. | label) exactly?

    OMP_NUM_THREADS=1 python lab/studies/dd2_first_position.py --tune runs/bench/dd2-tune [--steps 600]

Position 0 is the part of CSD that is plain (label-conditional) score distillation: its teacher
distribution p_0(. | label) is known exactly (one teacher pass, after CFG), and the generator's row 0 sees
no noise prefix. The script runs the library's CSD (``DD2`` + ``CSDSchedule``: K guidance DSM updates per
SiD-form generator update, warm-up, EMA) on the stage-1 model restricted to the first position
(``FirstPositions``: the teacher is causal, so its first n positions are an exact n-token teacher) and
measures, for every label, the TV between the EMA generator's quantised position-0 samples and p_0, next
to the TV of the teacher's own samples of the same size (the noise floor).

Each row of ``CONFIGS`` is one CSD configuration (learning rates, K, generator_t, loss form). Writes
lab/results/dd2-first-position.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: lab.*

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402

RES = Path(__file__).resolve().parent / "results"

# name -> CSDConfig overrides. "small" is the `onestep dd2 train` preset this study started from.
CONFIGS = {
    "small preset before (lr 1e-4, guidance 2e-4, K 3)": dict(lr=1e-4, guidance_lr=2e-4, guidance_steps=3),
    "equal LRs 1e-3, K 3": dict(lr=1e-3, guidance_lr=1e-3, guidance_steps=3),
    "equal LRs 1e-3, K 3, dmd form": dict(lr=1e-3, guidance_lr=1e-3, guidance_steps=3, loss_form="dmd"),
    "two time-scale: lr 2e-4, guidance 1e-3, K 5": dict(lr=2e-4, guidance_lr=1e-3, guidance_steps=5),
    "two time-scale + generator_t 0.5": dict(lr=2e-4, guidance_lr=1e-3, guidance_steps=5, generator_t=0.5),
}


class FirstPositions(nn.Module):
    """The first ``n`` positions of a causal raster teacher, as an n-token teacher (exact: row i sees x_<i)."""

    def __init__(self, teacher, n: int):
        super().__init__()
        self.teacher, self.seq_len = teacher, n
        self.code_dim, self.num_classes, self.vocab_size = teacher.code_dim, teacher.num_classes, teacher.vocab_size

    def ar_steps(self):
        return [(i, i + 1) for i in range(self.seq_len)]

    def codebook(self) -> Tensor:
        return self.teacher.codebook()

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return self.teacher(x[:, : self.seq_len], labels)


@torch.no_grad()
def position0_tv(generator, teacher, sampling, n: int, seed: int) -> tuple[float, float, list[float]]:
    """Mean over labels of TV(quantised generator position 0, exact p_0); the same for n teacher samples."""
    from onestep.teacher.base import nearest_code
    from onestep.teacher.sampling import teacher_log_probs

    tvs, floors = [], []
    cb = teacher.codebook()
    for lab in range(teacher.num_classes):
        labels = torch.full((n,), lab)
        eps = torch.randn(n, 1, teacher.code_dim, generator=torch.Generator().manual_seed(seed + lab))
        x = generator.generate(eps, labels)
        p0 = teacher_log_probs(teacher, x[:1], labels[:1], sampling)[0, 0].exp()
        emp = torch.bincount(nearest_code(x[:, 0], cb), minlength=len(p0)).float() / n
        own = torch.multinomial(p0, n, True, generator=torch.Generator().manual_seed(seed + 100 + lab))
        tvs.append(0.5 * (emp - p0).abs().sum().item())
        floors.append(0.5 * (torch.bincount(own, minlength=len(p0)).float() / n - p0).abs().sum().item())
    return sum(tvs) / len(tvs), sum(floors) / len(floors), tvs


def run(tune_dir: str, overrides: dict, steps: int, batch: int, n_eval: int, seed: int, every: int) -> dict:
    from lab.csd_variants import CSDAblation, VariantDD2
    from onestep.dd2.csd import CSDConfig, CSDSchedule
    from onestep.dd2.tune import load_ardiffusion
    from onestep.runs import final_dir, resolve_ref
    from onestep.teacher.load import load_teacher
    from onestep.teacher.sampling import SamplingConfig

    init, tc = load_ardiffusion(tune_dir)
    full, _, _ = load_teacher(resolve_ref(tc["teacher_dir"], final_dir(tune_dir)), "cpu", with_tokenizer=False)
    teacher, sampling = FirstPositions(full, 1), SamplingConfig(**tc["sampling"])
    abl = {k: overrides[k] for k in overrides if k in CSDAblation.__dataclass_fields__}
    cfg = replace(CSDConfig(steps=steps, batch_size=batch, m_noise=2, warmup_steps=20, seed=seed),
                  **{k: v for k, v in overrides.items() if k not in abl})
    generator, guidance = copy.deepcopy(init).train(), copy.deepcopy(init).train()
    torch.manual_seed(seed)
    dd2 = VariantDD2(generator, guidance, teacher, sampling, cfg, CSDAblation(**abl))
    sched = CSDSchedule(dd2)
    g = torch.Generator().manual_seed(seed)
    labels = lambda n: torch.randint(teacher.num_classes, (n,), generator=g)  # noqa: E731
    tv0, floor, _ = position0_tv(generator, teacher, sampling, n_eval, seed)
    curve, t0 = [{"step": 0, "tv_ema": round(tv0, 4)}], time.time()
    for step in range(steps):
        sched.step(step, labels, g)
        if (step + 1) % every == 0:
            curve.append({"step": step + 1, "tv_ema": round(position0_tv(sched.ema, teacher, sampling, n_eval, seed)[0], 4)})
            print(f"  step {step + 1}: TV (EMA) {curve[-1]['tv_ema']}", flush=True)
    tv, _, per_label = position0_tv(sched.ema, teacher, sampling, n_eval, seed)
    return {"tv_init": round(tv0, 4), "tv_ema": round(tv, 4), "tv_floor": round(floor, 4),
            "tv_ema_per_label": [round(v, 3) for v in per_label], "curve": curve, "seconds": round(time.time() - t0, 1),
            "csd": {k: v for k, v in {**cfg.to_dict(), **dd2.ablation.to_dict()}.items()
                    if k in ("lr", "guidance_lr", "guidance_steps", "generator_t", "loss_form", "batch_size", "steps",
                             "m_noise")}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tune", required=True, help="a finished `onestep dd2 tune` run (the stage-1 model)")
    p.add_argument("--steps", type=int, default=600, help="generator updates per configuration")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=2000, help="samples per label for the TV")
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="run only the configurations whose name contains this")
    p.add_argument("--out", default=str(RES / "dd2-first-position"))
    a = p.parse_args(argv)
    rows = []
    for name, ov in CONFIGS.items():
        if a.only and not any(s in name for s in a.only):
            continue
        print(name, flush=True)
        r = run(a.tune, ov, a.steps, a.batch_size, a.n_eval, a.seed, a.every)
        rows.append({"config": name, "tv_init": r["tv_init"], "tv_ema": r["tv_ema"], "tv_floor": r["tv_floor"],
                     "worst_label_tv": max(r["tv_ema_per_label"]), "seconds": r["seconds"]})
        rows[-1]["details"] = r
    result = {**provenance(), "tune_dir": a.tune, "metric": "mean over the 10 labels of TV(EMA generator's quantised "
              f"position-0 samples, exact p_0); {a.n_eval} samples per label", "steps": a.steps, "batch_size": a.batch_size,
              "rows": [{k: v for k, v in r.items() if k != "details"} for r in rows],
              "curves": [{"config": r["config"], **{f"step_{c['step']}": c["tv_ema"] for c in r["details"]["curve"]}}
                         for r in rows], "details": {r["config"]: r["details"] for r in rows}}
    write_results(a.out, result, "DD2 stage 2 on the image teacher's first position (exact p_0)")
    return result


if __name__ == "__main__":
    main()
