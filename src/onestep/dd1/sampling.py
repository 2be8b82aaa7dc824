"""DD1 sampling (method.md section 2.4): 1-step, 2-step / multi-step, and teacher-involved.

All samplers take the initial noise eps (B, n, C) explicitly; every later DD step resets the not-yet
kept positions to the SAME original noise (a trajectory point of the flow map, the generator's training
input), never to fresh noise.

- 1 step:  X_1 = (eps_1..eps_n) -> argmax tokens.
- 2 steps: keep the first s tokens of the 1-step output, X_{s+1} = (q_1..q_s, eps_{s+1}..eps_n) ->
  argmax; s defaults to round(n * 80 / 256) (LlamaGen's 80 of 256).
- multi-step: the same with an increasing list of kept counts.
- teacher-involved: one DD step, keep its first ``a`` tokens, the teacher regenerates positions [a, b)
  given them (``teacher_mode="sample"``: ancestral sampling with the teacher's KV cache and
  SamplingConfig; ``"map"``: the teacher's deterministic flow map applied to the same eps, i.e. the
  exact trajectory the generator was trained on), then one DD step from X_{b+1} finishes the rest.
  With a = 0 the first DD step is skipped (the teacher starts from scratch). Model calls: 2 (1 if a = 0);
  teacher AR steps: those of the window.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from onestep.dd1.flow_map import ODEConfig, TeacherRunner, map_noise_to_tokens
from onestep.dd1.model import clean_mask
from onestep.teacher.base import ARTeacher
from onestep.teacher.sampling import SamplingConfig

__all__ = ["default_split", "dd_step", "one_step", "two_step", "multi_step", "teacher_involved", "sample_window",
           "draw_noise", "dd1_sampler"]


def default_split(n: int) -> int:
    """s = round(n * 80 / 256): the number of 1-step tokens 2-step sampling keeps (LlamaGen: 80)."""
    return int(round(n * 80 / 256))


def draw_noise(model, B: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """eps ~ N(0, I) of shape (B, n, C)."""
    device = device if device is not None else next(model.parameters()).device
    return torch.randn(B, model.seq_len, model.code_dim, generator=generator, device=device)


@torch.no_grad()
def dd_step(model, ids: Tensor | None, eps: Tensor, labels: Tensor, n_clean: int) -> Tensor:
    """One generator call from X_{n_clean+1} = (ids[:, :n_clean], eps[:, n_clean:]); the first n_clean
    tokens are kept as given, the rest are the argmax predictions."""
    B, n = eps.shape[:2]
    if ids is None:
        if n_clean:
            raise ValueError("n_clean > 0 needs ids")
        ids = torch.zeros(B, n, dtype=torch.long, device=eps.device)
    clean = clean_mask(torch.full((B,), n_clean, device=eps.device), n)
    pred = model(ids, eps, clean, labels).argmax(-1)
    return torch.where(clean, ids, pred)


def one_step(model, eps: Tensor, labels: Tensor) -> Tensor:
    return dd_step(model, None, eps, labels, 0)


def multi_step(model, eps: Tensor, labels: Tensor, keep: Sequence[int]) -> Tensor:
    """1 + len(keep) generator calls; after call j the first keep[j] tokens are frozen (increasing)."""
    if list(keep) != sorted(keep):
        raise ValueError(f"keep counts must increase: {keep}")
    ids = one_step(model, eps, labels)
    for s in keep:
        ids = dd_step(model, ids, eps, labels, s)
    return ids


def two_step(model, eps: Tensor, labels: Tensor, s: int | None = None) -> Tensor:
    return multi_step(model, eps, labels, [default_split(eps.shape[1]) if s is None else s])


@torch.no_grad()
def sample_window(teacher: ARTeacher, ids: Tensor, labels: Tensor, cfg: SamplingConfig, start: int, end: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """Teacher ancestral sampling of the positions of AR steps [start, end) given ``ids`` before them
    (KV cache; later positions are left untouched)."""
    ids = ids.clone()
    steps = teacher.ar_steps()
    run = TeacherRunner(teacher, labels, cfg)
    B = ids.shape[0]
    for k, (a, b) in enumerate(steps[:end]):
        x_prev = None if k == 0 else ids[:, steps[k - 1][0]:steps[k - 1][1]]
        if k < start:
            run.feed(x_prev)
            continue
        probs = run.log_probs(x_prev).exp().reshape(-1, teacher.vocab_size)
        ids[:, a:b] = torch.multinomial(probs, 1, generator=generator).reshape(B, b - a)
    return ids


def _step_of_position(teacher: ARTeacher, pos: int) -> int:
    for k, (a, _) in enumerate(teacher.ar_steps()):
        if a == pos:
            return k
    if pos == teacher.seq_len:
        return len(teacher.ar_steps())
    raise ValueError(f"position {pos} is not an AR-step boundary")


@torch.no_grad()
def teacher_involved(model, teacher: ARTeacher, eps: Tensor, labels: Tensor, cfg: SamplingConfig,
                     window: tuple[int, int], teacher_mode: str = "sample", generator: torch.Generator | None = None,
                     ode: ODEConfig | None = None) -> Tensor:
    """DD step -> teacher regenerates positions [a, b) -> DD step (module docstring). a, b: positions on
    AR-step boundaries."""
    a, b = window
    if not 0 <= a <= b <= eps.shape[1]:
        raise ValueError(f"bad window {window}")
    ka, kb = _step_of_position(teacher, a), _step_of_position(teacher, b)
    ids = one_step(model, eps, labels) if a > 0 else torch.zeros(eps.shape[:2], dtype=torch.long, device=eps.device)
    if teacher_mode == "sample":
        ids = sample_window(teacher, ids, labels, cfg, ka, kb, generator)
    elif teacher_mode == "map":
        ids = map_noise_to_tokens(teacher, eps, labels, cfg, ode, prefix=ids, start_step=ka, end_step=kb)
    else:
        raise ValueError(f"teacher_mode must be 'sample' or 'map', got {teacher_mode!r}")
    return dd_step(model, ids, eps, labels, b) if b < eps.shape[1] else ids


def dd1_sampler(model, tokenizer, mode: str = "1step", s: int | None = None, teacher: ARTeacher | None = None,
                cfg: SamplingConfig | None = None, window: tuple[int, int] | None = None, teacher_mode: str = "sample"):
    """A :class:`onestep.samplers.Sampler` for evaluation: mode "1step", "2step" or "teacher"."""
    from onestep.samplers import Sampler, num_params

    def sample(labels: Tensor, g: torch.Generator) -> Tensor:
        eps = draw_noise(model, labels.shape[0], g, labels.device)
        if mode == "1step":
            return one_step(model, eps, labels)
        if mode == "2step":
            return two_step(model, eps, labels, s)
        if mode == "teacher":
            return teacher_involved(model, teacher, eps, labels, cfg, window, teacher_mode, g)
        raise ValueError(f"unknown DD1 sampling mode {mode!r}")

    if mode == "teacher":
        a, b = window
        t_steps = _step_of_position(teacher, b) - _step_of_position(teacher, a)
        steps = int(a > 0) + t_steps + int(b < model.seq_len)  # DD calls + teacher AR steps
        params = num_params(model, teacher)
    else:
        steps, params = (1 if mode == "1step" else 2), num_params(model)
    info = {"mode": mode, "s": s if s is not None else default_split(model.seq_len), "window": window,
            "teacher_mode": teacher_mode}
    return Sampler(name=f"dd1-{mode}", steps=steps, sample=sample, tokenizer=tokenizer, params=params, info=info)
