"""The two naive few-step baselines DD1 reports (method.md section 2.5): skip-n and onestep*.

skip-n ("drop the last n AR steps"): K - n teacher forward passes instead of K.
    1. The teacher samples AR steps 0 .. K-n-2 ancestrally with its KV cache (K - n - 1 passes).
    2. ONE more teacher-forcing pass produces the last n + 1 AR steps in parallel. Its inputs are the
       sampled prefix and, at the positions of AR steps K-n .. K-1 that have not been sampled yet,
       *filler* tokens; each of the n + 1 steps' tokens is then sampled independently from the
       teacher's conditional at its position (same SamplingConfig: CFG, temperature, top-k, top-p).
       The first of these steps (K-n-1) conditions only on the real prefix, so it is exact; the
       other n are conditioned on filler instead of on each other. Fillers (``fill``):
       - "marginal" (default): drawn independently from the per-position marginal token
         frequencies of teacher samples (the onestep* distribution; pass ``marginals``);
       - "last": every unsampled input repeats the last token of the sampled prefix.
    skip-0 is exactly the teacher's ancestral sampler (same generator -> same tokens as
    ``sample_tokens``); with K = 256 LlamaGen steps, skip-106 and skip-156 use 150 and 100 passes
    (DD1's step counts). For VAR, n counts scales.

onestep*: each token independently from its per-position marginal token frequency measured on
teacher samples (the best a model that predicts positions independently could do): 1 "step", no
network at sampling time. With the samples' class labels the marginals are per class (p(q_i | class),
the best independent-position model for a class-conditional benchmark); without them, unconditional.

:func:`baseline_samplers` builds the benchmark's rows: skip-n at ~60% and ~40% of the teacher's AR steps
(n = round(0.4 K) and round(0.6 K): skip-20 (29 steps) and skip-29 (20 steps) for K = 49, like DD1's
LlamaGen-skip-106 / -156 of 256), and onestep*.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from onestep.dd1.sampling import sample_window
from onestep.samplers import Sampler, num_params
from onestep.teacher.base import ARTeacher
from onestep.teacher.load import load_teacher
from onestep.teacher.sampling import SamplingConfig, teacher_log_probs

__all__ = ["skip_n", "estimate_marginals", "estimate_class_marginals", "sample_marginals", "sample_class_marginals",
           "skip_sampler", "onestep_star_sampler", "baseline_samplers", "SKIP_FRACTIONS", "skip_counts"]


def estimate_marginals(ids: Tensor, vocab_size: int, smoothing: float = 0.0) -> Tensor:
    """(N, n) token ids -> (n, V) float64 per-position frequencies (optionally add-``smoothing``)."""
    ids = ids.long().cpu()
    n = ids.shape[1]
    counts = torch.zeros(n, vocab_size, dtype=torch.float64)
    counts.scatter_add_(1, ids.t().contiguous(), torch.ones(ids.t().shape, dtype=torch.float64))
    counts += smoothing
    return counts / counts.sum(1, keepdim=True)


def estimate_class_marginals(ids: Tensor, labels: Tensor, vocab_size: int, num_classes: int,
                             smoothing: float = 0.0) -> Tensor:
    """(N, n) ids with (N,) labels -> (num_classes, n, V) per-class per-position frequencies. A class with
    no sample raises (its marginals are unknown)."""
    labels = labels.long().cpu()
    missing = [c for c in range(num_classes) if not (labels == c).any()]
    if missing:
        raise ValueError(f"no teacher samples of classes {missing}: cannot estimate their marginals")
    return torch.stack([estimate_marginals(ids[labels == c], vocab_size, smoothing) for c in range(num_classes)])


def sample_class_marginals(class_marginals: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B, n) ids, position i of sample b drawn from class_marginals[labels[b], i]."""
    B, (C, n, V) = labels.shape[0], class_marginals.shape
    out = torch.empty(B, n, dtype=torch.long, device=labels.device)
    for c in labels.unique().tolist():
        sel = (labels == c).nonzero().squeeze(1)
        out[sel] = sample_marginals(class_marginals[c], len(sel), generator, labels.device)
    return out


def sample_marginals(marginals: Tensor, B: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """(B, n) ids, each position independently from its row of ``marginals`` (n, V)."""
    probs = marginals.float().to(device if device is not None else marginals.device)
    return torch.multinomial(probs, B, replacement=True, generator=generator).t().contiguous()


@torch.no_grad()
def skip_n(teacher: ARTeacher, labels: Tensor, cfg: SamplingConfig, n_skip: int,
           generator: torch.Generator | None = None, fill: str = "marginal", marginals: Tensor | None = None) -> Tensor:
    """skip-n token ids (B, n) (module docstring): K - n_skip teacher passes."""
    steps = teacher.ar_steps()
    K = len(steps)
    if not 0 <= n_skip < K:
        raise ValueError(f"n_skip must be in [0, {K - 1}], got {n_skip}")
    B, device = labels.shape[0], labels.device
    ids = torch.zeros(B, teacher.seq_len, dtype=torch.long, device=device)
    if n_skip == 0:
        return sample_window(teacher, ids, labels, cfg, 0, K, generator)
    P = K - n_skip - 1  # AR steps sampled ancestrally
    ids = sample_window(teacher, ids, labels, cfg, 0, P, generator)
    first = steps[P][0]  # every position from here on is filled, then re-drawn in one parallel pass
    if fill == "marginal":
        if marginals is None:
            raise ValueError("fill='marginal' needs marginals (estimate_marginals of teacher samples)")
        filler = sample_marginals(marginals[first:], B, generator, device)
    elif fill == "last":
        if first == 0:
            raise ValueError("fill='last' needs a non-empty prefix")
        filler = ids[:, first - 1:first].expand(B, teacher.seq_len - first)
    else:
        raise ValueError(f"fill must be 'marginal' or 'last', got {fill!r}")
    ids[:, first:] = filler
    logp = teacher_log_probs(teacher, ids, labels, cfg)[:, first:]
    ids[:, first:] = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=generator).reshape(B, -1)
    return ids


def skip_sampler(teacher: ARTeacher, tokenizer, cfg: SamplingConfig, n_skip: int, fill: str = "marginal",
                 marginals: Tensor | None = None):
    return Sampler(name=f"skip-{n_skip}", steps=len(teacher.ar_steps()) - n_skip,
                   sample=lambda labels, g: skip_n(teacher, labels, cfg, n_skip, g, fill, marginals),
                   tokenizer=tokenizer, params=num_params(teacher),
                   info={"sampling": cfg.to_dict(), "n_skip": n_skip, "fill": fill})


def onestep_star_sampler(marginals: Tensor, tokenizer, class_marginals: Tensor | None = None):
    """onestep*: independent per-position draws from ``class_marginals`` (C, n, V) by label if given, else
    from the unconditional ``marginals`` (n, V)."""
    def sample(labels: Tensor, g: torch.Generator) -> Tensor:
        if class_marginals is not None:
            return sample_class_marginals(class_marginals.to(labels.device), labels, g)
        return sample_marginals(marginals, labels.shape[0], g, labels.device)

    return Sampler(name="onestep*", steps=1, sample=sample, tokenizer=tokenizer, params=0,
                   info={"marginals_shape": list(marginals.shape), "class_conditional": class_marginals is not None})


SKIP_FRACTIONS = (0.4, 0.6)  # skip-n drops these fractions of the AR steps (keeps ~60% and ~40%)


def skip_counts(ar_steps: int, fractions=SKIP_FRACTIONS) -> list[int]:
    """The n of the skip-n rows for a teacher of ``ar_steps`` AR steps: round(f K) for each fraction, each once,
    within [0, K - 1] (K = 49: 20 and 29)."""
    out = []
    for f in fractions:
        n = min(ar_steps - 1, max(0, int(round(f * ar_steps))))
        if n not in out:
            out.append(n)
    return out


def _token_samples(samples):
    """Tensor (N, n) | (ids, labels) | dict with "tokens" (and "labels") | path to an ``onestep sample`` .npz."""
    if isinstance(samples, (str, bytes)) or hasattr(samples, "__fspath__"):
        with np.load(samples) as z:
            samples = {k: torch.from_numpy(z[k]) for k in ("tokens", "labels") if k in z.files}
    if isinstance(samples, dict):
        return samples["tokens"], samples.get("labels")
    if isinstance(samples, (tuple, list)):
        return samples[0], samples[1]
    return samples, None


def baseline_samplers(teacher_dir, device="cpu", sampling_cfg: SamplingConfig | None = None, teacher_token_samples=None,
                      fractions: tuple[float, ...] = SKIP_FRACTIONS) -> dict:
    """The naive baselines DD1 reports (method.md 2.5): {"skip-N1", "skip-N2", "onestep*"} -> Sampler.

    ``teacher_token_samples``: the teacher's token samples under ``sampling_cfg`` (default CFG 2.0): a (N, n)
    tensor, (ids, labels), a dict {"tokens", "labels"} or an ``onestep sample`` .npz path. With labels,
    onestep* uses per-class marginals; skip-n's fillers use the unconditional ones.
    """
    if teacher_token_samples is None:
        raise ValueError("baseline_samplers needs teacher token samples (for the marginals of onestep* and skip-n)")
    teacher, _, tokenizer = load_teacher(teacher_dir, device)
    cfg = sampling_cfg or SamplingConfig(cfg_scale=2.0)
    ids, labels = _token_samples(teacher_token_samples)
    ids = torch.as_tensor(ids).long()
    if ids.dim() != 2 or ids.shape[1] != teacher.seq_len or ids.min() < 0 or ids.max() >= teacher.vocab_size:
        raise ValueError(f"teacher token samples must be (N, {teacher.seq_len}) ids in [0, {teacher.vocab_size}), "
                         f"got shape {tuple(ids.shape)}")
    marg = estimate_marginals(ids, teacher.vocab_size)
    cmarg = None if labels is None else estimate_class_marginals(ids, torch.as_tensor(labels), teacher.vocab_size,
                                                                 teacher.num_classes)
    out = {}
    for n_skip in skip_counts(len(teacher.ar_steps()), fractions):
        smp = skip_sampler(teacher, tokenizer, cfg, n_skip, "marginal", marg.to(device))
        out[smp.name] = smp
    out["onestep*"] = onestep_star_sampler(marg, tokenizer, cmarg)
    for smp in out.values():
        smp.info["num_classes"] = teacher.num_classes
        smp.info["n_teacher_samples"] = len(ids)
    return out
