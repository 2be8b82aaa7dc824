"""The map-start recipe of DD2: regress the one-step generator onto DD1's noise-to-token pairs, then refine by CSD.

DMD's first version anchored distribution matching with a regression loss on ODE pairs; this recipe does the
same in two phases instead of one sum. Phase 1 fits the generator G(eps) = eps - v(eps, 1 | f(eps_<i)) of
:class:`~onestep.dd2.model.ARDiffusion` to DD1's deterministic map (method.md sections 1 and 2.1): noise
eps (B, n, C) -> the code vectors of the tokens the ODE lands on, with the mean squared error

    L_reg = E_eps sum_i |G(eps)_i - c_{q_i(eps)}|^2

(a continuous regression target: the DD2 generator outputs vectors, and its quantised samples are what the
map's push-forward is measured on). Phase 2 is ordinary CSD (:mod:`onestep.dd2.csd`) started from that
generator, with ``CSDConfig.guidance_warmup`` guidance-only steps first (psi catches up with a generator it
was not initialised from) and a low, decaying generator LR: the exact map is a fixed point of CSD
(Proposition 1), and at a working LR CSD's noisy gradient pushes the generator off it
(docs/dd2-convergence.md).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from onestep.dd2.model import ARDiffusion
from onestep.trainer import make_optimizer


def regression_loss(generator: ARDiffusion, eps: Tensor, labels: Tensor, target: Tensor) -> Tensor:
    """L_reg = mean over samples of sum_i |G(eps)_i - target_i|^2, target (B, n, C) the map's code vectors."""
    return (generator.generate(eps, labels) - target).pow(2).sum(-1).mean(0).sum() / eps.shape[1]


def cosine_lr(lr: float, step: int, steps: int, warmup: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``lr`` to 0 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * frac))


def fit_to_map(generator: ARDiffusion, batches: Callable[[int], tuple[Tensor, Tensor, Tensor]], steps: int,
               lr: float, warmup: int = 0, grad_clip: float = 1.0,
               log: Callable[[int, float], None] | None = None, log_every: int = 100) -> float:
    """Phase 1: ``steps`` Adam steps of :func:`regression_loss`; ``batches(step)`` returns (eps, labels, target).

    Returns the last loss. Adam betas (0.9, 0.95) as in CSD; the LR follows :func:`cosine_lr`."""
    opt = make_optimizer(torch.optim.Adam, generator.parameters(), lr=lr, betas=(0.9, 0.95))
    generator.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, step, steps, warmup)
        eps, labels, target = batches(step)
        loss = regression_loss(generator, eps, labels, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(generator.parameters(), grad_clip)
        opt.step()
        if log is not None and (step + 1) % log_every == 0:
            log(step + 1, loss.item())
    return loss.item()
