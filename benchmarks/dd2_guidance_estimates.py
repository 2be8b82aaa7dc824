"""Three estimates of the generator's conditional score in CSD, on the single Dirac mixture (ladder rung v4-n1, gts
recipe, 1200 CSD steps) and the flow recipe on the ladder's first rungs: what the guidance network's error costs.

    OMP_NUM_THREADS=1 python benchmarks/dd2_guidance_estimates.py     # -> benchmarks/results/dd2-guidance-estimates.*

- psi (the paper's guidance network, trained by DSM, K = 5 turns per generator step);
- M resampled draws (``CSDAblation(guidance_resample=M)``): the generator's own conditional sampled M times with the
  prefix noise kept, and the closed-form denoiser of their uniform mixture in place of psi (exact as M grows, biased
  at small M: the mixture of M points is spikier than the generator's distribution);
- the flow recipe (``onestep.dd2.flowhead``): the generator's conditional is softmax(l) by construction, on a tabular
  generator (the ladder's causal MLP backbone + a linear logits head) trained on the teacher's conditionals.

TV against the exact joint on 200k samples (the floor: the teacher's own samples of that size).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance, write_results  # noqa: E402
from dd2_ladder import make_teacher  # noqa: E402

from onestep.dd1.flow_map import ode_map  # noqa: E402
from onestep.dd2.flowhead import FlowConfig, flow_loss  # noqa: E402
from onestep.dd2.tabular import CausalMLPBackbone, TabularRunConfig, fit_tabular  # noqa: E402
from onestep.teacher.sampling import SamplingConfig, sample_tokens, teacher_log_probs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
N_EVAL = 200_000


def csd_row(rung: str, resample: int) -> dict:
    teacher = make_teacher(rung)
    cfg = TabularRunConfig().changed(n_eval=N_EVAL, csd={"guidance_resample": resample} if resample else {})
    out = fit_tabular(teacher, cfg)
    return {"rung": rung, "estimate": f"{resample} resampled draws" if resample else "psi (DSM network)",
            "tv": round(out["tv_dd2"], 4), "tv_ema": round(out["tv_dd2_ema"], 4),
            "floor": round(out["tv_teacher_samples"], 4), "train_s": round(out["tune_time_s"] + out["csd_time_s"], 1)}


STAGES = {"staged": 1, "staged3": 2}  # the networks before the last one
PREFIX_CODES = ("map", "map-uniform", "map-4", "laguerre", "soft-laguerre", "tokens", "map+1", "map+2", *STAGES)
MARGINAL_READERS = ("map", "map-4", "laguerre", "map+1", "map+2", *STAGES)  # the modes whose codes use the marginal


class _TabularFlow(torch.nn.Module):
    """The flow recipe's generator on a tabular teacher: log softmax(l_i), l_i = Linear(f_i(eps_<i)), for
    :func:`onestep.dd2.flowhead.flow_loss`.

    ``prefix_codes``: row i also reads, for each j < i, a one-hot code computed from eps_j alone. "map" (the tabular
    form of ``FlowConfig.prefix_codes``): the code DD1's map (the recipe's ODE) gives eps_j under the generator's
    running marginal at position j (an EMA of its batches' softmax(l_j) while training; exact at j = 0, whose l is a
    constant). Controls: "map-uniform" (under the uniform prior), "map-4" (a 4-step ODE), "laguerre" (the Laguerre
    cell argmax_k a eps_j.c_k - a |c_k|^2 / 2 + log m_jk under the running marginal m, a = 4), "soft-laguerre" (its
    softmax with a and the biases learnt, from a = 4 and zero), "tokens" (an oracle, not a one-step generator: the
    generator's own tokens at j, found by n - 1 passes without gradient, pass r fixing position r - 1), "map+K" ("map",
    then K passes without gradient that re-map each eps_j under the generator's own logits, so a K + 1-pass generator),
    "staged" (one pass through two networks: a first backbone reads the "map" codes and gives logits l^A, trained on the
    same conditionals; the codes the map gives eps_j under softmax(l^A_j) are the second backbone's prefix codes),
    "staged3" (the same with three networks, each reading the codes under the one before's logits).
    The codes enter the backbone beside the gained noise at unit scale."""

    DECAY = 0.95
    ALPHA = 4.0

    def __init__(self, backbone: CausalMLPBackbone, head: torch.nn.Linear, codebook: torch.Tensor,
                 ode=None, prefix_codes: str | None = None):
        super().__init__()
        if prefix_codes not in (None, *PREFIX_CODES):
            raise ValueError(f"prefix_codes must be one of {PREFIX_CODES}, got {prefix_codes!r}")
        self.backbone, self.head, self.cb, self.ode, self.prefix_codes = backbone, head, codebook, ode, prefix_codes
        n, V = backbone.seq_len, codebook.shape[0]
        self.register_buffer("prior", torch.full((n, V), 1.0 / V))
        self.stages, self.log_q_stages = None, []
        if prefix_codes in STAGES:
            width = backbone.feature_dim
            self.stages = torch.nn.ModuleList(
                torch.nn.ModuleList([CausalMLPBackbone(n, backbone.code_dim, 1, width, backbone.input_gain),
                                     torch.nn.Linear(width, V)]) for _ in range(STAGES[prefix_codes]))
        if prefix_codes == "soft-laguerre":
            self.alpha, self.bias = torch.nn.Parameter(torch.tensor(self.ALPHA)), torch.nn.Parameter(torch.zeros(n, V))

    def codebook(self) -> torch.Tensor:
        return self.cb

    def codes(self, eps: torch.Tensor) -> torch.Tensor:
        """(B, n, V) the one-hot (soft for "soft-laguerre") code of every position from its own noise."""
        V, mode = self.cb.shape[0], self.prefix_codes
        mode = "map" if mode.startswith("map+") or mode in STAGES else mode
        if mode.endswith("laguerre"):
            cells = eps @ self.cb.T - 0.5 * (self.cb * self.cb).sum(-1)  # (B, n, V): eps.c_k - |c_k|^2 / 2
        if mode == "soft-laguerre":
            return torch.softmax(self.alpha * cells + self.bias, -1)
        with torch.no_grad():
            log_m = self.prior.log().expand(*eps.shape[:2], V)
            if mode == "laguerre":
                ids = (self.ALPHA * cells + log_m).argmax(-1)
            else:
                ode = replace(self.ode, n_steps=4) if mode == "map-4" else self.ode
                ids = ode_map(eps, torch.zeros_like(log_m) if mode == "map-uniform" else log_m, self.cb, ode)
            return torch.nn.functional.one_hot(ids, V).to(eps.dtype)

    def _log_q(self, eps: torch.Tensor, codes: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        x = eps if codes is None else torch.cat([eps, codes / self.backbone.input_gain], -1)
        return torch.log_softmax(self.head(self.backbone.features(x, labels)), -1)

    def own_tokens(self, eps: torch.Tensor, labels: torch.Tensor, codes: torch.Tensor | None = None,
                   passes: int | None = None) -> torch.Tensor:
        """(B, n, V) one-hot: the generator's own tokens, by n - 1 passes from any ``codes`` (row i reads codes at
        j < i only); fewer ``passes`` leave the later positions a guess."""
        V = self.cb.shape[0]
        codes = torch.zeros(*eps.shape[:2], V, dtype=eps.dtype) if codes is None else codes
        with torch.no_grad():
            for _ in range(eps.shape[1] - 1 if passes is None else passes):
                codes = torch.nn.functional.one_hot(ode_map(eps, self._log_q(eps, codes, labels), self.cb, self.ode),
                                                    V).to(eps.dtype)
        return codes

    def forward(self, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        codes = None
        if self.prefix_codes == "tokens":
            codes = self.own_tokens(eps, labels)
        elif self.prefix_codes in STAGES:
            codes, self.log_q_stages = self.codes(eps), []
            for backbone_s, head_s in self.stages:
                x = torch.cat([eps, codes / backbone_s.input_gain], -1)
                self.log_q_stages.append(torch.log_softmax(head_s(backbone_s.features(x, labels)), -1))
                codes = torch.nn.functional.one_hot(ode_map(eps, self.log_q_stages[-1].detach(), self.cb, self.ode),
                                                    self.cb.shape[0]).to(eps.dtype)
        elif self.prefix_codes and self.prefix_codes.startswith("map+"):
            codes = self.own_tokens(eps, labels, self.codes(eps), int(self.prefix_codes[4:]))
        elif self.prefix_codes:
            codes = self.codes(eps)
        log_q = self._log_q(eps, codes, labels)
        if self.training and self.prefix_codes in MARGINAL_READERS:
            with torch.no_grad():
                self.prior.mul_(self.DECAY).add_((1 - self.DECAY) * log_q.exp().mean(0))
        return log_q


def prefix_tvs(teacher, ids: torch.Tensor) -> list[float]:
    """TV of the joint of the first k positions against the teacher's, for k = 1..n (the last is the full TV)."""
    V, n = teacher.vocab_size, teacher.seq_len
    joint, out = teacher.exact_joint().double().cpu(), []
    for k in range(1, n + 1):
        flat = (ids[:, :k].cpu() * V ** torch.arange(k - 1, -1, -1)).sum(-1)
        emp = torch.bincount(flat, minlength=V ** k).double() / len(flat)
        out.append(round(0.5 * (emp - joint.reshape(V ** k, -1).sum(1)).abs().sum().item(), 4))
    return out


def ladder_lr(step: int, steps: int, lr: float) -> float:
    """The tabular runs' LR at ``step``: a 20-step linear ramp times a cosine from ``lr`` to 0 over all steps."""
    return lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))


def flow_row(rung: str, steps: int = 1500, batch: int = 256, lr: float = 3e-3, width: int | None = None,
             prefix_codes: str | None = None, input_gain: float | None = None) -> dict:
    """The flow recipe on a tabular teacher: l_i = Linear(f_i(eps_<i)), tokens = ODE map of eps_i under softmax(l_i)
    (the recipe's map: ``FlowConfig().ode`` on the codebook's grid), forward KL to the teacher's conditional at the
    generated prefix, cosine LR. ``width``, ``input_gain``: the backbone's (default: ``TabularRunConfig``'s);
    ``prefix_codes``: see :class:`_TabularFlow`."""
    teacher = make_teacher(rung)
    n, C, V = teacher.seq_len, teacher.code_dim, teacher.vocab_size
    cb, sampling, base = teacher.codebook(), SamplingConfig(), TabularRunConfig()
    torch.manual_seed(0)
    width = width or base.width
    backbone = CausalMLPBackbone(n, C + V * bool(prefix_codes), 1, width, input_gain or base.backbone_gain)
    head = torch.nn.Linear(width, V)
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=lr)
    ode = FlowConfig().ode(cb)

    gen = _TabularFlow(backbone, head, cb, ode, prefix_codes)
    if gen.stages is not None:
        opt.add_param_group({"params": list(gen.stages.parameters())})
    g, labels, t0 = torch.Generator().manual_seed(1), torch.zeros(batch, dtype=torch.long), time.process_time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = ladder_lr(step, steps, lr)
        eps = torch.randn(batch, n, C, generator=g)
        if gen.stages is None:
            loss, _ = flow_loss(gen, teacher, sampling, eps, labels, ode)
        else:  # flow_loss's forward KL, at the generated tokens, of every stage's logits
            log_q = gen(eps, labels)
            with torch.no_grad():
                log_p = teacher_log_probs(teacher, ode_map(eps, log_q.detach(), cb, ode), labels, sampling).float()
            p = log_p.exp()
            loss = sum(torch.where(p > 0, p * (log_p - lq), torch.zeros_like(p)).sum(-1).mean()
                       for lq in (log_q, *gen.log_q_stages))
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.process_time() - t0  # CPU seconds (one thread)
    eps = torch.randn(N_EVAL, n, C, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ids = ode_map(eps, gen.eval()(eps, torch.zeros(N_EVAL, dtype=torch.long)), cb, ode)
    floor_ids = sample_tokens(teacher, torch.zeros(N_EVAL, dtype=torch.long), sampling, torch.Generator().manual_seed(7))
    tv_prefix, floor_prefix = prefix_tvs(teacher, ids), prefix_tvs(teacher, floor_ids)  # the last: the whole joint's
    return {"rung": rung, "estimate": "flow recipe (closed-form conditional)", "tv": tv_prefix[-1], "tv_ema": None,
            "floor": floor_prefix[-1], "train_s": round(train_s, 1), "tv_prefix": tv_prefix, "floor_prefix": floor_prefix}


def main() -> dict:
    torch.set_num_threads(1)
    rows = [csd_row("v4-n1-c2-random", m) for m in (0, 16, 64)]
    rows += [flow_row(r) for r in ("v4-n1-c2-random", "v4-n2-c2-random", "v4-n3-c2-random", "v6-n3-c3-random")]
    for r in rows:
        print(r, flush=True)
    result = {**provenance(), "n_eval": N_EVAL, "rows": rows}
    write_results(RESULTS / "dd2-guidance-estimates", result, "DD2: estimates of the generator's conditional score")
    return result


if __name__ == "__main__":
    main()
