"""Seeded random draws onto any device.

PyTorch refuses a ``torch.Generator`` that lives on another device than the tensor it fills (a CPU generator
cannot draw a CUDA tensor). The training loops keep ONE CPU generator (its state is checkpointed, and a run
draws the same numbers on every machine); the samplers keep one on the sampling device. These helpers draw on
the generator's own device and move the result to ``device``, so both kinds work with ``--device cuda``.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
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


def stream_seed(seed: int, index: int, namespace: str = "eval") -> int:
    """The seed of draw stream ``index`` (e.g. an evaluation batch) of a run seeded ``seed``: 63 bits of
    sha256("onestep/<namespace>/<seed>/<index>").

    Evaluation must not draw the noise a model was trained on. The training streams use small integer seeds (DD1's
    pair shard i draws from ``seed + i``, the training loops from ``seed * 1000 + rank``), and with ``seed + b`` the
    evaluation batch b of seed 0 drew exactly the noise of DD1's training shard b; two evaluation seeds also shared
    all but one batch. A hashed seed coincides with neither."""
    digest = hashlib.sha256(f"onestep/{namespace}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


SEED_MAX = 2 ** 63 - 1  # the largest seed a command takes (a seed is an integer in 0..SEED_MAX)


def derived_seed(value: int) -> int:
    """A seed derived from a run's seed (``seed * 1000 + rank``, ``seed + shard``, ...) as a ``torch.Generator`` takes
    it: modulo 2**64, so that every seed up to :data:`SEED_MAX` works (small values are unchanged)."""
    return int(value) % 2 ** 64


def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and python RNGs from a run's seed. Every training entry point calls it first,
    before any model is built: layers created from the global RNG (a new head, an MLP, a copy's fresh embedding) then
    start from the same weights in every run of the same command and seed."""
    torch.manual_seed(derived_seed(seed))
    random.seed(seed)
    np.random.seed(derived_seed(seed) % 2 ** 32)
