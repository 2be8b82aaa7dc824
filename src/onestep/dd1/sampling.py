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

Released generators (``onestep import-dd1``) carry a continuous head; their own samplers take the argmax code of
the logits before a split position and the continuous head's token from it on (LlamaGen-DD: position 80, the
release's ``--split_t``), then decode the vectors. ``conti_from`` selects that rule (:func:`dd_step_vectors`); an
imported LlamaGen-DD run records it, and ``--conti-from`` overrides it.

``onestep sample --method dd1 --sampling-steps K`` (:func:`build_sampler`): K = 1 one step, K = 2 two steps, K >= 3
teacher-involved with K sequential network calls in total (1 DD call + K - 2 teacher AR steps starting
right after the 2-step split + 1 DD call; :func:`teacher_window`). :func:`dd1_samplers` gives the
benchmark's three DD1 rows; the skip-n and onestep* rows are :func:`onestep.dd1.baselines.baseline_samplers`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from onestep import rng
from onestep.dd1.load import load_dd1
from onestep.dd1.model import clean_mask
from onestep.flow_map import ODEConfig, map_noise_to_tokens
from onestep.multistep import refined
from onestep.samplers import Sampler, num_params, sampling_config_from_args
from onestep.teacher.base import ARTeacher, nearest_code
from onestep.teacher.sampling import SamplingConfig, sample_tokens

__all__ = ["default_split", "dd_step", "dd_step_vectors", "one_step", "two_step", "multi_step", "teacher_involved",
           "sample_window", "draw_noise", "dd1_sampler", "teacher_window", "build_sampler", "dd1_samplers"]


def default_split(n: int, ar_steps: Sequence[tuple[int, int]] | None = None) -> int:
    """s = round(n * 80 / 256): the number of 1-step tokens 2-step sampling keeps (LlamaGen: 80); with multi-token
    AR steps (VAR's scales) the step boundary nearest to it (a trajectory point keeps whole steps)."""
    s = int(round(n * 80 / 256))
    bounds = [a for a, _ in (ar_steps or [])[1:]]
    return min(bounds, key=lambda a: (abs(a - s), a)) if bounds else s


def draw_noise(model, B: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """eps ~ N(0, I) of shape (B, n, C)."""
    device = device if device is not None else next(model.parameters()).device
    return rng.randn((B, model.seq_len, model.code_dim), generator, device)


def _trajectory_point(ids: Tensor | None, eps: Tensor, n_clean: int) -> tuple[Tensor, Tensor]:
    """(ids, clean mask) of X_{n_clean+1}: the first n_clean positions clean (ids may be None only when n_clean = 0)."""
    B, n = eps.shape[:2]
    if ids is None:
        if n_clean:
            raise ValueError("n_clean > 0 needs ids")
        ids = torch.zeros(B, n, dtype=torch.long, device=eps.device)
    return ids, clean_mask(torch.full((B,), n_clean, device=eps.device), n)


@torch.no_grad()
def dd_step(model, ids: Tensor | None, eps: Tensor, labels: Tensor, n_clean: int) -> Tensor:
    """One generator call from X_{n_clean+1} = (ids[:, :n_clean], eps[:, n_clean:]); the first n_clean
    tokens are kept as given, the rest are the argmax predictions."""
    ids, clean = _trajectory_point(ids, eps, n_clean)
    pred = model(ids, eps, clean, labels).argmax(-1)
    return torch.where(clean, ids, pred)


@torch.no_grad()
def dd_step_vectors(model, ids: Tensor | None, eps: Tensor, labels: Tensor, n_clean: int, conti_from: int) -> Tensor:
    """One generator call with the released generators' output rule (LlamaGen-DD ``get_final_x_BLC``, VAR-DD
    ``get_final_sequence``): code vectors (B, n, C), the argmax code of the logits before position ``conti_from``
    and the continuous head's token from it on; the first n_clean positions are kept as given (their codes)."""
    n = eps.shape[1]
    if not getattr(model, "conti_head", False):
        raise ValueError("conti_from needs a generator with the released continuous head (conti_head=True, e.g. "
                         "one written by `onestep import-dd1`)")
    if not 0 <= conti_from <= n:
        raise ValueError(f"conti_from must lie in [0, {n}], got {conti_from}")
    ids, clean = _trajectory_point(ids, eps, n_clean)
    logits, conti = model.predict(ids, eps, clean, labels)
    codes = model.codebook()[torch.where(clean, ids, logits.argmax(-1))].to(conti.dtype)
    use_conti = (torch.arange(n, device=eps.device) >= conti_from)[None, :, None] & ~clean[..., None]
    return torch.where(use_conti, conti, codes)


def _step(model, ids, eps, labels, n_clean: int, conti_from: int | None, final: bool):
    """A DD step: ids, or (final step with ``conti_from``) the released rule's code vectors. A non-final step's
    continuous tokens are snapped to their nearest codes, which is what the next step keeps."""
    if conti_from is None:
        return dd_step(model, ids, eps, labels, n_clean)
    x = dd_step_vectors(model, ids, eps, labels, n_clean, conti_from)
    return x if final else nearest_code(x, model.codebook())


def one_step(model, eps: Tensor, labels: Tensor, conti_from: int | None = None) -> Tensor:
    """ids (B, n); with ``conti_from``: code vectors (B, n, C) by the released rule (:func:`dd_step_vectors`)."""
    return _step(model, None, eps, labels, 0, conti_from, True)


def multi_step(model, eps: Tensor, labels: Tensor, keep: Sequence[int], conti_from: int | None = None) -> Tensor:
    """1 + len(keep) generator calls; after call j the first keep[j] tokens are frozen (increasing). With
    ``conti_from`` the last call returns code vectors by the released rule; kept tokens are always codes."""
    if list(keep) != sorted(keep):
        raise ValueError(f"keep counts must increase: {keep}")
    out = _step(model, None, eps, labels, 0, conti_from, not keep)
    for j, s in enumerate(keep):
        out = _step(model, out, eps, labels, s, conti_from, j == len(keep) - 1)
    return out


def two_step(model, eps: Tensor, labels: Tensor, s: int | None = None, conti_from: int | None = None) -> Tensor:
    return multi_step(model, eps, labels, [default_split(eps.shape[1], model.ar_steps()) if s is None else s],
                      conti_from)


def sample_window(teacher: ARTeacher, ids: Tensor, labels: Tensor, cfg: SamplingConfig, start: int, end: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """Teacher ancestral sampling of the positions of AR steps [start, end) given ``ids`` before them
    (KV cache; later positions are left untouched): :func:`onestep.teacher.sampling.sample_tokens`."""
    return sample_tokens(teacher, labels, cfg, generator, prefix=ids, start_step=start, end_step=end)


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
                     ode: ODEConfig | None = None, conti_from: int | None = None) -> Tensor:
    """DD step -> teacher regenerates positions [a, b) -> DD step (module docstring). a, b: positions on
    AR-step boundaries. With ``conti_from`` the generator's steps follow the released rule (kept tokens: the
    nearest codes; the last DD step returns code vectors)."""
    a, b = window
    if not 0 <= a <= b <= eps.shape[1]:
        raise ValueError(f"bad window {window}")
    ka, kb = _step_of_position(teacher, a), _step_of_position(teacher, b)
    ids = (_step(model, None, eps, labels, 0, conti_from, False) if a > 0
           else torch.zeros(eps.shape[:2], dtype=torch.long, device=eps.device))
    if teacher_mode == "sample":
        ids = sample_window(teacher, ids, labels, cfg, ka, kb, generator)
    elif teacher_mode == "map":
        ids = map_noise_to_tokens(teacher, eps, labels, cfg, ode, prefix=ids, start_step=ka, end_step=kb)
    else:
        raise ValueError(f"teacher_mode must be 'sample' or 'map', got {teacher_mode!r}")
    return _step(model, ids, eps, labels, b, conti_from, True) if b < eps.shape[1] else ids


def dd1_sampler(model, tokenizer, mode: str = "1step", s: int | None = None, teacher: ARTeacher | None = None,
                cfg: SamplingConfig | None = None, window: tuple[int, int] | None = None, teacher_mode: str = "sample",
                ode: ODEConfig | None = None, conti_from: int | None = None):
    """A :class:`onestep.samplers.Sampler` for evaluation: mode "1step", "2step" or "teacher" (teacher-involved,
    named "dd1-teacher-involved"). ``steps`` counts sequential network calls: generator calls plus the
    teacher's AR steps. ``params`` counts the networks used (generator, plus the teacher when involved).
    ``conti_from``: the released generators' output rule (:func:`dd_step_vectors`; None: argmax ids everywhere)."""
    if mode not in ("1step", "2step", "teacher"):
        raise ValueError(f"unknown DD1 sampling mode {mode!r}; choose 1step, 2step or teacher")
    if mode == "teacher" and (teacher is None or cfg is None or window is None):
        raise ValueError("teacher-involved sampling needs the teacher, its SamplingConfig and a window")

    def sample(labels: Tensor, g: torch.Generator) -> Tensor:
        eps = draw_noise(model, labels.shape[0], g, labels.device)
        if mode == "1step":
            return one_step(model, eps, labels, conti_from)
        if mode == "2step":
            return two_step(model, eps, labels, s, conti_from)
        return teacher_involved(model, teacher, eps, labels, cfg, window, teacher_mode, g, ode, conti_from)

    if conti_from is not None and not getattr(model, "conti_head", False):
        raise ValueError("conti_from needs a generator with the released continuous head (conti_head=True, e.g. one "
                         "written by `onestep import-dd1`)")

    if mode == "teacher":
        a, b = window
        t_steps = _step_of_position(teacher, b) - _step_of_position(teacher, a)
        steps = int(a > 0) + t_steps + int(b < model.seq_len)  # DD calls + teacher AR steps
        params = num_params(model, teacher)
    else:
        steps, params = (1 if mode == "1step" else 2), num_params(model)
    info = {"mode": mode, "s": s if s is not None else default_split(model.seq_len, model.ar_steps()), "window": window,
            "teacher_mode": teacher_mode, "num_classes": model.num_classes, "conti_from": conti_from}
    if cfg is not None:
        info["sampling"] = cfg.to_dict()
    name = "dd1-teacher-involved" if mode == "teacher" else f"dd1-{mode}"
    return Sampler(name=name, steps=steps, sample=sample, tokenizer=tokenizer, params=params, info=info)


# ---- building samplers from a DD1 run (``onestep sample --method dd1``, the benchmark) -------------------------
TEACHER_INVOLVED_STEPS = 12  # default total for dd1_samplers: 1 DD step + 10 teacher AR steps + 1 DD step (n = 49)


def teacher_window(teacher: ARTeacher, total_steps: int) -> tuple[int, int]:
    """The teacher's window (a, b) (positions) for teacher-involved sampling with ``total_steps`` sequential
    network calls: DD step, keep the first a tokens, the teacher samples AR steps [a, b) (total_steps - 2
    of them), one DD step finishes from X_{b+1}. The window starts right after the 2-step split
    s = round(n * 80 / 256) (the tokens 2-step sampling keeps), moved earlier if it would not fit before
    the last position; both DD steps are always made, so the total is exactly ``total_steps``.
    Valid totals: 3 .. K (the teacher's number of AR steps)."""
    steps = teacher.ar_steps()
    K = len(steps)
    w = total_steps - 2
    if not 1 <= w <= K - 2:
        raise ValueError(f"teacher-involved DD1 sampling takes 3..{K} steps (1 DD step + teacher window + 1 DD step), "
                         f"got {total_steps}")
    s = default_split(teacher.seq_len, steps)
    ks = max([k for k, (a, _) in enumerate(steps) if a <= s] or [1])  # the AR step starting at or before s
    ka = max(1, min(ks, K - 1 - w))
    kb = ka + w
    return steps[ka][0], steps[kb][0]


def _sampling_of_run(config: dict, sampling_cfg: SamplingConfig | None, what: str) -> SamplingConfig:
    run_cfg = SamplingConfig(**config["sampling"])
    if sampling_cfg is not None and sampling_cfg != run_cfg:
        raise ValueError(f"{what}: this DD1 run distils the teacher under the sampling rule {run_cfg.to_dict()}, "
                         f"not {sampling_cfg.to_dict()}; pass the same rule (or none)")
    return run_cfg


def conti_from_of(config: dict, override: int | None = None) -> int | None:
    """The output rule of a DD1 run: ``override`` (``--conti-from``; negative = argmax ids everywhere), else the
    run's recorded ``conti_from`` (written by ``onestep import-dd1``), else None (argmax ids: trained runs)."""
    if override is not None:
        return None if override < 0 else int(override)
    return config.get("conti_from")


def build_sampler(method: str, run_dir, device="cpu", args=None):
    """``onestep sample --method dd1 --run RUN --sampling-steps K`` (its builder in :mod:`onestep.methods`).

    ``multistep`` (``--multistep``) "dd1" (the default, DD1's own rule): K = 1: one step; K = 2: two steps (keep
    s = round(n * 80 / 256) tokens, same noise); K >= 3: teacher-involved with K sequential calls
    (:func:`teacher_window`; the teacher samples ancestrally under the run's sampling rule). "alg4" or "jacobi": the
    one-step sample refined by the shared multi-step sampler of that name (:mod:`onestep.multistep`). ``args`` may be
    None (one step). The teacher's sampling flags in ``args`` matter only for K >= 2 under the teacher's rules, and
    must then equal the rule the run was distilled with.
    """
    if method != "dd1":
        raise ValueError(f"the DD1 builder makes 'dd1' samplers, not {method!r}")
    steps = getattr(args, "steps", None)
    steps = 1 if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    model, config, teacher, tokenizer = load_dd1(run_dir, device)
    conti_from = conti_from_of(config, getattr(args, "conti_from", None))
    rule = getattr(args, "multistep", None) or "dd1"
    if rule != "dd1" and steps > 1:
        smp = dd1_refined(model, teacher, tokenizer, config, steps, rule, conti_from,
                          args_rule=sampling_config_from_args(args) if args is not None else None)
    elif steps <= 2:
        smp = dd1_sampler(model, tokenizer, "1step" if steps == 1 else "2step", conti_from=conti_from)
    else:
        cfg = _sampling_of_run(config, sampling_config_from_args(args) if args is not None else None, "dd1 sampling")
        smp = dd1_sampler(model, tokenizer, "teacher", teacher=teacher, cfg=cfg, window=teacher_window(teacher, steps),
                          ode=ODEConfig(**config["ode"]), conti_from=conti_from)
    smp.info["num_classes"] = teacher.num_classes
    smp.info["run"] = str(run_dir)
    return smp


def dd1_refined(model, teacher, tokenizer, config: dict, steps: int, rule: str, conti_from: int | None = None,
                args_rule: SamplingConfig | None = None):
    """DD1's one step refined by the shared multi-step sampler ``rule`` ("alg4" or "jacobi", :mod:`onestep.multistep`)
    under the run's sampling rule: ``steps`` sequential calls in all."""
    cfg = _sampling_of_run(config, args_rule, "dd1 sampling")

    def first(labels: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        eps = draw_noise(model, labels.shape[0], g, labels.device)
        return one_step(model, eps, labels, conti_from), eps

    return Sampler(name=f"dd1-{rule}-{steps}step", steps=steps, params=num_params(model, teacher), tokenizer=tokenizer,
                   sample=refined(first, teacher, cfg, steps, rule),
                   info={"mode": rule, "multistep": rule, "num_classes": teacher.num_classes, "sampling": cfg.to_dict(),
                         "conti_from": conti_from})


def dd1_samplers(run_dir, device="cpu", sampling_cfg: SamplingConfig | None = None,
                 teacher_steps: int = TEACHER_INVOLVED_STEPS) -> dict:
    """The benchmark's DD1 rows: {"dd1-1step", "dd1-2step", "dd1-teacher-involved"} -> Sampler.

    ``steps``: 1, 2 and ``teacher_steps`` (1 DD call + teacher_steps - 2 teacher AR steps + 1 DD call).
    ``sampling_cfg`` (None: the run's) must equal the rule the run was distilled with.
    """
    model, config, teacher, tokenizer = load_dd1(run_dir, device)
    cfg = _sampling_of_run(config, sampling_cfg, "dd1_samplers")
    cf = conti_from_of(config)
    out = {"dd1-1step": dd1_sampler(model, tokenizer, "1step", cfg=cfg, conti_from=cf),
           "dd1-2step": dd1_sampler(model, tokenizer, "2step", cfg=cfg, conti_from=cf),
           "dd1-teacher-involved": dd1_sampler(model, tokenizer, "teacher", teacher=teacher, cfg=cfg,
                                               window=teacher_window(teacher, teacher_steps),
                                               ode=ODEConfig(**config["ode"]), conti_from=cf)}
    for smp in out.values():
        smp.info["num_classes"] = teacher.num_classes
    return out
