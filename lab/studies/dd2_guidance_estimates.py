"""Three estimates of the generator's conditional score in CSD, on the single Dirac mixture (ladder rung v4-n1, gts
recipe, 1200 CSD steps) and the flow recipe on the ladder's first rungs: what the guidance network's error costs.

    OMP_NUM_THREADS=1 python lab/studies/dd2_guidance_estimates.py     # -> lab/results/dd2-guidance-estimates.*

- psi (the paper's guidance network, trained by DSM, K = 5 turns per generator step);
- M resampled draws (``CSDAblation(guidance_resample=M)``): the generator's own conditional sampled M times with the
  prefix noise kept, and the closed-form denoiser of their uniform mixture in place of psi (exact as M grows, biased
  at small M: the mixture of M points is spikier than the generator's distribution);
- the flow recipe (``onestep.mapkd``, MapKD): the generator's conditional is softmax(l) by construction, on a tabular
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
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402
from dd2_ladder import make_teacher  # noqa: E402

from onestep.flow_map import ode_map  # noqa: E402
from onestep.mapkd.train import MapKDConfig as FlowConfig, mapkd_loss as flow_loss  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: lab.*
from lab.tabular import CausalMLPBackbone, TabularRunConfig, fit_tabular  # noqa: E402
from onestep.teacher.sampling import SamplingConfig, sample_tokens, teacher_log_probs  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
N_EVAL = 200_000


def csd_row(rung: str, resample: int) -> dict:
    teacher = make_teacher(rung)
    cfg = TabularRunConfig().changed(n_eval=N_EVAL, csd={"guidance_resample": resample} if resample else {})
    out = fit_tabular(teacher, cfg)
    return {"rung": rung, "estimate": f"{resample} resampled draws" if resample else "psi (DSM network)",
            "tv": round(out["tv_dd2"], 4), "tv_ema": round(out["tv_dd2_ema"], 4),
            "floor": round(out["tv_teacher_samples"], 4), "train_s": round(out["tune_time_s"] + out["csd_time_s"], 1)}


def sorted_icdf_map(eps: torch.Tensor, log_q: torch.Tensor, codebook=None, ode=None) -> torch.Tensor:
    """(B, n) a token map with the law softmax(log_q) exactly: the inverse CDF at u = Phi(eps[..., 0]) over the codes in
    decreasing probability (so u below the top code's mass gives the most likely code whatever the prefix)."""
    q = log_q.exp()
    order = torch.argsort(-q, dim=-1, stable=True)
    cum = torch.cumsum(q.gather(-1, order), -1)
    u = torch.special.ndtr(eps[..., 0]).clamp(max=1 - 1e-7)[..., None] * cum[..., -1:]
    return order.gather(-1, (cum < u).sum(-1, keepdim=True).clamp(max=q.shape[-1] - 1))[..., 0]


def gumbel_max_map(eps: torch.Tensor, log_q: torch.Tensor, codebook=None, ode=None) -> torch.Tensor:
    """(B, n) a token map with the law softmax(log_q) exactly, from V-dim noise: argmax_k log_q_k + G(eps_k), G the
    Gumbel quantile of Phi(eps_k) (the cells are half-spaces in G: a row reads an earlier token by comparisons)."""
    return (log_q - torch.log(-torch.log(torch.special.ndtr(eps).clamp(1e-12, 1 - 1e-7)))).argmax(-1)


TOKEN_MAPS = {"ode": ode_map, "sorted": sorted_icdf_map, "gumbel": gumbel_max_map}


class _Residual(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = (torch.nn.LayerNorm(width), torch.nn.Linear(width, width),
                                         torch.nn.Linear(width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(h))))


def deepen(backbone: CausalMLPBackbone, depth: int) -> CausalMLPBackbone:
    """The ladder's backbone with its hidden layers replaced by ``depth`` residual blocks and a normalised last layer."""
    if depth:
        w = backbone.feature_dim
        backbone.net = torch.nn.Sequential(backbone.net[0], torch.nn.SiLU(), *(_Residual(w) for _ in range(depth)),
                                           torch.nn.LayerNorm(w), torch.nn.Linear(w, w))
    return backbone


STAGES = {"staged": 1, "staged3": 2}  # the networks before the last one
PREFIX_CODES = ("map", "map-uniform", "map-4", "laguerre", "soft-laguerre", "tokens", "map+1", "map+2", "map+3", *STAGES)
MARGINAL_READERS = ("map", "map-4", "laguerre", "map+1", "map+2", "map+3", *STAGES)  # the modes whose codes use the marginal


class _TabularFlow(torch.nn.Module):
    """The flow recipe's generator on a tabular teacher: log softmax(l_i), l_i = Linear(f_i(eps_<i)), for
    :func:`onestep.mapkd.train.mapkd_loss`.

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
                 ode=None, prefix_codes: str | None = None, token_map: str = "ode"):
        super().__init__()
        if prefix_codes not in (None, *PREFIX_CODES):
            raise ValueError(f"prefix_codes must be one of {PREFIX_CODES}, got {prefix_codes!r}")
        if token_map not in TOKEN_MAPS:
            raise ValueError(f"token_map must be one of {tuple(TOKEN_MAPS)}, got {token_map!r}")
        self.backbone, self.head, self.cb, self.ode, self.prefix_codes = backbone, head, codebook, ode, prefix_codes
        self.token_map, self.features_ = TOKEN_MAPS[token_map], None
        self.noise_dim = codebook.shape[0] if token_map == "gumbel" else codebook.shape[1]  # per position
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
                ids = self.token_map(eps, torch.zeros_like(log_m) if mode == "map-uniform" else log_m, self.cb, ode)
            return torch.nn.functional.one_hot(ids, V).to(eps.dtype)

    def tokens(self, eps: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """(B, n) the token of every position: the recipe's map of eps_i under softmax(log_q_i)."""
        return self.token_map(eps, log_q, self.cb, self.ode)

    def _log_q(self, eps: torch.Tensor, codes: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        x = eps if codes is None else torch.cat([eps, codes / self.backbone.input_gain], -1)
        self.features_ = self.backbone.features(x, labels)
        return torch.log_softmax(self.head(self.features_), -1)

    def own_tokens(self, eps: torch.Tensor, labels: torch.Tensor, codes: torch.Tensor | None = None,
                   passes: int | None = None) -> torch.Tensor:
        """(B, n, V) one-hot: the generator's own tokens, by n - 1 passes from any ``codes`` (row i reads codes at
        j < i only); fewer ``passes`` leave the later positions a guess."""
        V = self.cb.shape[0]
        codes = torch.zeros(*eps.shape[:2], V, dtype=eps.dtype) if codes is None else codes
        with torch.no_grad():
            for _ in range(eps.shape[1] - 1 if passes is None else passes):
                codes = torch.nn.functional.one_hot(self.tokens(eps, self._log_q(eps, codes, labels)), V).to(eps.dtype)
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
                codes = torch.nn.functional.one_hot(self.tokens(eps, self.log_q_stages[-1].detach()),
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
             prefix_codes: str | None = None, input_gain: float | None = None, train_noise: float = 1.0,
             depth: int = 0, token_map: str = "ode", decode_weight: float = 0.0, rarity: float = 0.0,
             keep_generator: bool = False) -> dict:
    """The flow recipe on a tabular teacher: l_i = Linear(f_i(eps_<i)), tokens = ODE map of eps_i under softmax(l_i)
    (the recipe's map: ``FlowConfig().ode`` on the codebook's grid), forward KL to the teacher's conditional at the
    generated prefix, cosine LR. ``width``, ``input_gain``: the backbone's (default: ``TabularRunConfig``'s);
    ``prefix_codes``: see :class:`_TabularFlow`. Controls (the loss's minimiser, every conditional equal to the
    teacher's at the generator's own prefix, is pointwise in the noise and keeps under each of them):
    - ``train_noise``: the training batches' second half draws its noise from N(0, train_noise^2 I) (a wider law
      visits rare prefixes more often; the prefix codes' running marginal then averages both halves);
    - ``depth``: that many residual blocks (LayerNorm, two linear layers) in place of the backbone's hidden layers;
    - ``token_map``: "sorted" replaces the ODE map by the inverse CDF of softmax(l_i), codes in decreasing probability,
      at u = Phi(eps_i[0]) (:func:`sorted_icdf_map`); "gumbel" by the Gumbel-max map of V-dim noise
      (:func:`gumbel_max_map`);
    - ``decode_weight``: an auxiliary loss, that weight times a linear head's cross-entropy of every earlier token x_j
      (j < i) of the generator's own sample from row i's features (the prefix the row must read, supervised);
    - ``rarity``: position i's KL weighted by p_T(x_<i)^-rarity, normalised over the batch (rare prefixes weigh more).
    ``keep_generator``: the row also holds the trained generator and teacher (keys "generator", "teacher")."""
    teacher = make_teacher(rung)
    n, V = teacher.seq_len, teacher.vocab_size
    cb, sampling, base = teacher.codebook(), SamplingConfig(), TabularRunConfig()
    C = V if token_map == "gumbel" else teacher.code_dim  # the noise's dimension per position (_TabularFlow.noise_dim)
    torch.manual_seed(0)
    width = width or base.width
    backbone = deepen(CausalMLPBackbone(n, C + V * bool(prefix_codes), 1, width, input_gain or base.backbone_gain),
                      depth)
    head = torch.nn.Linear(width, V)
    ode = FlowConfig().ode(cb)
    gen = _TabularFlow(backbone, head, cb, ode, prefix_codes, token_map)
    decoder = torch.nn.Linear(width, n * V) if decode_weight else None
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=lr)
    for extra in (gen.stages, decoder):
        if extra is not None:
            opt.add_param_group({"params": list(extra.parameters())})
    product_loss = gen.stages is None and token_map == "ode" and not (decode_weight or rarity)
    earlier = torch.ones(n, n).tril(-1)  # [i, j]: row i decodes x_j
    g, labels, t0 = torch.Generator().manual_seed(1), torch.zeros(batch, dtype=torch.long), time.process_time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = ladder_lr(step, steps, lr)
        eps = torch.randn(batch, n, C, generator=g)
        eps[batch // 2:] *= train_noise
        if product_loss:
            loss, _ = flow_loss(gen, teacher, sampling, eps, labels, ode)
        else:  # flow_loss's forward KL, at the generated tokens, of every stage's logits, and the controls
            log_q = gen(eps, labels)
            with torch.no_grad():
                ids = gen.tokens(eps, log_q.detach())
                log_p = teacher_log_probs(teacher, ids, labels, sampling).float()
                w = 1.0
                if rarity:
                    log_px = log_p.gather(-1, ids[..., None])[..., 0]
                    w = torch.exp(-rarity * (torch.cumsum(log_px, 1) - log_px))  # p_T(x_<i)^-rarity
                    w = w / w.mean(0, keepdim=True)
            p = log_p.exp()
            loss = sum((w * torch.where(p > 0, p * (log_p - lq), torch.zeros_like(p)).sum(-1)).mean()
                       for lq in (log_q, *gen.log_q_stages))
            if decoder is not None:
                ce = torch.nn.functional.cross_entropy(decoder(gen.features_).reshape(-1, V),
                                                       ids[:, None].expand(batch, n, n).reshape(-1), reduction="none")
                loss = loss + decode_weight * (ce.view(batch, n, n) * earlier).sum((1, 2)).mean() * n / earlier.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.process_time() - t0  # CPU seconds (one thread)
    eps = torch.randn(N_EVAL, n, C, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ids = gen.tokens(eps, gen.eval()(eps, torch.zeros(N_EVAL, dtype=torch.long)))
    floor_ids = sample_tokens(teacher, torch.zeros(N_EVAL, dtype=torch.long), sampling, torch.Generator().manual_seed(7))
    tv_prefix, floor_prefix = prefix_tvs(teacher, ids), prefix_tvs(teacher, floor_ids)  # the last: the whole joint's
    row = {"rung": rung, "estimate": "flow recipe (closed-form conditional)", "tv": tv_prefix[-1], "tv_ema": None,
           "floor": floor_prefix[-1], "train_s": round(train_s, 1), "tv_prefix": tv_prefix, "floor_prefix": floor_prefix}
    return {**row, "generator": gen, "teacher": teacher} if keep_generator else row


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
