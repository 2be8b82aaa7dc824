"""Where the project's files live: the shipped checkpoints, the benchmark results and the cache.

One module owns these paths so that nothing else derives a location from ``__file__``. In a checkout the shipped
checkpoints are ``assets/`` and the results ``benchmarks/results/`` beside ``src/``; an installed package has no
checkout, so ``ONESTEP_ASSETS`` and ``ONESTEP_RESULTS`` name them explicitly, and ``ONESTEP_CACHE`` the cache
(default ``~/.cache/onestep``).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["checkout", "assets_dir", "results_dir", "cache_dir"]


def checkout() -> Path:
    """The repository holding this package (``src/onestep`` -> the checkout's root)."""
    return Path(__file__).resolve().parents[2]


def assets_dir() -> Path:
    """The shipped checkpoints (``assets/``; ``ONESTEP_ASSETS`` overrides)."""
    return Path(os.environ.get("ONESTEP_ASSETS") or checkout() / "assets")


def results_dir() -> Path:
    """Where ``onestep bench`` writes its tables (``benchmarks/results/``; ``ONESTEP_RESULTS`` overrides)."""
    return Path(os.environ.get("ONESTEP_RESULTS") or checkout() / "benchmarks" / "results")


def cache_dir() -> Path:
    """Caches that are derived from data (classifiers, reference statistics): ``ONESTEP_CACHE`` or
    ``~/.cache/onestep``."""
    return Path(os.environ.get("ONESTEP_CACHE") or Path.home() / ".cache" / "onestep")
