"""The flow recipe on the tabular ladder: TV against the exact joint, and its cost, beside DD1's generator.

    OMP_NUM_THREADS=1 python lab/studies/dd2_flow_ladder.py      # -> lab/results/dd2-flow-ladder.{json,md}
    OMP_NUM_THREADS=1 python lab/studies/dd2_flow_ladder.py --parts prefix_codes dd1   # re-runs two parts, keeps the rest

Each rung's generator is the ladder's causal MLP backbone with a linear logits head, its tokens the recipe's ODE map
(``FlowConfig().ode`` on the codebook's grid), trained on the forward KL to the teacher's conditionals at its own
samples (``dd2_guidance_estimates.flow_row``: batch 256, cosine LR). TV on 200k samples against the floor (the
teacher's own 200k samples); the ladder's goal is at most 2x the floor. ``train_s`` is CPU seconds (one thread);
``dd1_train_s`` is DD1's generator training on the same rung (``dd2-ladder.json``, the map recipe's rows). Parts:
- ``rows``: budgets of 1500 steps at LR 3e-3, 6000 and 12000 steps at LR 1e-2;
- ``variants``: on v4-n2 at the first budget, a 4x wider backbone and a 4x larger batch; the third and fourth rungs
  at 24000 steps;
- ``prefix_codes``: the generator that also reads the code of each earlier position under its running marginal
  (``_TabularFlow``), at 12000 steps;
- ``staged``: the generator in two stages in one pass (``_TabularFlow`` "staged": a first network reads the prefix
  codes and gives logits l^A; the second reads the codes DD1's map gives each earlier noise under softmax(l^A)), at
  12000 steps; on v6-n5 with a 4x wider backbone at LR 3e-3;
- ``staged_more``: the same on the ladder's other rungs (near-deterministic tables, 8 codes in 4-D), the
  five-position ones with the wider backbone;
- ``staged3``: three networks (each reading the codes under the one before's logits) on the near-deterministic
  five-position rung;
- ``passes``: on every rung, the generator in passes of one network (``_TabularFlow`` "map+K": the first reads the
  prefix codes, each later one the codes DD1's map gives each earlier noise under the pass before's logits; the loss
  on the last): K + 1 = max(1, min(n - 1, 4)) passes (one pass is exact at n <= 2: position 0's code is its token),
  at 12000 steps; the five-position rungs at width 128
  and LR 3e-3 (about the FLOPs per sample of one pass at width 256), the others at the default width and LR 1e-2;
- ``dd1``: DD1's generator on the same backbone (reading eps_<=i, cross-entropy on 200k pairs of the exact map,
  argmax; ``dd1_row``) at the same budgets: what a one-step network of this size reaches by DD1's training.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402
from dd2_guidance_estimates import N_EVAL, flow_row, ladder_lr  # noqa: E402
from dd2_ladder import make_teacher  # noqa: E402

from onestep.flow_map import map_noise_to_tokens  # noqa: E402
from onestep.mapkd.train import MapKDConfig as FlowConfig  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: lab.*
from lab.tabular import CausalMLPBackbone, TabularRunConfig, tv_of_ids  # noqa: E402
from onestep.teacher.sampling import SamplingConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
RUNGS = ("v4-n1-c2-random", "v4-n2-c2-random", "v4-n3-c2-random", "v6-n3-c3-random", "v6-n5-c3-random")
BUDGETS = ((1500, 3e-3), (6000, 1e-2), (12000, 1e-2))
VARIANTS = (("v4-n2-c2-random", {"width": 256}), ("v4-n2-c2-random", {"batch": 1024}))
MORE_RUNGS = ("v4-n1-c2-peaked", "v6-n5-c3-peaked", "v8-n5-c4-random")
FIVE = ("v6-n5-c3-random", "v6-n5-c3-peaked", "v8-n5-c4-random")
PARTS = ("rows", "variants", "prefix_codes", "staged", "staged_more", "staged3", "passes", "passes_budgets",
         "passes_budgets_small", "dd1")
LONGER = (("v4-n3-c2-random", 24000, 1e-2), ("v6-n3-c3-random", 24000, 1e-2))  # twice the last budget


def staged_lr_width(rung: str) -> tuple[float, int | None]:
    """The staged generator's LR and width: 4x wider at LR 3e-3 on five positions, the default width at 1e-2 below."""
    return (3e-3, 256) if "-n5-" in rung else (1e-2, None)


def passes_row(rung: str, ladder: dict, steps: int = 12000) -> dict:
    """The ``passes`` part's row: max(1, min(n - 1, 4)) passes, see the module docstring."""
    n = int(rung.split("-")[1][1:])
    lr, width = (3e-3, 128) if n >= 5 else (1e-2, None)
    passes = max(1, min(n - 1, 4))
    return row(rung, ladder, steps, lr, width, prefix_codes="map" if passes == 1 else f"map+{passes - 1}")


def row(rung: str, ladder: dict, steps: int, lr: float, width: int | None = None, **kw) -> dict:
    r = flow_row(rung, steps=steps, lr=lr, width=width, **kw)
    out = {"rung": rung, "steps": steps, "lr": lr, "batch": kw.get("batch", 256), "width": width or "default",
           "prefix_codes": kw.get("prefix_codes") or "-", "tv": r["tv"], "floor": r["floor"],
           "tv_over_floor": round(r["tv"] / r["floor"], 2),
           "train_s": r["train_s"], "dd1_train_s": ladder.get(rung, {}).get("dd1_train_s")}
    print(out, flush=True)
    return out


def dd1_row(rung: str, steps: int, lr: float, n_pairs: int = 200_000, batch: int = 256) -> dict:
    """DD1's generator on the flow recipe's backbone: row i reads eps_<=i (the same causal MLP, the current position
    included) and gives logits over the codes, trained by cross-entropy on ``n_pairs`` pairs of DD1's exact map (the
    recipe's ODE under the teacher's conditionals), cosine LR; its token is the argmax (DD1's one step)."""
    teacher = make_teacher(rung)
    n, C, V = teacher.seq_len, teacher.code_dim, teacher.vocab_size
    cb, sampling, base = teacher.codebook(), SamplingConfig(), TabularRunConfig()
    torch.manual_seed(0)
    backbone = CausalMLPBackbone(n, C, 1, base.width, base.backbone_gain, include_current=True)
    head = torch.nn.Linear(base.width, V)
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=lr)
    g, t0 = torch.Generator().manual_seed(1), time.process_time()
    eps_p = torch.randn(n_pairs, n, C, generator=g)
    ids_p = map_noise_to_tokens(teacher, eps_p, torch.zeros(n_pairs, dtype=torch.long), sampling, FlowConfig().ode(cb))
    pairs_s, t0 = time.process_time() - t0, time.process_time()
    labels = torch.zeros(batch, dtype=torch.long)
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = ladder_lr(step, steps, lr)
        idx = torch.randint(0, n_pairs, (batch,), generator=g)
        loss = F.cross_entropy(head(backbone.features(eps_p[idx], labels)).reshape(-1, V), ids_p[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.process_time() - t0
    eps = torch.randn(N_EVAL, n, C, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ids = head(backbone.features(eps, torch.zeros(N_EVAL, dtype=torch.long))).argmax(-1)
    out = {"rung": rung, "generator": "dd1", "steps": steps, "lr": lr, "tv": round(tv_of_ids(teacher, ids), 4),
           "train_s": round(train_s, 1), "pairs_s": round(pairs_s, 1)}
    print(out, flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS,
                    help="the parts to (re-)run; the others are kept from the last results")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ladder = {r["rung"]: r for r in json.loads((RESULTS / "dd2-ladder.json").read_text())["table"]
              if r["recipe"] == "map"}
    last = RESULTS / "dd2-flow-ladder.json"
    parts = {k: v for k, v in (json.loads(last.read_text()) if last.exists() else {}).items() if k in PARTS}
    run = {"rows": lambda: [row(rung, ladder, steps, lr) for rung in RUNGS for steps, lr in BUDGETS],
           "variants": lambda: ([row(rung, ladder, 1500, 3e-3, **kw) for rung, kw in VARIANTS]
                                + [row(rung, ladder, steps, lr) for rung, steps, lr in LONGER]),
           "prefix_codes": lambda: [row(rung, ladder, steps, lr, prefix_codes="map") for rung in RUNGS
                                    for steps, lr in BUDGETS[2:]],
           "staged": lambda: [row(rung, ladder, 12000, *staged_lr_width(rung), prefix_codes="staged")
                              for rung in RUNGS],
           "staged_more": lambda: [row(rung, ladder, 12000, *staged_lr_width(rung), prefix_codes="staged")
                                   for rung in MORE_RUNGS],
           "staged3": lambda: [row(rung, ladder, 12000, *staged_lr_width(rung), prefix_codes="staged3")
                               for rung in MORE_RUNGS[1:2]],
           "passes": lambda: [passes_row(rung, ladder) for rung in (*RUNGS, *MORE_RUNGS)],
           "passes_budgets": lambda: [passes_row(rung, ladder, steps) for rung in FIVE for steps in (1500, 3000, 6000)],
           "passes_budgets_small": lambda: [passes_row(rung, ladder, steps) for rung in (*RUNGS[:4], MORE_RUNGS[0])
                                            for steps in (1500, 3000, 6000)],
           "dd1": lambda: [dd1_row(rung, steps, lr) for rung in RUNGS for steps, lr in BUDGETS[2:]]}
    for part in a.parts:
        parts[part] = run[part]()
    result = {**provenance(), "n_eval": N_EVAL, **{k: parts.get(k, []) for k in PARTS}}
    write_results(RESULTS / "dd2-flow-ladder", result, "DD2's flow recipe on the tabular ladder")
    return result


if __name__ == "__main__":
    main()
