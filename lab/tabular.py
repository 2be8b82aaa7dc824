"""DD2 on a tabular teacher with a known joint: the exactness check of Proposition 1 (method.md section 3).

``fit_tabular`` runs the whole DD2 recipe (stage 1 GTS tuning, then CSD) on a :class:`TabularTeacher`
with a small causal MLP backbone, and measures the total variation between the generator's quantised
joint and the teacher's exact joint, next to the GTS-initialised generator and the onestep* baseline.
Used by tests/test_dd2.py and lab/dd2_tabular_example.py.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn

from onestep.flow_map import map_noise_to_tokens
from lab.csd_variants import CSDAblation, VariantDD2
from onestep.dd2.csd import CSDConfig, CSDSchedule
from onestep.dd2.losses import dsm_loss, gts_loss
from lab.mapstart import fit_to_map
from onestep.dd2.model import ARDiffusion, MLPHead
from onestep.teacher.sampling import SamplingConfig, sample_tokens, teacher_log_probs
from onestep.teacher.tabular import TabularTeacher, empirical_joint, total_variation
from onestep.trainer import make_optimizer


class CausalMLPBackbone(nn.Module):
    """f_i = MLP([g x_0..g x_{i-1}, 0..0], onehot(i), emb(label)): causal by construction, continuous input.

    ``input_gain`` g scales the prefix before the first layer. As the generator's backbone, this network
    must turn the noise prefix eps_<i into a nearly piecewise-constant function (which code each earlier
    position landed on), i.e. steep first-layer weights; g = 8 reaches them ~g^2 times faster under Adam
    (measured on the tabular run: TV 0.16 -> 0.12 at the same budget, see ``TabularRunConfig``).
    """

    def __init__(self, seq_len: int, code_dim: int, num_classes: int = 1, width: int = 128, input_gain: float = 1.0,
                 include_current: bool = False):
        super().__init__()
        self.input_gain = input_gain
        self.seq_len, self.code_dim, self.feature_dim = seq_len, code_dim, width
        # row i reads x_<i, or x_<=i with include_current (a DD1 generator: token i from eps_<=i)
        self.register_buffer("mask", torch.ones(seq_len, seq_len).tril(0 if include_current else -1), persistent=False)
        self.label = nn.Embedding(num_classes + 1, width)
        self.net = nn.Sequential(nn.Linear(seq_len * code_dim + seq_len, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def features(self, x: Tensor, labels: Tensor, extra: Tensor | None = None) -> Tensor:
        """f (B, n, width); ``extra`` (B, n, width), optional, is added after the first layer (the generator's noise
        stream, :class:`~onestep.dd2.model.ARDiffusion`)."""
        B, n, C = x.shape
        prefix = (self.mask[None, :, :, None] * x[:, None]).reshape(B, n, n * C) * self.input_gain  # row i: x_j, j < i
        pos = torch.eye(n, device=x.device).expand(B, n, n)
        h = self.net[0](torch.cat([prefix, pos], -1))
        if extra is not None:
            h = h + extra
        return self.net[1:](h) + self.label(labels)[:, None]


@dataclass(frozen=True)
class TabularRunConfig:
    """Every knob of the tabular exactness run (the defaults are the tested configuration).

    Stage 1 (GTS) uses Adam with a cosine LR decay from ``tune_lr`` to 0 and t ~ U[tune_t_min, 1]: the
    stage-1 model must be accurate at the moderate-to-large t where the conditional masses show in the
    score (a 300-step constant-LR tuning left errors of ~0.1 in x0 there, larger than the signal of a
    0.05 mass error). Stage 2 is CSD with ``csd`` (see :class:`CSDConfig`).

    What limits the TV here is the one-step generator, not the guidance network (measured, seed 0, see
    lab/results/dd2-tabular.md): the generator must map Gaussian noise onto a partition with sharp
    boundaries, and its backbone must reproduce the boundaries of the earlier positions' partitions.
    - CSD with an ORACLE guidance score (the exact denoiser of the generator's own samples, per prefix)
      instead of psi is only a little better: TV 0.088 against 0.098 after the same 1200 steps.
    - The same network trained by plain regression onto the exact DD1 noise-to-token map (a strictly
      easier, supervised problem) reaches only TV 0.060 after those 1200 steps.
    Hence the input gains (steeper first layers, ``backbone_gain`` / ``head_gain``) and many small-batch
    generator steps (batch 128 x 1200 steps: 0.096 in ~90 s, against 0.117 for 512 x 300 in ~70 s).

    ``seed`` seeds everything in the run (networks, teacher samples, CSD's draws, evaluation noise); ``csd.seed``
    is not read here (it seeds the image runs' training loop).
    """

    tune_steps: int = 600
    tune_loss: str = "gts"       # stage-1 init of generator and guidance: "gts", "dsm" (Monte-Carlo target) or
                                 # "none" (no stage 1: fresh networks), the initialisation ablation (Table 4)
    tune_lr: float = 3e-3
    tune_batch: int = 256
    tune_m: int = 2
    tune_t_min: float = 0.02
    width: int = 64              # backbone feature width
    head_width: int = 64
    head_depth: int = 2
    time_dim: int = 32
    backbone_gain: float = 8.0      # CausalMLPBackbone input_gain
    head_gain: float = 5.0          # MLPHead input_gain
    n_eval: int = 20000
    seed: int = 0
    csd: CSDConfig = CSDConfig(steps=1200, batch_size=128, lr=2e-3, guidance_lr=2e-3, guidance_steps=5, m_noise=1,
                               warmup_steps=20, lr_schedule="cosine", final_lr_ratio=0.05,
                               log_every=10 ** 9, ckpt_every=10 ** 9)
    # the recipe: "gts" (the paper's: generator and psi from stage 1, then CSD with ``csd``) or "map" (the generator
    # is regressed onto ``map_pairs`` DD1 noise-to-token pairs for ``map_steps`` steps, psi comes from stage 1,
    # then CSD with ``map_csd``: guidance-only warm-up, low decaying generator LR; lab.mapstart)
    recipe: str = "gts"
    map_pairs: int = 20000
    map_steps: int = 1500
    map_lr: float = 5e-3
    map_batch: int = 128
    map_csd: CSDConfig = CSDConfig(steps=400, batch_size=128, lr=5e-5, guidance_lr=2e-3, guidance_steps=5, m_noise=1,
                                   warmup_steps=20, lr_schedule="cosine", final_lr_ratio=0.05,
                                   guidance_warmup=100, log_every=10 ** 9, ckpt_every=10 ** 9)
    # both recipes' CSD variant: 4 (t, eps) draws per sequence in the generator's loss, a lower-variance gradient
    ablation: CSDAblation = CSDAblation(m_noise_gen=4)

    def __post_init__(self):
        if self.recipe not in ("gts", "map"):
            raise ValueError(f"recipe must be 'gts' or 'map', got {self.recipe!r}")

    @property
    def stage2(self) -> CSDConfig:
        """The CSD config the recipe runs."""
        return self.csd if self.recipe == "gts" else self.map_csd

    def to_dict(self) -> dict:
        return asdict(self)

    def changed(self, csd: dict | None = None, map_csd: dict | None = None, **changes) -> "TabularRunConfig":
        """This config with ``changes`` to its own fields and ``csd`` / ``map_csd`` changes to a recipe's CSD stage,
        where the fields of :class:`CSDAblation` among those change ``ablation`` instead (how the benchmarks and
        ``lab/dd2_tabular_example.py`` state a variant)."""
        cfg = replace(self, **changes)
        for field, stage in (("csd", csd), ("map_csd", map_csd)):
            stage = dict(stage or {})
            abl = {k: stage.pop(k) for k in list(stage) if k in CSDAblation.__dataclass_fields__}
            cfg = replace(cfg, **{field: replace(getattr(cfg, field), **stage), "ablation": replace(cfg.ablation, **abl)})
        return cfg


def tv_of_ids(teacher: TabularTeacher, ids: Tensor) -> float:
    """TV between the empirical joint of token sequences ``ids`` (B, n) and the teacher's exact joint."""
    joint = teacher.exact_joint()
    return total_variation(empirical_joint(teacher.flat_index(ids), len(joint)), joint)


@torch.no_grad()
def generator_ids(generator: ARDiffusion, teacher: TabularTeacher, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """(x, quantised ids) of n one-step samples from seeded noise (the same noise for every generator)."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, teacher.seq_len, teacher.code_dim, generator=g)
    x = generator.generate(eps, torch.zeros(n, dtype=torch.long))
    return x, teacher.nearest_ids(x)


def generator_tv(generator: ARDiffusion, teacher: TabularTeacher, n: int, seed: int) -> float:
    return tv_of_ids(teacher, generator_ids(generator, teacher, n, seed)[1])


def onestep_star_tv(teacher: TabularTeacher, n: int, seed: int) -> float:
    """TV of independent per-position sampling from the exact marginals (the best a set-predictor can do)."""
    g = torch.Generator().manual_seed(seed)
    marg = teacher.marginals()
    ids = torch.stack([torch.multinomial(marg[i], n, replacement=True, generator=g) for i in range(teacher.seq_len)], 1)
    return tv_of_ids(teacher, ids)


def build_model(teacher: TabularTeacher, cfg: TabularRunConfig) -> ARDiffusion:
    return ARDiffusion(CausalMLPBackbone(teacher.seq_len, teacher.code_dim, teacher.num_classes, cfg.width,
                                         cfg.backbone_gain),
                       MLPHead(teacher.code_dim, cfg.width, cfg.head_width, cfg.head_depth, time_dim=cfg.time_dim,
                               input_gain=cfg.head_gain))


def map_pairs(teacher: TabularTeacher, n: int, seed: int, sampling: SamplingConfig = SamplingConfig()):
    """n DD1 pairs: noise (n, seq_len, C) and the ids (n, seq_len) the exact flow map sends it to."""
    eps = torch.randn(n, teacher.seq_len, teacher.code_dim, generator=torch.Generator().manual_seed(seed))
    return eps, map_noise_to_tokens(teacher, eps, torch.zeros(n, dtype=torch.long), sampling)


def fit_tabular(teacher: TabularTeacher, cfg: TabularRunConfig = TabularRunConfig(),
                sampling: SamplingConfig = SamplingConfig(), log=None, log_every: int = 100) -> dict:
    """Stage 1 (GTS), the map fit of the "map" recipe, then stage 2 (CSD) on a tabular teacher; TV figures, timings.

    TVs (``n_eval`` samples each, the same evaluation noise for every generator): ``tv_dd2`` (raw
    generator), ``tv_dd2_ema`` (its EMA), ``tv_gts_init`` (the GTS-tuned model used as a one-step generator),
    ``tv_map_fit`` ("map" recipe: the generator after the regression onto DD1's pairs, before CSD),
    ``tv_csd_start`` (CSD's starting point), ``tv_onestep_star`` (independent per-position sampling from the
    exact marginals), ``tv_teacher_samples`` (the teacher's own samples: the finite-sample noise floor), and
    ``tv_onestep_star_exact`` (the product of the exact marginals against the joint, no sampling noise).
    Times: ``tune_time_s`` (stage 1), ``pairs_time_s`` and ``map_time_s`` (the map recipe's pairs and fit),
    ``csd_time_s``.
    """
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = build_model(teacher, cfg)
    labels = torch.zeros(cfg.tune_batch, dtype=torch.long)
    cb = teacher.codebook()
    t0 = time.time()
    opt = make_optimizer(torch.optim.Adam, model.parameters(), lr=cfg.tune_lr)
    if cfg.tune_loss not in ("gts", "dsm", "none"):
        raise ValueError(f"tune_loss must be 'gts', 'dsm' or 'none', got {cfg.tune_loss!r}")
    loss = torch.tensor(float("nan"))
    for step in range(cfg.tune_steps if cfg.tune_loss != "none" else 0):
        for group in opt.param_groups:
            group["lr"] = cfg.tune_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.tune_steps))
        ids = sample_tokens(teacher, labels, sampling, g)
        log_p = teacher_log_probs(teacher, ids, labels, sampling)
        if cfg.tune_loss == "gts":
            loss, _ = gts_loss(model, cb[ids], labels, log_p, cb, m=cfg.tune_m, generator=g, t_min=cfg.tune_t_min)
        else:
            loss, _ = dsm_loss(model, cb[ids], labels, m=cfg.tune_m, generator=g, t_min=cfg.tune_t_min)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out = {"recipe": cfg.recipe, "tune_time_s": round(time.time() - t0, 2), "gts_final_loss": loss.item()}
    csd = cfg.stage2
    dd2 = VariantDD2(copy.deepcopy(model), copy.deepcopy(model), teacher, sampling, csd, cfg.ablation)  # sets generator_t
    out["tv_gts_init"] = generator_tv(dd2.generator, teacher, cfg.n_eval, cfg.seed + 1)
    if cfg.recipe == "map":
        t0 = time.time()
        eps, ids = map_pairs(teacher, cfg.map_pairs, cfg.seed + 11, sampling)
        target = cb[ids]
        out["pairs_time_s"] = round(time.time() - t0, 2)
        t0 = time.time()
        lab = torch.zeros(cfg.map_batch, dtype=torch.long)

        def batches(step):
            idx = torch.randint(cfg.map_pairs, (cfg.map_batch,), generator=g)
            return eps[idx], lab, target[idx]

        out["map_final_loss"] = fit_to_map(dd2.generator, batches, cfg.map_steps, cfg.map_lr)
        out["map_time_s"] = round(time.time() - t0, 2)
        out["tv_map_fit"] = generator_tv(dd2.generator, teacher, cfg.n_eval, cfg.seed + 1)
        map_fit = copy.deepcopy(dd2.generator)
    out["tv_csd_start"] = out["tv_map_fit"] if cfg.recipe == "map" else out["tv_gts_init"]
    sched = CSDSchedule(dd2)
    t1 = time.time()
    for step in range(csd.total_steps):
        logs = sched.step(step, lambda n: torch.zeros(n, dtype=torch.long), g)
        if log is not None and (step + 1) % log_every == 0:
            log(step + 1, logs, generator_tv(dd2.generator, teacher, cfg.n_eval, cfg.seed + 1),
                generator_tv(sched.ema, teacher, cfg.n_eval, cfg.seed + 1))
    csd_time = time.time() - t1
    seqs, joint, marg = teacher.all_sequences(), teacher.exact_joint(), teacher.marginals()
    product = torch.stack([marg[i][seqs[:, i]] for i in range(teacher.seq_len)]).prod(0)
    out.update(tv_dd2=generator_tv(dd2.generator, teacher, cfg.n_eval, cfg.seed + 1),
               tv_dd2_ema=generator_tv(sched.ema, teacher, cfg.n_eval, cfg.seed + 1),
               tv_onestep_star=onestep_star_tv(teacher, cfg.n_eval, cfg.seed + 1),
               tv_onestep_star_exact=total_variation(product, joint), csd_time_s=round(csd_time, 2))
    # sampling noise floor: TV of the teacher's own samples of the same size
    ids = sample_tokens(teacher, torch.zeros(cfg.n_eval, dtype=torch.long), sampling,
                        torch.Generator().manual_seed(cfg.seed + 7))
    out["tv_teacher_samples"] = tv_of_ids(teacher, ids)
    out["models"] = {"generator": dd2.generator, "ema": sched.ema, "guidance": dd2.guidance, "gts": model}
    if cfg.recipe == "map":
        out["models"]["map_fit"] = map_fit
    return out


def conditional_errors(teacher: TabularTeacher, x: Tensor, position: int, min_margin: float = 0.0) -> dict:
    """Where a one-step generator's joint error sits: per prefix of ``position``, the TV between the empirical
    conditional of the quantised samples ``x`` (N, n, C) and the teacher's exact conditional.

    Only samples whose prefix positions all lie at least ``min_margin`` inside their Voronoi cell (distance to the
    second-nearest code minus distance to the nearest) are counted: with a large margin, an error that remains is
    in the conditionals themselves, not in the generator's backbone mis-reading which cell an earlier position
    landed in. Returns the kept fraction, the prefix-weighted mean conditional TV and one row per prefix."""
    d = (x[:, :, None] - teacher.codebook()).norm(dim=-1)
    ds, _ = d.sort(-1)
    ids = d.argmin(-1)
    keep = ((ds[..., 1] - ds[..., 0])[:, :position] >= min_margin).all(1)
    rows_idx, q = teacher._row_index(ids, position)[keep], ids[keep, position]
    table = teacher._table(position).exp()
    counts = torch.zeros_like(table).index_put_((rows_idx, q), torch.ones(len(q)), accumulate=True)
    n_row = counts.sum(1)
    emp = counts / n_row.clamp_min(1)[:, None]
    tv = 0.5 * (emp - table).abs().sum(1)
    joint = teacher.exact_joint().reshape(-1, teacher.vocab_size ** (teacher.seq_len - position)).sum(1)
    prefix_p = joint.reshape(len(table), -1).sum(1)
    rows = [{"prefix": r, "p_prefix": prefix_p[r].item(), "entropy": -(table[r] * table[r].log()).sum().item(),
             "teacher": table[r].tolist(), "generator": emp[r].tolist(), "n": int(n_row[r]), "tv": tv[r].item()}
            for r in range(len(table))]
    return {"position": position, "min_margin": min_margin, "kept": keep.float().mean().item(),
            "weighted_tv": ((tv * n_row).sum() / n_row.sum()).item(), "rows": rows}


def conditional_entropies(teacher: TabularTeacher) -> list[dict]:
    """Per position: min / mean / max entropy of its conditional tables, in nats and normalised by log V."""
    out = []
    for i in range(teacher.seq_len):
        lp = teacher._table(i)
        h = -(lp.exp() * lp).sum(-1)
        out.append({"position": i, "min": h.min().item(), "mean": h.mean().item(), "max": h.max().item(),
                    "normalised_min": (h.min() / math.log(teacher.vocab_size)).item(),
                    "normalised_max": (h.max() / math.log(teacher.vocab_size)).item()})
    return out
