"""DD2 losses (method.md section 3), all in velocity / x0 form with alpha_t = 1 - t, sigma_t = t.

- :func:`gts_loss` (stage 1): Ground Truth Score. Regress the head onto the teacher's closed-form
  velocity v_T(q_t, t | q_<i) (flow.py), for CLEAN teacher samples q. Since s = -(1 - t)/t * v + const
  in v, |s_psi - s_T|^2 = ((1 - t) / t)^2 |v_psi - v_T|^2: the velocity MSE used here is the score loss
  with weight (t / (1 - t))^2, the usual velocity-form weighting (a documented choice).
- :func:`dsm_loss`: ordinary denoising score matching with the Monte-Carlo RectFlow target
  v = eps - x0 (the guidance network's loss, and the stage-1 ablation ``--loss dsm``).
- :func:`csd_generator_loss` (stage 2): conditional score distillation in SiD form with alpha = 1.

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
             features_grad: bool = True, t_max: float = 1.0, condition: Tensor | None = None,
             base: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict]:
    """Denoising score matching: v_target = eps - x0 (RectFlow), on sequences x0 (B, n, C), t ~ U[t_min, t_max].

    ``condition`` (B, n, C), default x0: the sequence the backbone reads (its row i sees condition_<i), e.g. x0
    with every position snapped to its nearest code (CSD's ``condition_on_codes``). ``base`` = (log_p (B, n, V),
    codebook): the model is a residual around the closed-form velocity of that Dirac mixture (section 1),
    v = v_mix(q_t, t) + model.velocity(q_t, t, f) (:func:`residual_denoise`)."""
    cond = x0 if condition is None else condition
    f = model.features(cond, labels) if features_grad else model.features(cond, labels).detach()
    q_t, eps, t = _noised(x0, m, generator, t_min, t_max)
    v = model.velocity(q_t, t, f.expand(m, *f.shape))
    if base is not None:
        with torch.no_grad():
            v_mix = flow.velocity(q_t, t, base[0].expand(m, *base[0].shape), base[1])
        v = v + v_mix
    loss = (v - (eps - x0)).pow(2).sum(-1).mean()
    return loss, {"dsm": loss.item()}


def residual_denoise(guidance: ARDiffusion, q_t: Tensor, t: Tensor, f: Tensor, x0_mix: Tensor) -> Tensor:
    """x0 of a guidance network in residual form: x0_psi = x0_mix(q_t, t) - t v_res(q_t, t, f), where x0_mix is the
    closed-form denoiser of the teacher's Dirac mixture at the same prefix (so v_psi = v_mix + v_res)."""
    return x0_mix - t[..., None] * guidance.velocity(q_t, t, f)


def csd_generator_loss(x: Tensor, labels: Tensor, log_p_teacher: Tensor, codebook: Tensor, guidance: ARDiffusion,
                       f_guidance: Tensor, generator=None, alpha: float = 1.0, t_min: float = 0.02,
                       t_max: float = 0.98, m: int = 1, form: str = "sid",
                       residual: bool = False, samples: Tensor | None = None) -> tuple[Tensor, dict]:
    """Conditional score distillation, SiD form (method.md section 3, stage 2), for generated x (B, n, C).

    Per position: q_t = (1 - t) x_i + t eps; x0_T = teacher's closed-form denoised mean given the
    stop-gradient prefix (``log_p_teacher`` computed on sg(x)); x0_psi = guidance network's estimate with
    backbone features ``f_guidance`` of sg(x) (computed without a graph);

        loss_i = (x0_T - x0_psi) . ((x0_T - x_i) - alpha (x0_T - x0_psi)) / mean_i |x_i - x0_T|

    the normaliser (per sample and noise draw, detached) as in SiD. The loss is the MEAN over draws, samples and
    positions (SiD sums over dimensions): the gradient's direction is SiD's, its scale 1/n of it, which Adam
    undoes except through its eps and the gradient clip. As in SiD, x0_T and x0_psi are
    differentiable functions of q_t (the teacher's closed form and the guidance head, whose parameters
    receive no update here); the prefix conditions (log p, f) are constants. So theta's gradient arrives
    only via x_i at its own position: through q_t and through the explicit x_i term. ``m`` (t, eps) draws
    per generated sequence are averaged (m = 1: one draw, the paper's loss; m > 1 lowers the variance of
    the generator's gradient at the cost of m head evaluations, like the guidance turn's ``m_noise``).

    ``residual``: psi is in residual form around the teacher's closed form (:func:`residual_denoise`), so the score
    difference is x0_T - x0_psi = t v_res(q_t, t, f): exactly zero wherever psi's residual is.

    ``samples`` (M, B, n, C): instead of psi, the generator's conditional given its own prefix is the uniform mixture
    of these M draws (:meth:`ARDiffusion.generate_and_resample`), and x0_psi is that mixture's closed-form denoiser
    (:func:`flow.mixture_denoise`); ``guidance`` and ``f_guidance`` are then unused.

    ``form="dmd"`` (an ablation) drops the denoisers' Jacobians: both x0 estimates are evaluated at a
    q_t built from sg(x), and the gradient on x_i is exactly -(x0_T - x0_psi) / norm (DMD's form of the
    same score difference).
    """
    if form not in ("sid", "dmd"):
        raise ValueError(f"form must be 'sid' or 'dmd', got {form!r}")
    shape = (m, *x.shape)
    t = sample_t(shape[:-1], generator, x.device, t_min, t_max)
    eps = rng.randn(shape, generator, x.device)
    q_t = (1 - t[..., None]) * (x if form == "sid" else x.detach()) + t[..., None] * eps
    with torch.set_grad_enabled(form == "sid" and torch.is_grad_enabled()):
        x0_T = flow.denoise(q_t, t, log_p_teacher.expand(m, *log_p_teacher.shape), codebook)
        if samples is not None:
            x0_psi = flow.mixture_denoise(q_t, t, samples)
        else:
            f_psi = f_guidance.expand(m, *f_guidance.shape)
            x0_psi = residual_denoise(guidance, q_t, t, f_psi, x0_T) if residual else guidance.denoise(q_t, t, f_psi)
    diff = x0_T - x0_psi
    with torch.no_grad():
        norm = (x - x0_T).abs().mean(dim=(-2, -1), keepdim=True).clamp_min(1e-5)
    if form == "sid":
        per = (diff * ((x0_T - x) - alpha * diff)).sum(-1, keepdim=True) / norm
    else:  # gradient -(x0_T - x0_psi) / norm on x_i alone: no Jacobian of either denoiser
        per = -(diff * x).sum(-1, keepdim=True) / norm
    loss = per.mean()
    return loss, {"csd": loss.item(), "score_gap": diff.pow(2).sum(-1).mean().item(),
                  "gen_to_teacher": (x - x0_T).pow(2).sum(-1).mean().item()}
