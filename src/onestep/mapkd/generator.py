"""MapKD's generator: a copy of the teacher that reads noise and gives logits; each token is DD1's closed-form map of
its own noise under them (docs/method.md, "MapKD").

Row i of ``net`` sees the class and the noise eps_<i only and outputs logits l_i; token i is the closed-form ODE map
(:func:`onestep.flow_map.ode_map`) of eps_i under softmax(l_i). The push-forward of N(0, I) through that map is
exactly softmax(l_i), so the generator's conditional of token i given its prefix noise is known in closed form (up to
the ODE's error). Every position comes out of ONE forward pass plus the per-token ODE.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from onestep.flow_map import ODEConfig, codebook_grid, ode_map
from onestep.teacher.families import family_named, family_of

__all__ = ["MapKDGenerator", "default_ode", "ODE_STEPS", "ODE_SOLVER", "LEGACY_GENERATOR_NAMES"]

# the generator's name in a run's model config; runs written before the method had its name say "flow-head"
LEGACY_GENERATOR_NAMES = ("flow-head",)


ODE_STEPS, ODE_SOLVER = 16, "ab2log"  # the map's default ODE (MapKDConfig's defaults read these)


def default_ode(codebook: Tensor, n_steps: int = ODE_STEPS, solver: str = ODE_SOLVER) -> ODEConfig:
    """The map's default ODE: 16 AB2 steps extrapolating in log s on the codebook's log-SNR grid
    (:func:`~onestep.flow_map.codebook_grid`)."""
    s_min, s_max = codebook_grid(codebook)
    return ODEConfig(solver=solver, n_steps=n_steps, s_min=s_min, s_max=s_max)


class MapKDGenerator(nn.Module):
    """One-step generator: ``net`` (a teacher-shaped network reading noise) -> logits l_i(eps_<i) -> ODE map of eps_i.

    ``net`` is the family's DD2 backbone built from the teacher (``Family.backbone`` rebuilds it from its config): a
    LlamaGen teacher with a token table gets a continuous input (an MLP on the C-dim inputs, stage 0's layout) that
    reads the noise; a VAR teacher reads continuous inputs as it is. Its ``features`` row i sees eps at earlier AR
    steps only; its ``head`` gives the logits.

    ``prefix_codes``: row i also reads, for each j < i, the teacher's embedding (``code_embed``, initialised from its
    token table) of the code that DD1's map gives eps_j under ``prior[class, j]``, the generator's running marginal at
    position j (an EMA of its training batches' softmax(l_j) per class, ``PRIOR_DECAY`` per step; under DDP the
    buffer is rank 0's). At j = 0 that code is the token itself (row 0's logits depend on the class only); later it
    is a guess that the backbone corrects. The conditional stays softmax(l_i) exactly: the codes are functions of
    eps_<i. Costs one more ODE map per sample.

    ``top_k``: the map draws from the generator's k most likely codes only (softmax(l_i) truncated to them, the
    truncation the teacher's sampling rule applies to its own conditionals; 0: every code). Training sets it from the
    rule it distils under, so that the generator samples in training as it does after; the map then runs on k codes
    instead of V (at LlamaGen-B's 16,384 codes and top-k 2,000 the map's share of the step falls from about 25% to
    10%: benchmarks/results/published-shapes.notes.md)."""

    PRIOR_DECAY = 0.98  # the running marginal's EMA decay per training step

    def __init__(self, net: nn.Module, ode: ODEConfig, family: str = "llamagen", prefix_codes: bool = False,
                 prefix_ode_steps: int | None = None, top_k: int = 0):
        super().__init__()
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: every code), got {top_k}")
        self.net, self.ode, self.family, self.prefix_codes, self.top_k = net, ode, family, prefix_codes, top_k
        self.prefix_ode = ode if prefix_ode_steps is None else replace(ode, n_steps=prefix_ode_steps)
        self.seq_len, self.code_dim, self.num_classes = net.seq_len, net.code_dim, net.num_classes
        if prefix_codes:
            V = net.codebook().shape[0]
            self.code_embed = nn.Embedding(V, net.feature_dim)
            self.register_buffer("prior", torch.full((self.num_classes, self.seq_len, V), 1.0 / V))

    @property
    def noise_shape(self) -> tuple[int, int]:
        return self.seq_len, self.code_dim

    @classmethod
    def from_teacher(cls, teacher: nn.Module, ode: ODEConfig | None = None,
                     family: str = "llamagen", prefix_codes: bool = False,
                     prefix_ode_steps: int | None = None, top_k: int = 0) -> "MapKDGenerator":
        """A copy of the teacher's weights that reads the noise (the family's ``noise_reader``: a LlamaGen token table
        becomes an MLP on the C-dim inputs whose noise embeddings have the RMS of the teacher's token embeddings).
        ``ode``: the map's ODE (default: the default 16-step map's, on the teacher codebook's grid)."""
        if prefix_codes and getattr(teacher, "tok_embeddings", None) is None:
            raise ValueError("prefix codes need a teacher with a token table (a LlamaGen teacher reading token ids); "
                             "this teacher reads code vectors")
        net = family_named(family).noise_reader(teacher)
        gen = cls(net.train().requires_grad_(True), ode or default_ode(teacher.codebook()), family, prefix_codes,
                  prefix_ode_steps, top_k)
        if prefix_codes:
            gen.code_embed.weight.data.copy_(teacher.tok_embeddings.weight.detach().float())
        return gen

    def config(self) -> dict:
        return {"generator": "mapkd", "family": self.family, "net": self.net.args.to_dict(),
                "ode": self.ode.to_dict(), "prefix_codes": self.prefix_codes,
                "prefix_ode_steps": None if self.prefix_ode is self.ode else self.prefix_ode.n_steps,
                **({"top_k": self.top_k} if self.top_k else {})}  # absent = 0, as in runs written before the knob

    @classmethod
    def from_config(cls, cfg: dict, teacher: nn.Module) -> "MapKDGenerator":
        net = family_of(cfg).backbone(cfg["net"], teacher)
        return cls(net, ODEConfig(**cfg["ode"]), cfg.get("family", "llamagen"), cfg.get("prefix_codes", False),
                   cfg.get("prefix_ode_steps"), cfg.get("top_k", 0))

    def codebook(self) -> Tensor:
        return self.net.codebook()

    def log_probs(self, eps: Tensor, labels: Tensor) -> Tensor:
        """log softmax(l_i) (B, n, V): the generator's conditional of token i given its prefix, in closed form."""
        extra = None
        if self.prefix_codes:
            with torch.no_grad():
                codes = ode_map(eps, self.prior[labels].clamp_min(1e-12).log(), self.codebook(), self.prefix_ode)
            emb = self.code_embed(codes[:, :-1])
            extra = torch.cat([torch.zeros_like(emb[:, :1]), emb], 1)  # row i's input row holds eps_{i-1}
        h = self.net.features(eps, labels) if extra is None else self.net.features(eps, labels, extra)
        log_q = torch.log_softmax(self.net.head(h).float(), dim=-1)
        if self.prefix_codes and self.training:
            self._update_prior(log_q.detach().exp(), labels)
        return log_q

    @torch.no_grad()
    def _update_prior(self, q: Tensor, labels: Tensor) -> None:
        sums = torch.zeros_like(self.prior).index_add_(0, labels, q)
        count = torch.bincount(labels, minlength=self.num_classes).to(q.dtype)[:, None, None]
        ema = self.PRIOR_DECAY * self.prior + (1 - self.PRIOR_DECAY) * sums / count.clamp_min(1)
        self.prior.copy_(torch.where(count > 0, ema, self.prior))  # a class absent from the batch keeps its prior

    @torch.no_grad()
    def draw(self, eps: Tensor, log_q: Tensor, ode: ODEConfig | None = None) -> Tensor:
        """Token ids (B, n): the map of each position's noise under its conditional ``log_q`` (B, n, V), truncated to
        the ``top_k`` most likely codes where that is set."""
        ode = ode or self.ode
        if 0 < self.top_k < log_q.shape[-1]:
            top = log_q.topk(self.top_k, dim=-1, sorted=False)
            return ode_map(eps, top.values, self.codebook(), ode, support=top.indices)
        return ode_map(eps, log_q, self.codebook(), ode)

    @torch.no_grad()
    def sample_ids(self, eps: Tensor, labels: Tensor, ode_steps: int | None = None) -> Tensor:
        """Token ids (B, n): one forward pass, then the ODE map of every position (``ode_steps`` overrides
        ``self.ode.n_steps``)."""
        ode = self.ode if ode_steps is None else replace(self.ode, n_steps=ode_steps)
        return self.draw(eps, self.log_probs(eps, labels), ode)

    def generate(self, eps: Tensor, labels: Tensor) -> Tensor:
        """The one-step sample as code vectors (B, n, C) (exactly codebook vectors)."""
        return self.codebook()[self.sample_ids(eps, labels)]

    def forward(self, eps: Tensor, labels: Tensor) -> Tensor:
        return self.log_probs(eps, labels)
