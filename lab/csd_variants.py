"""Variants of DD2's stage 2 (CSD) that the studies measure against the paper's loss (lab/dd2-convergence.md).

The product's :class:`onestep.dd2.csd.DD2` runs the paper's loss. :class:`VariantDD2` is a drop-in replacement that
reads a :class:`CSDAblation`; ``onestep.dd2.train.train(..., wrapper=variant(ablation))`` trains with it, and the run
records the ablation's changed fields in its config (``"ablation"``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from onestep import flow, rng
from onestep.dd2.csd import DD2, CSDConfig
from onestep.dd2.losses import sample_t
from onestep.dd2.model import ARDiffusion
from onestep.teacher.sampling import SamplingConfig, teacher_log_probs

__all__ = ["CSDAblation", "VariantDD2", "variant", "csd_generator_loss", "dsm_loss", "residual_denoise"]


@dataclass(frozen=True)
class CSDAblation:
    """A variant of CSD; the defaults are the paper's loss.

    m_noise_gen: (t, eps) draws per generated sequence in the generator's loss (1 = the paper's).
    alpha: SiD's alpha (the DD2 paper: 1.0; SiD's own default is 1.2).
    loss_form: "sid" (the paper's) or "dmd" (no Jacobian of the denoisers).
    t_min, t_max: the generator turn's t range; dsm_t_min, dsm_t_max: the guidance turn's (DSM) t range.
    generator_head_gain: the generator's head re-parameterised to this input gain at the start of CSD
        (function-preserving, :meth:`MLPHead.set_input_gain`; None = the gain stage 1 trained with).
    guidance_residual: psi in residual form around the teacher's closed-form denoiser (:func:`residual_denoise`), its
        output layer zeroed at the start, so that psi is the teacher exactly until it learns the generator's deviation.
    guidance_resample: M > 0 replaces psi (and the guidance turns) by M fresh draws of eps_i per position with the
        prefix noise kept: exact samples of the generator's conditional given its own prefix
        (:meth:`ARDiffusion.generate_and_resample`), whose uniform mixture's closed-form denoiser stands in for x0_psi
        (:func:`flow.mixture_denoise`).
    """

    m_noise_gen: int = 1
    alpha: float = DD2.ALPHA
    loss_form: str = "sid"
    t_min: float = DD2.T_RANGE[0]
    t_max: float = DD2.T_RANGE[1]
    dsm_t_min: float = DD2.DSM_T_RANGE[0]
    dsm_t_max: float = DD2.DSM_T_RANGE[1]
    generator_head_gain: float | None = None
    guidance_residual: bool = False
    guidance_resample: int = 0

    def __post_init__(self):
        if self.loss_form not in ("sid", "dmd"):
            raise ValueError(f"loss_form must be 'sid' or 'dmd', got {self.loss_form!r}")
        if self.guidance_resample == 1 or self.guidance_resample < 0:
            raise ValueError(f"guidance_resample must be 0 (psi) or at least 2 draws, got {self.guidance_resample}")

    def to_dict(self) -> dict:
        return asdict(self)

    def changes(self) -> dict:
        """The fields that differ from the paper's loss (empty for it)."""
        return {k: v for k, v in asdict(self).items() if v != getattr(CSDAblation, k)}


def residual_denoise(guidance: ARDiffusion, q_t: Tensor, t: Tensor, f: Tensor, x0_mix: Tensor) -> Tensor:
    """x0 of a guidance network in residual form: x0_psi = x0_mix(q_t, t) - t v_res(q_t, t, f), where x0_mix is the
    closed-form denoiser of the teacher's Dirac mixture at the same prefix (so v_psi = v_mix + v_res)."""
    return x0_mix - t[..., None] * guidance.velocity(q_t, t, f)


def dsm_loss(model: ARDiffusion, x0: Tensor, labels: Tensor, m: int, generator, t_min: float, t_max: float,
             condition: Tensor, base: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict]:
    """The guidance turn's DSM loss (:func:`onestep.dd2.losses.dsm_loss`), with ``base`` = (log_p (B, n, V), codebook):
    the model is a residual around the closed-form velocity of that Dirac mixture, v = v_mix(q_t, t) + v_model."""
    from onestep.dd2.losses import dsm_loss as paper_dsm

    if base is None:
        return paper_dsm(model, x0, labels, m, generator, t_min, t_max=t_max, condition=condition)
    f = model.features(condition, labels)
    t = sample_t((m, *x0.shape[:-1]), generator, x0.device, t_min, t_max)
    eps = rng.randn((m, *x0.shape), generator, x0.device)
    q_t = (1 - t[..., None]) * x0 + t[..., None] * eps
    v = model.velocity(q_t, t, f.expand(m, *f.shape))
    with torch.no_grad():
        v_mix = flow.velocity(q_t, t, base[0].expand(m, *base[0].shape), base[1])
    v = v + v_mix
    loss = (v - (eps - x0)).pow(2).sum(-1).mean()
    return loss, {"dsm": loss.item()}


def csd_generator_loss(x: Tensor, labels: Tensor, log_p_teacher: Tensor, codebook: Tensor, guidance: ARDiffusion,
                       f_guidance: Tensor, generator=None, alpha: float = 1.0, t_min: float = 0.02,
                       t_max: float = 0.98, m: int = 1, form: str = "sid",
                       residual: bool = False, samples: Tensor | None = None) -> tuple[Tensor, dict]:
    """The generator turn's loss with the variants of :class:`CSDAblation` (the paper's is
    :func:`onestep.dd2.losses.csd_generator_loss`, which this equals at m = 1, form "sid", no residual, no samples).

    ``m`` (t, eps) draws per generated sequence are averaged. ``residual``: psi in residual form
    (:func:`residual_denoise`). ``samples`` (M, B, n, C): x0_psi is the uniform mixture of these draws' closed-form
    denoiser (``guidance`` and ``f_guidance`` unused). ``form="dmd"`` drops the denoisers' Jacobians: the gradient on
    x_i is exactly -(x0_T - x0_psi) / norm.
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
    else:
        per = -(diff * x).sum(-1, keepdim=True) / norm
    loss = per.mean()
    return loss, {"csd": loss.item(), "score_gap": diff.pow(2).sum(-1).mean().item(),
                  "gen_to_teacher": (x - x0_T).pow(2).sum(-1).mean().item()}


class VariantDD2(DD2):
    """:class:`onestep.dd2.csd.DD2` reading a :class:`CSDAblation`; with the default ablation it computes the paper's
    loss (the same draws in the same order)."""

    def __init__(self, generator: ARDiffusion, guidance: ARDiffusion, teacher, sampling: SamplingConfig,
                 cfg: CSDConfig, ablation: CSDAblation | None = None):
        super().__init__(generator, guidance, teacher, sampling, cfg)
        self.ablation = ab = ablation or CSDAblation()
        if ab.generator_head_gain is not None and ab.generator_head_gain != generator.head.input_gain:
            generator.head.set_input_gain(ab.generator_head_gain)
        if ab.guidance_residual:  # psi starts as the teacher itself: a zero residual
            with torch.no_grad():
                guidance.head.final.weight.zero_()
                guidance.head.final.bias.zero_()
        if ab.changes():
            self.record = {"ablation": ab.changes()}

    def guidance_turns(self) -> int:
        return 0 if self.ablation.guidance_resample else self.cfg.guidance_steps

    def forward(self, labels: Tensor, turn: str, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        cfg, ab = self.cfg, self.ablation
        eps = self.noise(labels.shape[0], generator, labels.device)
        if turn == "guidance":
            with torch.no_grad():
                x = self.generator.generate(eps, labels)
                cond = self.condition(x)
                base = (teacher_log_probs(self.teacher, cond, labels, self.sampling), self.teacher.codebook()) \
                    if ab.guidance_residual else None
            return dsm_loss(self.guidance, x, labels, cfg.m_noise, generator, ab.dsm_t_min, ab.dsm_t_max, cond, base)
        if turn != "generator":
            raise ValueError(f"turn must be 'generator' or 'guidance', got {turn!r}")
        if ab.guidance_resample:
            x, samples = self.generator.generate_and_resample(eps, labels, ab.guidance_resample, generator)
            with torch.no_grad():
                log_p = teacher_log_probs(self.teacher, self.condition(x), labels, self.sampling)
            return csd_generator_loss(x, labels, log_p, self.teacher.codebook(), None, None, generator, ab.alpha,
                                      ab.t_min, ab.t_max, ab.m_noise_gen, ab.loss_form, samples=samples)
        x = self.generator.generate(eps, labels)
        x_sg = self.condition(x)
        with torch.no_grad():
            log_p = teacher_log_probs(self.teacher, x_sg, labels, self.sampling)
            f_psi = self.guidance.features(x_sg, labels)
        return csd_generator_loss(x, labels, log_p, self.teacher.codebook(), self.guidance, f_psi, generator,
                                  ab.alpha, ab.t_min, ab.t_max, ab.m_noise_gen, ab.loss_form, ab.guidance_residual)


def variant(ablation: CSDAblation):
    """A ``wrapper`` for :func:`onestep.dd2.train.train` that builds a :class:`VariantDD2` with ``ablation``."""
    return lambda generator, guidance, teacher, sampling, cfg: VariantDD2(generator, guidance, teacher, sampling, cfg,
                                                                          ablation)
