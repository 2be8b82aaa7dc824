"""DD2 losses (method.md section 3), all in velocity / x0 form with alpha_t = 1 - t, sigma_t = t.

- :func:`gts_loss` (stage 1): Ground Truth Score. Regress the head onto the teacher's closed-form
  velocity v_T(q_t, t | q_<i) (flow.py), for CLEAN teacher samples q. Since s = -(1 - t)/t * v + const
  in v, |s_psi - s_T|^2 = ((1 - t) / t)^2 |v_psi - v_T|^2: the velocity MSE used here is the score loss
  with weight (t / (1 - t))^2, the usual velocity-form weighting (a documented choice).
- :func:`dsm_loss`: ordinary denoising score matching with the Monte-Carlo RectFlow target
  v = eps - x0 (the guidance network's loss, and the stage-1 ablation ``--loss dsm``).
- :func:`csd_generator_loss` (stage 2): conditional score distillation in SiD form with alpha = 1 (the studies'
  variants of it: ``lab/csd_variants.py``).

Noise draws: ``m`` draws per sequence share one backbone pass (features computed once, head m times).
"""
from __future__ import annotations

import torch
from torch import Tensor

from onestep import flow, rng
from onestep.dd2.model import ARDiffusion


def sample_t(shape, generator: torch.Generator | None, device, t_min: float = 1e-3, t_max: float = 1.0) -> Tensor:
    """t ~ U[t_min, t_max] per position."""
    return t_min + (t_max - t_min) * rng.rand(shape, generator, device)


def _noised(x0: Tensor, m: int, generator, t_min: float, t_max: float):
    """m noise draws per sequence: (m, B, n, C) q_t, eps and (m, B, n) t."""
    shape = (m, *x0.shape)
    t = sample_t(shape[:-1], generator, x0.device, t_min, t_max)
    eps = rng.randn(shape, generator, x0.device)
    return (1 - t[..., None]) * x0 + t[..., None] * eps, eps, t


def gts_loss(model: ARDiffusion, q: Tensor, labels: Tensor, log_p: Tensor, codebook: Tensor, m: int = 1,
             generator=None, t_min: float = 1e-3, features_grad: bool = True) -> tuple[Tensor, dict]:
    """Stage 1 GTS loss on clean sequences q (B, n, C) with teacher log-probs log_p (B, n, V) (no grad)."""
    f = model.features(q, labels) if features_grad else model.features(q, labels).detach()
    q_t, _, t = _noised(q, m, generator, t_min, 1.0)
    with torch.no_grad():
        v_target = flow.velocity(q_t, t, log_p.expand(m, *log_p.shape), codebook)
    v = model.velocity(q_t, t, f.expand(m, *f.shape))
    loss = (v - v_target).pow(2).sum(-1).mean()
    return loss, {"gts": loss.item()}


def dsm_loss(model: ARDiffusion, x0: Tensor, labels: Tensor, m: int = 1, generator=None, t_min: float = 1e-3,
             features_grad: bool = True, t_max: float = 1.0, condition: Tensor | None = None) -> tuple[Tensor, dict]:
    """Denoising score matching: v_target = eps - x0 (RectFlow), on sequences x0 (B, n, C), t ~ U[t_min, t_max].

    ``condition`` (B, n, C), default x0: the sequence the backbone reads (its row i sees condition_<i), e.g. x0
    with every position snapped to its nearest code (CSD's ``condition_on_codes``)."""
    cond = x0 if condition is None else condition
    f = model.features(cond, labels) if features_grad else model.features(cond, labels).detach()
    q_t, eps, t = _noised(x0, m, generator, t_min, t_max)
    v = model.velocity(q_t, t, f.expand(m, *f.shape))
    loss = (v - (eps - x0)).pow(2).sum(-1).mean()
    return loss, {"dsm": loss.item()}


def csd_generator_loss(x: Tensor, labels: Tensor, log_p_teacher: Tensor, codebook: Tensor, guidance: ARDiffusion,
                       f_guidance: Tensor, generator=None, alpha: float = 1.0, t_min: float = 0.02,
                       t_max: float = 0.98) -> tuple[Tensor, dict]:
    """Conditional score distillation, SiD form (method.md section 3, stage 2), for generated x (B, n, C).

    Per position: q_t = (1 - t) x_i + t eps (one (t, eps) draw per position); x0_T = the teacher's closed-form denoised
    mean given the stop-gradient prefix (``log_p_teacher`` computed on sg(x)); x0_psi = the guidance network's
    estimate with backbone features ``f_guidance`` of sg(x) (computed without a graph);

        loss_i = (x0_T - x0_psi) . ((x0_T - x_i) - alpha (x0_T - x0_psi)) / mean_i |x_i - x0_T|

    the normaliser (per sample, detached) as in SiD. The loss is the MEAN over samples and positions (SiD sums over
    dimensions): the gradient's direction is SiD's, its scale 1/n of it, which Adam undoes except through its eps and
    the gradient clip. As in SiD, x0_T and x0_psi are differentiable functions of q_t (the teacher's closed form and
    the guidance head, whose parameters receive no update here); the prefix conditions (log p, f) are constants. So
    theta's gradient arrives only via x_i at its own position: through q_t and through the explicit x_i term.
    """
    shape = (1, *x.shape)  # one draw, kept as a leading axis of size 1
    t = sample_t(shape[:-1], generator, x.device, t_min, t_max)
    eps = rng.randn(shape, generator, x.device)
    q_t = (1 - t[..., None]) * x + t[..., None] * eps
    x0_T = flow.denoise(q_t, t, log_p_teacher.expand(1, *log_p_teacher.shape), codebook)
    x0_psi = guidance.denoise(q_t, t, f_guidance.expand(1, *f_guidance.shape))
    diff = x0_T - x0_psi
    with torch.no_grad():
        norm = (x - x0_T).abs().mean(dim=(-2, -1), keepdim=True).clamp_min(1e-5)
    loss = ((diff * ((x0_T - x) - alpha * diff)).sum(-1, keepdim=True) / norm).mean()
    return loss, {"csd": loss.item(), "score_gap": diff.pow(2).sum(-1).mean().item(),
                  "gen_to_teacher": (x - x0_T).pow(2).sum(-1).mean().item()}
