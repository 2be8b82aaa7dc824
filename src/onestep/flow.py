"""Closed-form RectFlow of a Dirac mixture over the codebook (method.md section 1; shared by DD1 and DD2).

One token position with probabilities p over the V codes c_j (after the teacher's CFG, temperature,
top-k and top-p) is the distribution sum_j p_j delta(c_j). Under RectFlow, x_t = (1 - t) x_0 + t eps
(t = 0 data, t = 1 noise), so the noised marginal is sum_j p_j N(x; (1 - t) c_j, t^2 I) and

    w_j(x, t)  = softmax_j( log p_j - |x - (1 - t) c_j|^2 / (2 t^2) )      posterior weights
    x0_hat     = sum_j w_j c_j                                             denoised mean
    s(x, t)    = -(x - (1 - t) x0_hat) / t^2                               score
    v(x, t)    = (x - x0_hat) / t                                          velocity dx/dt

Shapes: x (..., C), t broadcastable to x.shape[:-1] (e.g. (B, n) or a scalar), log_p (..., V) with
-inf for truncated codes, codebook (V, C). The |x|^2 term is constant over j and is dropped from the
softmax logits, which removes the cancellation of the expanded square. Everything is computed in
float32 or better (``dtype`` may ask for float64); results are returned in that dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "log_weights",
    "denoise",
    "score",
    "velocity",
    "log_density",
    "mixture_denoise",
    "x0_to_velocity",
    "velocity_to_x0",
    "velocity_to_score",
    "score_to_velocity",
]


def _prep(x: Tensor, t: Tensor | float, log_p: Tensor, codebook: Tensor, dtype: torch.dtype | None):
    dtype = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    x = x.to(dtype)
    t = torch.as_tensor(t, dtype=dtype, device=x.device)
    t = t.expand(x.shape[:-1]).unsqueeze(-1)  # (..., 1)
    return x, t, log_p.to(dtype), codebook.to(dtype=dtype, device=x.device)


def log_weights(x: Tensor, t: Tensor | float, log_p: Tensor, codebook: Tensor, dtype=None) -> Tensor:
    """log w_j(x, t): posterior log-weights over codes (..., V). Truncated codes (log p = -inf) get -inf."""
    x, t, log_p, cb = _prep(x, t, log_p, codebook, dtype)
    a = 1.0 - t  # alpha_t
    # -|x - a c|^2 / (2 t^2) = (a x.c - a^2 |c|^2 / 2) / t^2 - |x|^2 / (2 t^2); the last term cancels.
    logits = log_p + (a * (x @ cb.t()) - 0.5 * a * a * cb.pow(2).sum(-1)) / (t * t)
    return torch.log_softmax(logits, dim=-1)


def denoise(x: Tensor, t: Tensor | float, log_p: Tensor, codebook: Tensor, dtype=None) -> Tensor:
    """x0_hat = E[x_0 | x_t = x] = sum_j w_j c_j, shape (..., C)."""
    w = log_weights(x, t, log_p, codebook, dtype).exp()
    return w @ codebook.to(w)


def mixture_denoise(x: Tensor, t: Tensor, samples: Tensor) -> Tensor:
    """x0_hat = E[x_0 | x_t = x] when x_0 is uniform over per-position samples: the denoiser of section 1 with the
    codebook replaced by M samples of each position's distribution and p_j = 1 / M.

    x (m, *S, C) and t (m, *S) (m noise draws), samples (M, *S, C) -> (m, *S, C). With samples that repeat the codes
    in the proportions p, this is :func:`denoise` exactly; differentiable in x."""
    ys = samples.to(torch.float32).movedim(0, -2)                 # (*S, M, C)
    t = t.to(torch.float32)[..., None]                            # (m, *S, 1)
    d = x.to(torch.float32)[..., None, :] - (1.0 - t)[..., None] * ys  # (m, *S, M, C)
    w = torch.softmax(-d.pow(2).sum(-1) / (2.0 * t * t), dim=-1)  # (m, *S, M)
    return (w[..., None] * ys).sum(-2)


def score(x: Tensor, t: Tensor | float, log_p: Tensor, codebook: Tensor, dtype=None) -> Tensor:
    """grad_x log q_t(x) = -(x - (1 - t) x0_hat) / t^2."""
    x0 = denoise(x, t, log_p, codebook, dtype)
    x, t, _, _ = _prep(x, t, log_p, codebook, x0.dtype)
    return -(x - (1 - t) * x0) / (t * t)


def velocity(x: Tensor, t: Tensor | float, log_p: Tensor, codebook: Tensor, dtype=None) -> Tensor:
    """RectFlow velocity v = dx/dt = (x - x0_hat) / t = E[eps - x_0 | x_t = x]."""
    x0 = denoise(x, t, log_p, codebook, dtype)
    x, t, _, _ = _prep(x, t, log_p, codebook, x0.dtype)
    return (x - x0) / t


def log_density(x: Tensor, t: Tensor | float, log_p: Tensor, codebook: Tensor, dtype=None) -> Tensor:
    """log q_t(x) = logsumexp_j(log p_j + log N(x; (1 - t) c_j, t^2 I)), shape (...)."""
    x, t, log_p, cb = _prep(x, t, log_p, codebook, dtype)
    c_dim = x.shape[-1]
    sq = (x.unsqueeze(-2) - (1 - t).unsqueeze(-1) * cb).pow(2).sum(-1)  # (..., V)
    t2 = (t * t)
    return torch.logsumexp(log_p - sq / (2 * t2), dim=-1) - 0.5 * c_dim * torch.log(2 * math.pi * t2.squeeze(-1))


# ---- parameterisation conversions (alpha_t = 1 - t, sigma_t = t) ----------------------------------
def _t(t: Tensor | float, like: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(like.shape[:-1]).unsqueeze(-1) if t.dim() < like.dim() else t


def x0_to_velocity(x0: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
    """v = (x_t - x0) / t."""
    return (x - x0) / _t(t, x)


def velocity_to_x0(v: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
    """x0 = x_t - t v."""
    return x - _t(t, x) * v


def velocity_to_score(v: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
    """s = -(x_t - (1 - t) x0) / t^2 with x0 = x_t - t v."""
    tt = _t(t, x)
    x0 = x - tt * v
    return -(x - (1 - tt) * x0) / (tt * tt)


def score_to_velocity(s: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
    """v = (-sigma_t s - x_t) / alpha_t with alpha_t = 1 - t, sigma_t = t (method.md section 3)."""
    tt = _t(t, x)
    return (-tt * s - x) / (1 - tt)
