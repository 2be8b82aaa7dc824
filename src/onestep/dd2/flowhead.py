"""DD2 with a flow head: the generator's conditional in closed form, so CSD needs no guidance network.

The ``flow`` recipe (docs/dd2-convergence.md, section 7). The generator is a copy of the teacher that reads the noise
eps (B, n, C) where the teacher reads the earlier tokens, so that its row i sees the class and eps_<i only, and
outputs logits l_i. Position i's token is DD1's closed-form ODE map of eps_i under softmax(l_i) (method.md section 1;
:func:`onestep.dd1.flow_map.ode_map`). All positions come out of ONE forward pass plus the per-token ODE.

Why this is DD2. Given the prefix noise eps_<i (hence the prefix x_<i, a function of it), the push-forward of
N(0, I) through the flow map of softmax(l_i) is exactly softmax(l_i): the generator's conditional distribution of x_i
given its own prefix is known in closed form. The guidance network psi, which the paper trains by DSM to estimate the
generator's conditional score, is then exact: ``flow.score(., t, log softmax(l_i), codebook)`` at every t. Teacher and
generator conditionals are both Dirac mixtures on the same codes, and their score difference vanishes at every t iff
their weights agree. So CSD's fixed point (Proposition 1: every conditional of the generator equals the teacher's on
the generator's own prefixes, hence the joints agree) is reached by minimising a divergence between the weights at the
generator's own samples:

    L(theta) = E_eps sum_i D( p_T(. | x_<i), softmax(l_i(eps_<i)) ),    x = G(eps),    the prefix x_<i a constant

with p_T the teacher's conditional under its sampling rule (CFG, truncation), computed for every position in one
teacher-forcing pass over the generated tokens (exact ids: no stage 0 is needed, and no stage 1, no DD1 pairs).
D = KL(p_T || q) (``divergence="forward"``, mass-covering) is the default; KL(q || p_T) (``"reverse"``, the
direction DMD-style score distillation descends) keeps the precision and drops modes (docs/dd2-convergence.md).

Multi-step sampling (:func:`refine`): after the one-step sample, each extra step is one parallel teacher pass over the
current tokens followed by the ODE map of the SAME noise under the teacher's conditionals (a Jacobi iteration of DD1's
map). A position whose prefix did not change keeps its token; n steps give DD1's map (the teacher's own sample) exactly.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from onestep import checkpoint as ckpt
from onestep import rng
from onestep.dd1.flow_map import ODEConfig, codebook_grid, ode_map
from onestep.distributed import DistInfo, unwrap, wrap_ddp
from onestep.teacher.sampling import SamplingConfig, teacher_log_probs
from onestep.trainer import (LoopConfig, TrainLoop, add_run_time, guarded_step, make_optimizer, prepare_run_dir,
                             set_lr, warmup_cosine)

__all__ = ["FlowConfig", "FLOW_PRESETS", "FlowHeadGenerator", "flow_loss", "refine", "train_flow"]


@dataclass(frozen=True)
class FlowConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ode_steps: int = 16          # the flow map's ODE (onestep.dd1.flow_map.ode_map), in training and sampling:
    ode_solver: str = "ab2log"   # 16 steps of AB2 extrapolating in log s on a log-SNR grid over [s_min, s_max]
    ode_s_min: float | None = None  # (None: flow_map.codebook_grid, [0.30, 37.4] on Fashion-MNIST's codes) put 1.0%
    ode_s_max: float | None = None  # of the tokens off a converged reference, at half the time of the 32 AB2 steps in
                                    # s over [0.05, 500] that put 3.3% off (benchmarks/results/ode-solvers.md)
    divergence: str = "forward"  # "forward": KL(p_T || q), "reverse": KL(q || p_T) (see the module docstring)
    prefix_codes: bool = False   # row i also reads the code DD1's map gives eps_j (j < i) under the generator's
                                 # running per-class marginal at position j (FlowHeadGenerator.prefix_codes)
    prefix_ode_steps: int | None = None  # the steps of that map's ODE (None: ode_steps)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100

    def __post_init__(self):
        if self.divergence not in ("forward", "reverse"):
            raise ValueError(f"divergence must be 'forward' or 'reverse', got {self.divergence!r}")
        if self.ode_steps < 2 or (self.prefix_ode_steps is not None and self.prefix_ode_steps < 2):
            raise ValueError(f"ode_steps and prefix_ode_steps must be at least 2, got {self.ode_steps}, "
                             f"{self.prefix_ode_steps}")
        if self.prefix_ode_steps is not None and not self.prefix_codes:
            raise ValueError("prefix_ode_steps sets the prefix codes' map: it needs prefix_codes")
        ODEConfig(solver=self.ode_solver, n_steps=self.ode_steps)  # validates the solver
        if any(v is not None and v <= 0 for v in (self.ode_s_min, self.ode_s_max)) or (
                None not in (self.ode_s_min, self.ode_s_max) and self.ode_s_min >= self.ode_s_max):
            raise ValueError(f"need 0 < s_min < s_max, got ode_s_min={self.ode_s_min}, ode_s_max={self.ode_s_max}")

    def ode(self, codebook: Tensor | None = None) -> ODEConfig:
        """The flow map's ODE configuration; a grid end left None comes from ``codebook`` (``codebook_grid``)."""
        grid = codebook_grid(codebook) if None in (self.ode_s_min, self.ode_s_max) else (None, None)
        s_min = grid[0] if self.ode_s_min is None else self.ode_s_min
        s_max = grid[1] if self.ode_s_max is None else self.ode_s_max
        return ODEConfig(solver=self.ode_solver, n_steps=self.ode_steps, s_min=s_min, s_max=s_max)

    def to_dict(self) -> dict:
        return asdict(self)


FLOW_PRESETS = {
    "tiny": FlowConfig(steps=2, batch_size=4, warmup_steps=1, ode_steps=4, log_every=1, ckpt_every=1),
    # the default bench's: 600 steps of batch 64 at LR 1e-3 (cosine), ~20 CPU-minutes on one thread
    # (benchmarks/results/dd2-flow.md)
    "small": FlowConfig(),
}


class FlowHeadGenerator(nn.Module):
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
    eps_<i. Costs one more ODE map per sample."""

    PRIOR_DECAY = 0.98  # the running marginal's EMA decay per training step

    def __init__(self, net: nn.Module, ode: ODEConfig, family: str = "llamagen", prefix_codes: bool = False,
                 prefix_ode_steps: int | None = None):
        super().__init__()
        self.net, self.ode, self.family, self.prefix_codes = net, ode, family, prefix_codes
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
                     prefix_ode_steps: int | None = None) -> "FlowHeadGenerator":
        """A copy of the teacher's weights that reads the noise (the family's ``noise_reader``: a LlamaGen token table
        becomes an MLP on the C-dim inputs whose noise embeddings have the RMS of the teacher's token embeddings).
        ``ode``: the map's ODE (default: :class:`FlowConfig`'s, on the teacher codebook's grid)."""
        from onestep.families import family_named

        if prefix_codes and getattr(teacher, "tok_embeddings", None) is None:
            raise ValueError("prefix codes need a teacher with a token table (a LlamaGen teacher reading token ids); "
                             "this teacher reads code vectors")
        net = family_named(family).noise_reader(teacher)
        gen = cls(net.train().requires_grad_(True), ode or FlowConfig().ode(teacher.codebook()), family, prefix_codes,
                  prefix_ode_steps)
        if prefix_codes:
            gen.code_embed.weight.data.copy_(teacher.tok_embeddings.weight.detach().float())
        return gen

    def config(self) -> dict:
        return {"generator": "flow-head", "family": self.family, "net": self.net.args.to_dict(),
                "ode": self.ode.to_dict(), "prefix_codes": self.prefix_codes,
                "prefix_ode_steps": None if self.prefix_ode is self.ode else self.prefix_ode.n_steps}

    @classmethod
    def from_config(cls, cfg: dict, teacher: nn.Module) -> "FlowHeadGenerator":
        from onestep.families import family_of

        net = family_of(cfg).backbone(cfg["net"], teacher)
        return cls(net, ODEConfig(**cfg["ode"]), cfg.get("family", "llamagen"), cfg.get("prefix_codes", False),
                   cfg.get("prefix_ode_steps"))

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
    def sample_ids(self, eps: Tensor, labels: Tensor, ode_steps: int | None = None) -> Tensor:
        """Token ids (B, n): one forward pass, then the ODE map of every position (``ode_steps`` overrides
        ``self.ode.n_steps``)."""
        ode = self.ode if ode_steps is None else replace(self.ode, n_steps=ode_steps)
        return ode_map(eps, self.log_probs(eps, labels), self.codebook(), ode)

    def generate(self, eps: Tensor, labels: Tensor) -> Tensor:
        """The one-step sample as code vectors (B, n, C) (exactly codebook vectors)."""
        return self.codebook()[self.sample_ids(eps, labels)]

    def forward(self, eps: Tensor, labels: Tensor) -> Tensor:
        return self.log_probs(eps, labels)


def flow_loss(generator: nn.Module, teacher: nn.Module, sampling: SamplingConfig, eps: Tensor, labels: Tensor,
              ode: ODEConfig, divergence: str = "forward") -> tuple[Tensor, dict]:
    """The conditional distillation loss of the module docstring on one batch; ``generator`` may be DDP-wrapped (its
    forward returns the log-probs). Logs: the forward KL per position (nats), overall, at the first position and
    over the last eighth of the positions."""
    log_q = generator(eps, labels)
    with torch.no_grad():
        ids = ode_map(eps, log_q.detach(), unwrap(generator).codebook(), ode)
        log_p = teacher_log_probs(teacher, ids, labels, sampling).float()
    p = log_p.exp()
    zero = torch.zeros_like(p)
    kl = torch.where(p > 0, p * (log_p - log_q), zero).sum(-1)  # KL(p_T || q) (B, n); 0 log 0 = 0
    if divergence == "forward":
        loss = kl.mean()
    else:  # KL(q || p_T); a truncated code (p_T = 0) is held at a large finite penalty
        loss = (log_q.exp() * (log_q - log_p.clamp_min(-1e4))).sum(-1).mean()
    tail = max(1, kl.shape[1] // 8)
    return loss, {"kl": kl.mean().item(), "kl_first": kl[:, 0].mean().item(), "kl_last": kl[:, -tail:].mean().item()}


@torch.no_grad()
def refine(ids: Tensor, eps: Tensor, labels: Tensor, teacher: nn.Module, sampling: SamplingConfig, passes: int,
           ode: ODEConfig | None = None) -> Tensor:
    """``passes`` Jacobi steps of DD1's map from the tokens ``ids`` (B, n): the teacher's conditionals on the current
    tokens, in one parallel pass, then the ODE map of the same noise ``eps`` under them."""
    for _ in range(passes):
        ids = ode_map(eps, teacher_log_probs(teacher, ids, labels, sampling), teacher.codebook(), ode)
    return ids


def load_flow(run_dir: str | Path, device="cpu"):
    """(generator, teacher, tokenizer, sampling rule) from a ``onestep dd2 flow`` run."""
    from onestep.runs import final_dir, load_teacher, resolve_ref

    d = final_dir(run_dir)
    config = ckpt.read_config(d)
    teacher, _, tokenizer = load_teacher(resolve_ref(config["teacher_dir"], d), device)
    generator = ckpt.load_model(d, lambda: FlowHeadGenerator.from_config(config["model"], teacher), config)
    return generator.to(device).eval(), teacher, tokenizer, SamplingConfig(**config["sampling"])


def train_flow(run_dir: str | Path, teacher_dir: str | Path, cfg: FlowConfig, sampling: SamplingConfig,
               info: DistInfo | None = None) -> Path:
    """The ``flow`` recipe end to end from a teacher run; returns ``RUN/final`` (the generator)."""
    from onestep.runs import load_teacher, ref_to

    info = info or DistInfo()
    rng.seed_everything(cfg.seed)
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by world size {info.world_size}")
    teacher, tconf, _ = load_teacher(teacher_dir, info.device, with_tokenizer=False)
    teacher.requires_grad_(False).eval()
    generator = FlowHeadGenerator.from_teacher(teacher, cfg.ode(teacher.codebook()), tconf.get("family", "llamagen"),
                                               cfg.prefix_codes, cfg.prefix_ode_steps).to(info.device)
    config = {"kind": "dd2-generator", "stage": "dd2-flow", "recipe": "flow", "flow": cfg,
              "sampling": sampling.to_dict(), "teacher_dir": ref_to(teacher_dir, run_dir),
              "model": generator.config(), "data": tconf.get("data")}
    run_dir = prepare_run_dir(run_dir, config, info)
    opt = make_optimizer(torch.optim.Adam, generator.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    wrapped = wrap_ddp(generator, info)
    loop = TrainLoop(run_dir, LoopConfig(cfg.steps, cfg.batch_size, cfg.seed, cfg.log_every, cfg.ckpt_every),
                     {"generator": generator}, {"generator": opt}, {"generator": config}, info, desc="dd2 flow")
    n_local = cfg.batch_size // info.world_size

    def step_fn(step: int) -> dict:
        generator.train()
        set_lr(opt, warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio))
        labels = torch.randint(teacher.num_classes, (n_local,), generator=loop.generator).to(info.device)
        eps = rng.randn((n_local, *generator.noise_shape), loop.generator, info.device)
        loss, logs = flow_loss(wrapped, teacher, sampling, eps, labels, generator.ode, cfg.divergence)
        logs["nonfinite"] = float(not guarded_step(loss, opt, generator.parameters(), cfg.grad_clip))
        logs["lr"] = opt.param_groups[0]["lr"]
        return logs

    t0, c0 = time.time(), time.process_time()
    loop.run(step_fn)
    final = Path(run_dir) / "final"
    if info.is_main:
        metrics = add_run_time(run_dir, t0, c0, nonfinite_steps=loop.nonfinite_total)
        ckpt.save_model(final, generator, {**config, "weights": "generator", "metrics": metrics})
    return final
