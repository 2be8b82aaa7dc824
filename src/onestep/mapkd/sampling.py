"""MapKD sampling: one pass + the closed-form map; with k steps, a named multi-step sampler
(:mod:`onestep.multistep`; MapKD's default is ``jacobi``, which re-maps the same noise)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from onestep import checkpoint as ckpt
from onestep import rng
from onestep.mapkd.generator import LEGACY_GENERATOR_NAMES, MapKDGenerator
from onestep.multistep import refined
from onestep.runs import final_dir, resolve_ref
from onestep.samplers import Sampler, num_params
from onestep.teacher.load import load_teacher
from onestep.teacher.sampling import SamplingConfig

__all__ = ["is_mapkd_config", "load_mapkd", "mapkd_sampler", "build_sampler"]


def is_mapkd_config(config: dict) -> bool:
    """Whether a run's config is MapKD's: kind "mapkd", or a run written before the method had its name (kind
    "dd2-generator" with the generator "flow-head", from ``onestep dd2 flow``)."""
    return config.get("kind") == "mapkd" or (
        config.get("kind") == "dd2-generator"
        and config.get("model", {}).get("generator") in LEGACY_GENERATOR_NAMES)


def load_mapkd(run_dir: str | Path, device="cpu"):
    """(generator, teacher, tokenizer, sampling rule) from a MapKD run (``onestep mapkd train``)."""
    d = final_dir(run_dir)
    config = ckpt.read_config(d)
    if not is_mapkd_config(config):
        raise ckpt.CheckpointError(f"{d} is a {config.get('kind')!r} run, not a MapKD run")
    teacher, _, tokenizer = load_teacher(resolve_ref(config["teacher_dir"], d), device)
    generator = ckpt.load_model(d, lambda: MapKDGenerator.from_config(config["model"], teacher), config)
    return generator.to(device).eval(), teacher, tokenizer, SamplingConfig(**config["sampling"])


def mapkd_sampler(generator: MapKDGenerator, teacher, tokenizer, sampling: SamplingConfig, steps: int = 1,
                  multistep: str = "jacobi", name: str | None = None) -> Sampler:
    """One pass + the ODE map, then ``steps - 1`` teacher calls of the ``multistep`` sampler."""

    def one_step(labels: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        eps = rng.randn((labels.shape[0], *generator.noise_shape), g, labels.device)
        return generator.sample_ids(eps, labels), eps

    sample = refined(one_step, teacher, sampling, steps, multistep, generator.ode)
    params = num_params(generator) if steps == 1 else num_params(generator, teacher)
    default = "mapkd-1step" if steps == 1 else f"mapkd-{multistep}-{steps}step"
    return Sampler(name=name or default, steps=steps, sample=sample, tokenizer=tokenizer, params=params,
                   info={"num_classes": teacher.num_classes, "sampling": sampling.to_dict(),
                         "multistep": multistep if steps > 1 else None})


def build_sampler(method: str, run_dir: str, device="cpu", args=None) -> Sampler:
    """``onestep sample --method mapkd --sampling-steps K [--multistep jacobi|alg4]``."""
    generator, teacher, tokenizer, sampling = load_mapkd(run_dir, device)
    steps = getattr(args, "steps", 1) if args is not None else 1
    return mapkd_sampler(generator, teacher, tokenizer, sampling, steps, getattr(args, "multistep", None) or "jacobi")
