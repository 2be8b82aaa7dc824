"""DD2 sampling (method.md section 3, "Stages" 4; paper Alg. 4).

- one step: x = G(eps), every position in one forward pass; quantised to the nearest code (default)
  or kept continuous (``continuous=True``: the tokenizer decodes the vectors themselves).
- k steps: the one-step sample, quantised, then a named multi-step sampler (:mod:`onestep.multistep`): ``alg4``
  (the default, the paper's Algorithm 4: the teacher re-samples its last k - 1 AR steps) or ``jacobi``.
- Table 7's stage-1 evaluation (token-by-token Euler sampling of the AR-diffusion model) is
  :func:`onestep.dd2.tune.euler_sample`; its sampler is :func:`ardiffusion_sampler`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from onestep import checkpoint as ckpt
from onestep import rng
from onestep.dd2.model import ARDiffusion
from onestep.dd2.tune import euler_sample, load_ardiffusion
from onestep.mapkd.sampling import is_mapkd_config
from onestep.multistep import alg4, refined
from onestep.runs import final_dir, resolve_ref
from onestep.samplers import Sampler, num_params
from onestep.teacher.base import nearest_code
from onestep.teacher.load import load_teacher
from onestep.teacher.sampling import SamplingConfig


@torch.no_grad()
def one_step(generator: ARDiffusion, labels: Tensor, g: torch.Generator | None = None,
             eps: Tensor | None = None) -> Tensor:
    """x = G(eps) (B, L, C): one forward pass of the generator (``eps`` drawn from ``g`` when not given)."""
    eps = rng.randn((labels.shape[0], *generator.noise_shape), g, labels.device) if eps is None else eps
    return generator.generate(eps, labels)


@torch.no_grad()
def multi_step(generator: ARDiffusion, teacher, labels: Tensor, sampling: SamplingConfig, steps: int,
               g: torch.Generator | None = None) -> Tensor:
    """Alg. 4: one generator step, then the teacher re-samples the last ``steps - 1`` AR steps. Ids (B, L)."""
    ids = nearest_code(one_step(generator, labels, g), teacher.codebook())
    return alg4(ids, labels, teacher, sampling, steps, g)


def dd2_sampler(generator: ARDiffusion, teacher, tokenizer, sampling: SamplingConfig, steps: int = 1,
                continuous: bool = False, name: str | None = None, multistep: str = "alg4"):
    """A :class:`~onestep.samplers.Sampler` for DD2 with ``steps`` total steps (``multistep``: the rule of the other
    ``steps - 1`` calls, :mod:`onestep.multistep`)."""
    if continuous and steps != 1:
        raise ValueError("continuous decoding is defined for one-step sampling only")
    cb = teacher.codebook()

    def first(labels: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        eps = rng.randn((labels.shape[0], *generator.noise_shape), g, labels.device)
        return nearest_code(one_step(generator, labels, eps=eps), cb), eps

    if continuous:
        sample = lambda labels, g: one_step(generator, labels, g)  # noqa: E731
    else:
        sample = refined(first, teacher, sampling, steps, multistep)
    default = "dd2-1step" if steps == 1 else f"dd2-{multistep}-{steps}step"
    name = name or default + ("-continuous" if continuous else "")
    params = num_params(generator) if steps == 1 else num_params(generator, teacher)
    return Sampler(name=name, steps=steps, sample=sample, tokenizer=tokenizer, params=params,
                   info={"num_classes": teacher.num_classes, "sampling": sampling.to_dict(), "continuous": continuous,
                         "multistep": multistep if steps > 1 else None})


def ardiffusion_sampler(model: ARDiffusion, tokenizer, euler_steps: int = 10, name: str = "dd2-stage1-euler"):
    """Table 7: the stage-1 AR-diffusion model sampled token by token with an Euler solver (quantised)."""
    bb = model.backbone
    return Sampler(name=name, steps=len(bb.ar_steps()) * euler_steps,
                   sample=lambda labels, g: nearest_code(euler_sample(model, labels, g, euler_steps), bb.codebook()),
                   tokenizer=tokenizer, params=num_params(model),
                   info={"num_classes": bb.num_classes, "euler_steps": euler_steps})


def load_dd2(run_dir: str | Path, device="cpu"):
    """(generator, teacher, tokenizer, sampling rule) from a ``onestep dd2 train`` run: the EMA generator and the
    stage-0 teacher."""
    if is_mapkd_config(ckpt.read_json(final_dir(run_dir) / "config.json")):
        raise ckpt.CheckpointError(f"{run_dir} is a MapKD run (onestep mapkd train), not DD2: use --method mapkd")
    generator, config = load_ardiffusion(run_dir, device)
    if config.get("kind") != "dd2-generator":
        raise ValueError(f"{run_dir} is a stage-1 run; sample from a `onestep dd2 train` run")
    teacher, _, tokenizer = load_teacher(resolve_ref(config["teacher_dir"], final_dir(run_dir)), device)
    return generator, teacher, tokenizer, SamplingConfig(**config["sampling"])


def build_sampler(method: str, run_dir: str, device="cpu", args=None):
    """``onestep sample --method dd2 --sampling-steps K [--multistep alg4|jacobi] [--continuous]``: the sampling rule
    of the distilled teacher (recorded in the run) is used for the teacher's steps."""
    generator, teacher, tokenizer, sampling = load_dd2(run_dir, device)
    steps = getattr(args, "steps", 1) if args is not None else 1
    return dd2_sampler(generator, teacher, tokenizer, sampling, steps, bool(getattr(args, "continuous", False)),
                       multistep=getattr(args, "multistep", None) or "alg4")
