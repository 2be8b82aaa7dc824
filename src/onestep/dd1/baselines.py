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
network at sampling time.
"""
from __future__ import annotations

import torch
from torch import Tensor

from onestep.dd1.sampling import sample_window
from onestep.teacher.base import ARTeacher
from onestep.teacher.sampling import SamplingConfig, teacher_log_probs

__all__ = ["skip_n", "estimate_marginals", "sample_marginals", "skip_sampler", "onestep_star_sampler"]


def estimate_marginals(ids: Tensor, vocab_size: int, smoothing: float = 0.0) -> Tensor:
    """(N, n) token ids -> (n, V) float64 per-position frequencies (optionally add-``smoothing``)."""
    ids = ids.long().cpu()
    n = ids.shape[1]
    counts = torch.zeros(n, vocab_size, dtype=torch.float64)
    counts.scatter_add_(1, ids.t().contiguous(), torch.ones(ids.t().shape, dtype=torch.float64))
    counts += smoothing
    return counts / counts.sum(1, keepdim=True)


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
    first, fill_from = steps[P][0], steps[P + 1][0]
    if fill == "marginal":
        if marginals is None:
            raise ValueError("fill='marginal' needs marginals (estimate_marginals of teacher samples)")
        filler = sample_marginals(marginals[fill_from:], B, generator, device)
    elif fill == "last":
        if first == 0:
            raise ValueError("fill='last' needs a non-empty prefix")
        filler = ids[:, first - 1:first].expand(B, teacher.seq_len - fill_from)
    else:
        raise ValueError(f"fill must be 'marginal' or 'last', got {fill!r}")
    ids[:, fill_from:] = filler
    logp = teacher_log_probs(teacher, ids, labels, cfg)[:, first:]
    ids[:, first:] = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=generator).reshape(B, -1)
    return ids


def skip_sampler(teacher: ARTeacher, tokenizer, cfg: SamplingConfig, n_skip: int, fill: str = "marginal",
                 marginals: Tensor | None = None):
    from onestep.samplers import Sampler, num_params

    return Sampler(name=f"skip-{n_skip}", steps=len(teacher.ar_steps()) - n_skip,
                   sample=lambda labels, g: skip_n(teacher, labels, cfg, n_skip, g, fill, marginals),
                   tokenizer=tokenizer, params=num_params(teacher),
                   info={"sampling": cfg.to_dict(), "n_skip": n_skip, "fill": fill})


def onestep_star_sampler(marginals: Tensor, tokenizer):
    from onestep.samplers import Sampler

    return Sampler(name="onestep*", steps=1, sample=lambda labels, g: sample_marginals(marginals, labels.shape[0], g, labels.device),
                   tokenizer=tokenizer, params=0, info={"marginals_shape": list(marginals.shape)})
