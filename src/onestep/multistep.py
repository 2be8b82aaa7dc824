"""The named multi-step samplers, the same for every one-step method (DD1, DD2, MapKD).

A one-step method gives token ids from noise eps (B, n, C) in one network call. With k > 1 steps the teacher refines
that sample by one of two rules, both k sequential network calls in total:

- ``alg4`` (DD2 paper, Algorithm 4): the teacher re-samples its last k - 1 AR steps in order (ancestral sampling
  under its sampling rule, with fresh randomness): one pass that prefills the KV cache with the kept prefix, then
  cached steps. Only the last k - 1 AR steps can change.
- ``jacobi``: k - 1 parallel teacher passes over the whole sequence; each gives the teacher's conditionals on the
  current tokens, and every position is re-mapped by DD1's closed-form map of the SAME noise eps under them (a Jacobi
  iteration of DD1's map; a position whose prefix did not change keeps its token, and n passes give the teacher's
  own DD1-map sample of eps exactly).

DD1 also has its paper's own rule (``dd1``: trajectory points and a teacher-involved window,
:mod:`onestep.dd1.sampling`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from onestep.flow_map import ODEConfig, ode_map
from onestep.teacher.sampling import SamplingConfig, sample_tokens, teacher_log_probs

MULTISTEP = ("alg4", "jacobi")

__all__ = ["MULTISTEP", "alg4", "jacobi", "refined", "check_steps"]


def check_steps(teacher, steps: int) -> None:
    """ValueError unless 1 <= steps <= the number of the teacher's AR steps."""
    K = len(teacher.ar_steps())
    if not 1 <= steps <= K:
        raise ValueError(f"steps={steps}: the multi-step samplers take 1 to {K} steps (the teacher has {K} AR steps)")


@torch.no_grad()
def alg4(ids: Tensor, labels: Tensor, teacher, sampling: SamplingConfig, steps: int,
         g: torch.Generator | None = None) -> Tensor:
    """Algorithm 4: the teacher re-samples the last ``steps - 1`` AR steps of ``ids`` (B, n)."""
    if steps <= 1:
        return ids
    K = len(teacher.ar_steps())
    return sample_tokens(teacher, labels, sampling, g, prefix=ids, start_step=K - (steps - 1))


@torch.no_grad()
def jacobi(ids: Tensor, eps: Tensor, labels: Tensor, teacher, sampling: SamplingConfig, steps: int,
           ode: ODEConfig | None = None) -> Tensor:
    """``steps - 1`` Jacobi passes of DD1's map from ``ids`` (B, n): the teacher's conditionals on the current tokens
    in one parallel pass, then the ODE map of the same noise ``eps`` under them."""
    for _ in range(steps - 1):
        ids = ode_map(eps, teacher_log_probs(teacher, ids, labels, sampling), teacher.codebook(), ode)
    return ids


def refined(one_step: Callable[[Tensor, torch.Generator], tuple[Tensor, Tensor]], teacher, sampling: SamplingConfig,
            steps: int, rule: str, ode: ODEConfig | None = None) -> Callable[[Tensor, torch.Generator], Tensor]:
    """``sample(labels, g) -> ids``: ``one_step(labels, g) -> (ids, eps)``, then ``rule`` ("alg4" or "jacobi") for the
    other ``steps - 1`` network calls."""
    if rule not in MULTISTEP:
        raise ValueError(f"unknown multi-step sampler {rule!r}; choose from {', '.join(MULTISTEP)}")
    check_steps(teacher, steps)

    def sample(labels: Tensor, g: torch.Generator) -> Tensor:
        ids, eps = one_step(labels, g)
        if steps == 1:
            return ids
        if rule == "alg4":
            return alg4(ids, labels, teacher, sampling, steps, g)
        return jacobi(ids, eps, labels, teacher, sampling, steps, ode)

    return sample
