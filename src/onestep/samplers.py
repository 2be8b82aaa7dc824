"""One interface for every way of generating images: the teacher, DD1, DD2, and the baselines.

A :class:`Sampler` maps (labels, torch.Generator) to token ids and decodes them with the tokenizer, so
evaluation, the speed harness, ``onestep sample`` and the report treat all methods alike (same labels,
same seeds). Which sampler a run gives: the registry of :mod:`onestep.methods`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from onestep import rng
from onestep.teacher.sampling import SamplingConfig, sample_tokens


@dataclass
class Sampler:
    """``sample(labels, generator) -> ids (B, n)`` (or code vectors (B, n, C) when ``continuous``)."""

    name: str
    steps: int
    sample: Callable[[Tensor, torch.Generator], Tensor]
    tokenizer: torch.nn.Module
    params: int = 0
    info: dict = field(default_factory=dict)

    @torch.no_grad()
    def decode(self, out: Tensor) -> Tensor:
        """Token ids or code vectors -> uint8 images (B, C, H, W) on the CPU."""
        from onestep.data import to_uint8

        imgs = self.tokenizer.decode_codes(out) if out.is_floating_point() else self.tokenizer.decode_ids(out)
        return to_uint8(imgs.float().cpu())

    @torch.no_grad()
    def images(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """uint8 images (B, C, H, W) for ``labels``."""
        return self.decode(self.sample(labels, generator))


def num_params(*modules) -> int:
    seen, n = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def teacher_sampler(teacher, tokenizer, cfg: SamplingConfig, use_cache: bool = True, name: str = "teacher") -> Sampler:
    """Full AR sampling (n AR steps) with the KV cache (or without, for the speed comparison)."""
    return Sampler(name=name, steps=len(teacher.ar_steps()),
                   sample=lambda labels, g: sample_tokens(teacher, labels, cfg, g, use_cache=use_cache),
                   tokenizer=tokenizer, params=num_params(teacher),
                   info={"sampling": cfg.to_dict(), "kv_cache": use_cache, "num_classes": teacher.num_classes})


def sampling_config_from_args(args) -> SamplingConfig:
    return SamplingConfig(cfg_scale=args.cfg_scale, cfg_schedule=args.cfg_schedule,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def class_labels(n: int, num_classes: int, device="cpu") -> Tensor:
    """Balanced labels 0, 1, ..., C-1, 0, 1, ... (same for every method in a comparison)."""
    return (torch.arange(n) % num_classes).to(device)


@torch.no_grad()
def generate(sampler: Sampler, labels: Tensor, seed: int, batch_size: int = 256, progress: bool = True,
             keep_tokens: bool = True) -> dict:
    """Images (uint8) and tokens for ``labels`` in batches; batch b draws from ``rng.stream_seed(seed, b)``: noise
    that no training stream drew (DD1's pairs included), and that two evaluation seeds do not share."""
    from tqdm.auto import tqdm

    imgs, toks = [], []
    nb = (len(labels) + batch_size - 1) // batch_size
    for b in tqdm(range(nb), desc=f"sample {sampler.name}", disable=not progress, dynamic_ncols=True):
        g = torch.Generator(device=labels.device).manual_seed(rng.stream_seed(seed, b))
        lab = labels[b * batch_size:(b + 1) * batch_size]
        out = sampler.sample(lab, g)
        imgs.append(sampler.decode(out))
        if keep_tokens:
            toks.append(out.cpu())
    return {"images": torch.cat(imgs), "labels": labels.cpu(), "tokens": torch.cat(toks) if keep_tokens else None}


def build_teacher_sampler(method: str, run_dir: str, device="cpu", args=None) -> Sampler:
    """The teacher of a teacher run: "teacher" (KV cache) or "teacher-nocache" (the registry's builder,
    :mod:`onestep.methods`)."""
    from onestep.runs import load_teacher

    teacher, _, tokenizer = load_teacher(run_dir, device)
    cfg = sampling_config_from_args(args) if args is not None else SamplingConfig()
    s = teacher_sampler(teacher, tokenizer, cfg, use_cache=method == "teacher", name=method)
    s.info["num_classes"] = teacher.num_classes
    return s
