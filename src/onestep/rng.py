"""Seeded random draws onto any device.

PyTorch refuses a ``torch.Generator`` that lives on another device than the tensor it fills (a CPU generator
cannot draw a CUDA tensor). The training loops keep ONE CPU generator (its state is checkpointed, and a run
draws the same numbers on every machine); the samplers keep one on the sampling device. These helpers draw on
the generator's own device and move the result to ``device``, so both kinds work with ``--device cuda``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _devices(generator: torch.Generator | None, device) -> tuple[torch.device, torch.device]:
    target = torch.device(device) if device is not None else (generator.device if generator is not None
                                                              else torch.device("cpu"))
    return (generator.device if generator is not None else target), target


def randn(shape, generator: torch.Generator | None = None, device=None) -> Tensor:
    """N(0, I) of ``shape`` on ``device`` (default: the generator's), drawn on the generator's device."""
    src, dst = _devices(generator, device)
    return torch.randn(shape, generator=generator, device=src).to(dst)


def rand(shape, generator: torch.Generator | None = None, device=None) -> Tensor:
    """U[0, 1) of ``shape`` on ``device`` (default: the generator's), drawn on the generator's device."""
    src, dst = _devices(generator, device)
    return torch.rand(shape, generator=generator, device=src).to(dst)


STREAM_STRIDE = 1_000_003  # a prime above any number of batches an evaluation draws


def stream_seed(seed: int, index: int) -> int:
    """The seed of draw stream ``index`` (an evaluation batch) of a run seeded ``seed``: ``seed * STREAM_STRIDE +
    index``. Two seeds' streams never coincide (``seed + index`` made seed 1's stream i seed 0's stream i + 1), and
    seed 0's streams are ``index`` as before. (DD1 pair shards keep ``seed + i``: it is recorded in every pair set's
    manifest, which a resume must match.)"""
    return seed * STREAM_STRIDE + index
