"""DD2 on a tabular teacher with a known joint: the exactness check of Proposition 1 (method.md section 3).

``fit_tabular`` runs the whole DD2 recipe (stage 1 GTS tuning, then CSD) on a :class:`TabularTeacher`
with a small causal MLP backbone, and measures the total variation between the generator's quantised
joint and the teacher's exact joint, next to the GTS-initialised generator and the onestep* baseline.
Used by tests/test_dd2.py and examples/dd2_tabular.py.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from onestep.dd2.csd import DD2, CSDConfig, CSDSchedule
from onestep.dd2.losses import gts_loss
from onestep.dd2.model import ARDiffusion, MLPHead
from onestep.teacher.sampling import SamplingConfig, sample_tokens, teacher_log_probs
from onestep.teacher.tabular import TabularTeacher, empirical_joint, total_variation


class CausalMLPBackbone(nn.Module):
    """f_i = MLP([x_0..x_{i-1}, 0..0], onehot(i), emb(label)): causal by construction, continuous input."""

    def __init__(self, seq_len: int, code_dim: int, num_classes: int = 1, width: int = 128):
        super().__init__()
        self.seq_len, self.code_dim, self.feature_dim = seq_len, code_dim, width
        self.register_buffer("mask", torch.ones(seq_len, seq_len).tril(-1), persistent=False)
        self.label = nn.Embedding(num_classes + 1, width)
        self.net = nn.Sequential(nn.Linear(seq_len * code_dim + seq_len, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def features(self, x: Tensor, labels: Tensor) -> Tensor:
        B, n, C = x.shape
        prefix = (self.mask[None, :, :, None] * x[:, None]).reshape(B, n, n * C)  # row i: x_j for j < i
        pos = torch.eye(n, device=x.device).expand(B, n, n)
        return self.net(torch.cat([prefix, pos], -1)) + self.label(labels)[:, None]


@dataclass(frozen=True)
class TabularRunConfig:
    tune_steps: int = 400
    tune_lr: float = 2e-3
    batch_size: int = 512
    width: int = 128
    head_width: int = 128
    head_depth: int = 2
    n_eval: int = 20000
    seed: int = 0
    csd: CSDConfig = CSDConfig(steps=600, batch_size=512, lr=1e-3, guidance_lr=2e-3, guidance_steps=10, m_noise=4,
                               warmup_steps=20, log_every=10 ** 9, ckpt_every=10 ** 9)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def generator_tv(generator: ARDiffusion, teacher: TabularTeacher, n: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, teacher.seq_len, teacher.code_dim, generator=g)
    ids = teacher.nearest_ids(generator.generate(eps, torch.zeros(n, dtype=torch.long)))
    joint = teacher.exact_joint()
    return total_variation(empirical_joint(teacher.flat_index(ids), len(joint)), joint)


def onestep_star_tv(teacher: TabularTeacher, n: int, seed: int) -> float:
    """TV of independent per-position sampling from the exact marginals (the best a set-predictor can do)."""
    g = torch.Generator().manual_seed(seed)
    marg = teacher.marginals()
    ids = torch.stack([torch.multinomial(marg[i], n, replacement=True, generator=g) for i in range(teacher.seq_len)], 1)
    joint = teacher.exact_joint()
    return total_variation(empirical_joint(teacher.flat_index(ids), len(joint)), joint)


def fit_tabular(teacher: TabularTeacher, cfg: TabularRunConfig = TabularRunConfig(),
                sampling: SamplingConfig = SamplingConfig(), log=None) -> dict:
    """Stage 1 (GTS) then stage 2 (CSD) on a tabular teacher; returns TV figures and timings."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    n, C = teacher.seq_len, teacher.code_dim
    model = ARDiffusion(CausalMLPBackbone(n, C, teacher.num_classes, cfg.width),
                        MLPHead(C, cfg.width, cfg.head_width, cfg.head_depth, time_dim=64))
    labels = torch.zeros(cfg.batch_size, dtype=torch.long)
    cb = teacher.codebook()
    t0 = time.time()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.tune_lr)
    for step in range(cfg.tune_steps):
        ids = sample_tokens(teacher, labels, sampling, g)
        log_p = teacher_log_probs(teacher, ids, labels, sampling)
        loss, _ = gts_loss(model, cb[ids], labels, log_p, cb, m=4, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tune_time = time.time() - t0
    out = {"tv_gts_init": generator_tv(model, teacher, cfg.n_eval, cfg.seed + 1), "gts_final_loss": loss.item()}
    dd2 = DD2(copy.deepcopy(model), copy.deepcopy(model), teacher, sampling, cfg.csd)
    sched = CSDSchedule(dd2)
    t1 = time.time()
    for step in range(cfg.csd.total_steps):
        logs = sched.step(step, lambda: labels, g)
        if log is not None and step % 50 == 0:
            log(step, logs, generator_tv(dd2.generator, teacher, 4000, 123))
    out.update(tv_dd2=generator_tv(dd2.generator, teacher, cfg.n_eval, cfg.seed + 1),
               tv_dd2_ema=generator_tv(sched.ema, teacher, cfg.n_eval, cfg.seed + 1),
               tv_onestep_star=onestep_star_tv(teacher, cfg.n_eval, cfg.seed + 1),
               tune_time_s=round(tune_time, 2), csd_time_s=round(time.time() - t1, 2))
    # sampling noise floor: TV of the teacher's own samples of the same size
    ids = sample_tokens(teacher, torch.zeros(cfg.n_eval, dtype=torch.long), sampling, torch.Generator().manual_seed(7))
    joint = teacher.exact_joint()
    out["tv_teacher_samples"] = total_variation(empirical_joint(teacher.flat_index(ids), len(joint)), joint)
    return out
