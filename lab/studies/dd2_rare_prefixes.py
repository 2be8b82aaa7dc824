"""Why a one-pass flow generator misses the near-deterministic five-position teacher, and what does and does not help.

    OMP_NUM_THREADS=1 python lab/studies/dd2_rare_prefixes.py [--rows NAME ...]
        # -> lab/results/dd2-rare-prefixes.{json,md}; rows kept in lab/results/dd2-rare-prefixes/

The rung: v6-n5-c3-peaked (6 codes in 3-D, 5 positions, conditionals at temperature 0.1-0.3: the most likely
sequence holds 57% of the mass, 68 sequences 99%). Every row is the flow recipe (``dd2_guidance_estimates.flow_row``:
forward KL to the teacher's conditional at the generator's own prefix), batch 256, LR 3e-3 with a cosine decay, 6000
steps unless named; TV against the exact joint on 200k samples (floor 0.0041: the teacher's own 200k samples).

- "diagnosis": the one-step generator with prefix codes (width 256). Its conditional at position i is "misread" on a
  sample when its TV to the teacher's conditional at the sample's own prefix exceeds 0.2. The table gives, by the
  prefix's probability p_T(x_<i), the prefix mass and the misread rate; and the share of misread samples whose prefix
  changes when noise of standard deviation 0.05 is added to eps (a misread at a cell boundary) against that share
  among all samples;
  beside it, the teacher's own prefixes by probability (how many, their mass, training samples each).
- The controls (each changes that row in one respect, ``flow_row``'s keywords): width 1024; 4 residual blocks in
  place of the hidden layers; a wider
  noise law for half of each batch; an auxiliary loss decoding the prefix's tokens from each row; the KL weighted
  towards rare prefixes; two other exact token maps (probability-sorted inverse CDF, Gumbel-max of 6-D noise);
  the generator run in K + 1 passes of one network ("map+K", each pass reading the codes the map gives under the pass
  before's logits; at width 128, about the FLOPs per sample of one pass at width 256; two and three passes at width
  256 are in ``dd2_prefix_oracle.py``).
Rows are kept as they finish (a killed run resumes at the next row); ``--rows`` runs those (default: all missing).
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
from dd2_guidance_estimates import N_EVAL, flow_row  # noqa: E402

from onestep.teacher.sampling import SamplingConfig, teacher_log_probs  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
RUNG, STEPS, LR = "v6-n5-c3-peaked", 6000, 3e-3
BASE = {"prefix_codes": "map", "width": 256}
ROWS = {  # name: flow_row's keywords over BASE
    "diagnosis": {},
    "width 1024": {"width": 1024},
    "depth +4 residual blocks": {"depth": 4},
    "half the batch at noise scale 2": {"train_noise": 2.0},
    "prefix-token decoding loss (weight 1)": {"decode_weight": 1.0},
    "KL weighted by p_T(x_<i)^-0.5": {"rarity": 0.5},
    "sorted inverse-CDF map": {"token_map": "sorted"},
    "Gumbel-max map": {"token_map": "gumbel"},
    "no prefix codes": {"prefix_codes": None},
    "no prefix codes, sorted inverse-CDF map": {"prefix_codes": None, "token_map": "sorted"},
    "3 passes, width 128": {"prefix_codes": "map+2", "width": 128},
    "4 passes, width 128": {"prefix_codes": "map+3", "width": 128},
}
BINS = ((0.1, 1.0), (0.01, 0.1), (0.001, 0.01), (0.0, 0.001))


@torch.no_grad()
def diagnose(gen, teacher, delta: float = 0.05, misread: float = 0.2) -> list[dict]:
    """Misreads by prefix probability at the last two positions, and their share at a cell boundary."""
    n = teacher.seq_len
    eps = torch.randn(N_EVAL, n, gen.noise_dim, generator=torch.Generator().manual_seed(99))
    labels = torch.zeros(N_EVAL, dtype=torch.long)
    log_q = gen.eval()(eps, labels)
    ids = gen.tokens(eps, log_q)
    log_p = teacher_log_probs(teacher, ids, labels, SamplingConfig()).float()
    cond_tv = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)  # (N, n)
    log_px = log_p.gather(-1, ids[..., None])[..., 0]
    prefix_p = (torch.cumsum(log_px, 1) - log_px).exp()  # p_T(x_<i)
    moved = eps + delta * torch.randn(eps.shape, generator=torch.Generator().manual_seed(5))
    changed = (gen.tokens(moved, gen(moved, labels)) != ids).int().cummax(1).values  # x_<=j changed
    rows = []
    for i in (n - 2, n - 1):
        bad = cond_tv[:, i] > misread
        boundary = changed[:, i - 1].bool()
        for lo, hi in BINS:
            m = (prefix_p[:, i] > lo) & (prefix_p[:, i] <= hi)
            rows.append({"position": i, "prefix_prob": f"({lo}, {hi}]", "prefix_mass": round(m.float().mean().item(), 4),
                         "misread_rate": round(bad[m].float().mean().item(), 3) if m.any() else None,
                         "cond_tv_mass": round((cond_tv[:, i] * m).mean().item(), 4)})
        rows.append({"position": i, "prefix_prob": "all", "prefix_mass": 1.0,
                     "misread_rate": round(bad.float().mean().item(), 4),
                     "cond_tv_mass": round(cond_tv[:, i].mean().item(), 4),
                     "misread_at_boundary": round(boundary[bad].float().mean().item(), 3),
                     "all_at_boundary": round(boundary.float().mean().item(), 3)})
    return rows


def teacher_prefixes(batch: int = 256) -> list[dict]:
    """The teacher's prefixes of the last two positions by probability: how many, their mass, and how many training
    samples each gets over the diagnosis row's steps at that mass."""
    from dd2_ladder import make_teacher

    teacher = make_teacher(RUNG)
    V, n = teacher.vocab_size, teacher.seq_len
    joint, rows = teacher.exact_joint().double().cpu(), []
    for i in (n - 2, n - 1):
        prefix_p = joint.reshape(V ** i, -1).sum(1)
        for lo, hi in BINS:
            m = (prefix_p > lo) & (prefix_p <= hi) & (prefix_p > 0)
            count, mass = int(m.sum()), prefix_p[m].sum().item()
            rows.append({"position": i, "prefix_prob": f"({lo}, {hi}]", "prefixes": count, "mass": round(mass, 4),
                         "train_samples_each": round(STEPS * batch * mass / count) if count else None})
    return rows


def run_row(name: str) -> dict:
    kw = {**BASE, "steps": STEPS, "lr": LR, **ROWS[name]}
    r = flow_row(RUNG, keep_generator=name == "diagnosis", **kw)
    out = {"row": name, **{k: v for k, v in kw.items() if k not in ("lr",)}, "tv": r["tv"], "floor": r["floor"],
           "tv_over_floor": round(r["tv"] / r["floor"], 2), "tv_prefix": r["tv_prefix"], "train_s": r["train_s"]}
    if name == "diagnosis":
        out["misreads"] = diagnose(r["generator"], r["teacher"])
    return out


def path(name: str) -> Path:
    """Where a row is kept: its name with the characters a file name should not hold dropped."""
    return RESULTS / "dd2-rare-prefixes" / ("".join(c for c in name.replace(" ", "_") if c.isalnum() or c in "_-+.")
                                           + ".json")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), help="rows to (re-)run (default: those not yet kept)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    (RESULTS / "dd2-rare-prefixes").mkdir(parents=True, exist_ok=True)
    for name in a.rows or [r for r in ROWS if not path(r).exists()]:
        out = run_row(name)
        path(name).write_text(json.dumps({**provenance(), **out}, indent=2) + "\n")
        print({k: v for k, v in out.items() if k != "misreads"}, flush=True)
    done = [json.loads(path(r).read_text()) for r in ROWS if path(r).exists()]
    cols = ("row", "prefix_codes", "width", "steps", "tv", "floor", "tv_over_floor", "tv_prefix", "train_s", "commit")
    result = {**provenance(), "rung": RUNG, "n_eval": N_EVAL,
              "rows": [{k: d.get(k) for k in cols} for d in done],
              "misreads": next((d["misreads"] for d in done if d["row"] == "diagnosis"), []),
              "teacher_prefixes": teacher_prefixes()}
    write_results(RESULTS / "dd2-rare-prefixes", result, "The near-deterministic five-position rung: rare prefixes")
    return result


if __name__ == "__main__":
    main()
