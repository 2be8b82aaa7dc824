"""DD2 sampling (method.md section 3, "Stages" 4; paper Alg. 4).

- one step: x = G(eps), every position in one forward pass; quantised to the nearest code (default)
  or kept continuous (``continuous=True``: the tokenizer decodes the vectors themselves).
- k steps: the one-step sample, quantised, then the teacher re-samples its last k - 1 AR steps in
  order (ancestral sampling with its sampling rule), k network evaluations in sequence: one pass that
  prefills the teacher's KV cache with the kept prefix, then k - 1 cached steps.
- Table 7's stage-1 evaluation (token-by-token Euler sampling of the AR-diffusion model) is
  :func:`onestep.dd2.tune.euler_sample`; its sampler is :func:`ardiffusion_sampler`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from onestep import rng
from onestep.dd2.flowhead import FlowHeadGenerator
from onestep.dd2.model import ARDiffusion
from onestep.teacher.base import nearest_code
from onestep.teacher.sampling import SamplingConfig, sample_tokens


@torch.no_grad()
def one_step(generator: ARDiffusion, labels: Tensor, g: torch.Generator | None = None) -> Tensor:
    """x = G(eps) (B, L, C): one forward pass of the generator (an ARDiffusion or a flow-head generator)."""
    eps = rng.randn((labels.shape[0], *generator.noise_shape), g, labels.device)
    return generator.generate(eps, labels)


@torch.no_grad()
def multi_step(generator: ARDiffusion, teacher, labels: Tensor, sampling: SamplingConfig, steps: int,
               g: torch.Generator | None = None) -> Tensor:
    """Alg. 4: one generator step, then the teacher re-samples the last ``steps - 1`` AR steps. Ids (B, L)."""
    ids = nearest_code(one_step(generator, labels, g), teacher.codebook())
    if steps <= 1:
        return ids
    K = len(teacher.ar_steps())
    if steps - 1 > K:
        raise ValueError(f"steps={steps}: the teacher has only {K} AR steps")
    return sample_tokens(teacher, labels, sampling, g, prefix=ids, start_step=K - (steps - 1))


def dd2_sampler(generator: ARDiffusion, teacher, tokenizer, sampling: SamplingConfig, steps: int = 1,
                continuous: bool = False, name: str | None = None):
    """A :class:`~onestep.samplers.Sampler` for DD2 with ``steps`` total steps."""
    from onestep.samplers import Sampler, num_params

    if continuous and steps != 1:
        raise ValueError("continuous decoding is defined for one-step sampling only")
    cb = teacher.codebook()
    if isinstance(generator, FlowHeadGenerator):
        if continuous:
            raise ValueError("a flow-head generator outputs codes: there is no continuous decoding of it")
        return _flow_sampler(generator, teacher, tokenizer, sampling, steps, name)

    def sample(labels: Tensor, g: torch.Generator) -> Tensor:
        if steps == 1:
            x = one_step(generator, labels, g)
            return x if continuous else nearest_code(x, cb)
        return multi_step(generator, teacher, labels, sampling, steps, g)

    name = name or f"dd2-{steps}step" + ("-continuous" if continuous else "")
    params = num_params(generator) if steps == 1 else num_params(generator, teacher)
    return Sampler(name=name, steps=steps, sample=sample, tokenizer=tokenizer, params=params,
                   info={"num_classes": teacher.num_classes, "sampling": sampling.to_dict(), "continuous": continuous})


def _flow_sampler(generator: FlowHeadGenerator, teacher, tokenizer, sampling: SamplingConfig, steps: int,
                  name: str | None):
    """The ``flow`` recipe's sampler: one pass + the ODE map, then ``steps - 1`` teacher passes of
    :func:`~onestep.dd2.flowhead.refine` (each re-maps every position's noise under the teacher's conditionals)."""
    from onestep.dd2.flowhead import refine
    from onestep.samplers import Sampler, num_params

    K = len(teacher.ar_steps())
    if not 1 <= steps <= K:
        raise ValueError(f"steps={steps}: a flow-head generator samples with 1 to {K} steps (the teacher's AR steps)")

    def sample(labels: Tensor, g: torch.Generator) -> Tensor:
        eps = rng.randn((labels.shape[0], *generator.noise_shape), g, labels.device)
        ids = generator.sample_ids(eps, labels)
        return refine(ids, eps, labels, teacher, sampling, steps - 1, generator.ode) if steps > 1 else ids

    params = num_params(generator) if steps == 1 else num_params(generator, teacher)
    return Sampler(name=name or f"dd2-{steps}step", steps=steps, sample=sample, tokenizer=tokenizer, params=params,
                   info={"num_classes": teacher.num_classes, "sampling": sampling.to_dict(), "recipe": "flow"})


def ardiffusion_sampler(model: ARDiffusion, tokenizer, euler_steps: int = 10, name: str = "dd2-stage1-euler"):
    """Table 7: the stage-1 AR-diffusion model sampled token by token with an Euler solver (quantised)."""
    from onestep.dd2.tune import euler_sample
    from onestep.samplers import Sampler, num_params

    bb = model.backbone
    return Sampler(name=name, steps=len(bb.ar_steps()) * euler_steps,
                   sample=lambda labels, g: nearest_code(euler_sample(model, labels, g, euler_steps), bb.codebook()),
                   tokenizer=tokenizer, params=num_params(model),
                   info={"num_classes": bb.num_classes, "euler_steps": euler_steps})


def load_dd2(run_dir: str | Path, device="cpu"):
    """(generator, teacher, tokenizer, sampling rule) from a ``onestep dd2 train`` run (the EMA generator and the
    stage-0 teacher) or a ``onestep dd2 flow`` run (the flow-head generator and the teacher)."""
    from onestep import checkpoint as ckpt
    from onestep.dd2.flowhead import load_flow
    from onestep.dd2.tune import load_ardiffusion
    from onestep.runs import final_dir, load_teacher, resolve_ref

    d = final_dir(run_dir)
    if ckpt.read_json(d / "config.json").get("model", {}).get("generator") == "flow-head":
        return load_flow(run_dir, device)
    generator, config = load_ardiffusion(run_dir, device)
    if config.get("kind") != "dd2-generator":
        raise ValueError(f"{run_dir} is a stage-1 run; sample from a `onestep dd2 train` run")
    teacher, _, tokenizer = load_teacher(resolve_ref(config["teacher_dir"], final_dir(run_dir)), device)
    return generator, teacher, tokenizer, SamplingConfig(**config["sampling"])


def build_sampler(method: str, run_dir: str, device="cpu", args=None):
    """``onestep sample --method dd2 --sampling-steps K [--continuous]``: the sampling rule of the distilled teacher
    (recorded in the run) is used for the teacher's re-sampling steps."""
    generator, teacher, tokenizer, sampling = load_dd2(run_dir, device)
    steps = getattr(args, "steps", 1) if args is not None else 1
    return dd2_sampler(generator, teacher, tokenizer, sampling, steps, bool(getattr(args, "continuous", False)))
