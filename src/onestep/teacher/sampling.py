"""Teacher sampling: CFG, temperature, top-k, top-p, and KV-cache AR sampling for any :class:`ARTeacher`.

The same :class:`SamplingConfig` defines the teacher's distribution everywhere: when it samples, when
DD1 maps noise to tokens and when DD2 computes the teacher's closed-form score (method.md section 1:
"p after the teacher's CFG, temperature, top-k, top-p and renormalisation").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from onestep.teacher.base import ARTeacher


@dataclass(frozen=True)
class SamplingConfig:
    """How the teacher's logits become probabilities.

    cfg_scale: classifier-free guidance s, logits = uncond + s (cond - uncond) (LlamaGen); 1 = off.
    cfg_schedule: "constant", or "linear" (VAR: s_eff = 1 + (s - 1) * k / (K - 1) over AR steps k).
    temperature: logits / temperature.  top_k: keep the k largest (0 = all).  top_p: nucleus mass.
    """

    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {self.cfg_schedule!r}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    def scale_at(self, step_index: int, num_steps: int) -> float:
        """Guidance scale of AR step ``step_index`` out of ``num_steps``."""
        if self.cfg_schedule == "linear" and num_steps > 1:
            return 1.0 + (self.cfg_scale - 1.0) * step_index / (num_steps - 1)
        return self.cfg_scale

    def to_dict(self) -> dict:
        return asdict(self)


def apply_cfg(logits_cond: Tensor, logits_uncond: Tensor | None, scale: float | Tensor) -> Tensor:
    """logits = uncond + s (cond - uncond); ``scale`` may be a tensor broadcast over positions."""
    if logits_uncond is None:
        return logits_cond
    return logits_uncond + scale * (logits_cond - logits_uncond)


def truncate_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k, then top-p on the last dimension; removed codes get -inf (float32)."""
    logits = logits.float() / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Remove a code when the mass strictly before it already reaches top_p (the top code always stays).
        mass_before = probs.cumsum(-1) - probs
        remove_sorted = mass_before >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def process_logits(logits_cond: Tensor, logits_uncond: Tensor | None, cfg: SamplingConfig,
                   scale: float | Tensor | None = None) -> Tensor:
    """Normalised log-probabilities (float32, -inf on truncated codes) of the teacher's sampling rule."""
    s = cfg.cfg_scale if scale is None else scale
    logits = apply_cfg(logits_cond.float(), None if logits_uncond is None else logits_uncond.float(), s)
    return torch.log_softmax(truncate_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p), dim=-1)


def _null_labels(teacher: ARTeacher, labels: Tensor) -> Tensor:
    return torch.full_like(labels, teacher.num_classes)


def _cfg_scales(teacher: ARTeacher, cfg: SamplingConfig, device) -> Tensor:
    """(n, 1) guidance scale per position, following the schedule over AR steps."""
    steps = teacher.ar_steps()
    s = torch.empty(teacher.seq_len, 1, device=device)
    for k, (a, b) in enumerate(steps):
        s[a:b] = cfg.scale_at(k, len(steps))
    return s


def teacher_log_probs(teacher: ARTeacher, x: Tensor, labels: Tensor, cfg: SamplingConfig) -> Tensor:
    """Teacher-forcing log p_i(. | x_<i, label) for every position i, (B, n, V), with CFG and truncation.

    This is the p of method.md section 1 that DD1's map and DD2's teacher score use.
    """
    if not cfg.uses_cfg:
        return process_logits(teacher(x, labels), None, cfg)
    B = labels.shape[0]
    logits = teacher(torch.cat([x, x]), torch.cat([labels, _null_labels(teacher, labels)]))
    return process_logits(logits[:B], logits[B:], cfg, _cfg_scales(teacher, cfg, x.device))


class TeacherStepper:
    """The teacher's AR steps one at a time: KV cache, CFG batch doubling [cond; null], processed log p.

    The one stepping loop every sampler shares (teacher ancestral sampling, DD1's flow map, DD1's
    teacher-involved window, skip-n). ``log_probs(x_prev)`` runs AR step ``self.k`` (``x_prev``: ids of
    step k-1 for the B sequences, None at step 0) and returns log p (B, b - a, V) after CFG (scale of
    ``cfg.scale_at(k, K)``), temperature, top-k and top-p (method.md section 1). ``feed(x_prev)`` runs
    a step whose probabilities are not needed (a kept prefix): the teacher still has to see it.
    """

    def __init__(self, teacher: ARTeacher, labels: Tensor, cfg: SamplingConfig):
        self.teacher, self.cfg, self.B = teacher, cfg, labels.shape[0]
        self.steps = teacher.ar_steps()
        self.rep = 2 if cfg.uses_cfg else 1
        self.labels = torch.cat([labels, _null_labels(teacher, labels)]) if cfg.uses_cfg else labels
        self.cache = teacher.new_cache(self.B * self.rep, labels.device)
        self.k = 0

    def _h(self, x_prev: Tensor | None) -> Tensor:
        if x_prev is not None and self.rep > 1:
            x_prev = x_prev.repeat(self.rep, *([1] * (x_prev.dim() - 1)))
        h = self.teacher.step(self.cache, x_prev, self.labels, self.k)
        self.k += 1
        return h

    def feed(self, x_prev: Tensor | None) -> None:
        self._h(x_prev)

    def feed_prefix(self, ids: Tensor, end_step: int) -> None:
        """Feed AR steps [k, end_step) whose tokens ``ids`` (B, n) are known (:meth:`ARTeacher.prefill`: one
        pass for LlamaGen, step by step otherwise)."""
        if end_step <= self.k:
            return
        self.teacher.prefill(self.cache, ids.repeat(self.rep, 1) if self.rep > 1 else ids, self.labels, self.k,
                             end_step)
        self.k = end_step

    def log_probs(self, x_prev: Tensor | None) -> Tensor:
        k = self.k
        logits = self.teacher.head(self._h(x_prev))
        if self.cfg.uses_cfg:
            return process_logits(logits[:self.B], logits[self.B:], self.cfg, self.cfg.scale_at(k, len(self.steps)))
        return process_logits(logits, None, self.cfg)


def step_through(teacher: ARTeacher, ids: Tensor, labels: Tensor, cfg: SamplingConfig,
                 choose: Callable[[int, Tensor], Tensor], start_step: int = 0, end_step: int | None = None,
                 on_step: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Walk AR steps [0, end_step) in order with a :class:`TeacherStepper`, filling ``ids`` (B, n) IN PLACE.

    Steps before ``start_step`` keep their ids (fed to the teacher, probabilities not computed); at step
    k >= start_step, ``ids[:, a:b] = choose(k, log_p)`` with log_p (B, b - a, V); steps from
    ``end_step`` on are neither fed nor touched. ``on_step(k, ids)``, when given, runs after step k has
    filled its positions (``onestep serve`` decodes the partial grid; the callback must not modify ``ids``).
    Returns ``ids``.
    """
    steps = teacher.ar_steps()
    end_step = len(steps) if end_step is None else end_step
    if not 0 <= start_step <= end_step <= len(steps):
        raise ValueError(f"need 0 <= start_step <= end_step <= {len(steps)}, got {start_step}, {end_step}")
    run = TeacherStepper(teacher, labels, cfg)
    run.feed_prefix(ids, start_step)  # the kept prefix: one pass where the teacher supports it
    for k in range(start_step, end_step):
        a, b = steps[k]
        x_prev = None if k == 0 else ids[:, steps[k - 1][0]:steps[k - 1][1]]
        ids[:, a:b] = choose(k, run.log_probs(x_prev))
        if on_step is not None:
            on_step(k, ids)
    return ids


@torch.no_grad()
def sample_tokens(teacher: ARTeacher, labels: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
                  use_cache: bool = True, prefix: Tensor | None = None, start_step: int = 0,
                  end_step: int | None = None, on_step: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Ancestral AR sampling of token ids (B, n).

    ``use_cache=False`` recomputes the full teacher-forcing forward each step (the reference the KV
    cache is tested against). ``prefix`` (B, n) ids with ``start_step`` > 0 keeps the prefix's positions
    before AR step ``start_step`` and samples the rest; ``end_step`` stops before that AR step (later
    positions keep the prefix's ids, zeros without one). Used by skip-n and DD1's teacher-involved window.
    ``on_step(k, ids)`` runs after each sampled AR step k (the partial grid: positions of later steps keep
    the prefix's ids, zeros without one); it draws nothing, so the samples are the same with or without it.
    """
    device = labels.device
    B = labels.shape[0]
    n = teacher.seq_len
    steps = teacher.ar_steps()
    K = len(steps)
    end_step = K if end_step is None else end_step
    ids = torch.zeros(B, n, dtype=torch.long, device=device) if prefix is None else prefix.clone()

    def draw(k: int, logp: Tensor) -> Tensor:
        return torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=generator).reshape(B, -1)

    if use_cache:
        return step_through(teacher, ids, labels, cfg, draw, start_step, end_step, on_step)
    lab = torch.cat([labels, _null_labels(teacher, labels)]) if cfg.uses_cfg else labels
    rep = 2 if cfg.uses_cfg else 1
    for k, (a, b) in enumerate(steps[:end_step]):
        if k < start_step:
            continue
        logits = teacher.head(teacher.features(ids.repeat(rep, 1), lab)[:, a:b])
        logp = process_logits(logits[:B], logits[B:], cfg, cfg.scale_at(k, K)) if cfg.uses_cfg else \
            process_logits(logits, None, cfg)
        ids[:, a:b] = draw(k, logp)
        if on_step is not None:
            on_step(k, ids)
    return ids
