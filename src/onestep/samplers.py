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
from tqdm.auto import tqdm

from onestep import rng
from onestep.checkpoint import memory_available
from onestep.data import to_uint8
from onestep.runs import tokenizer_image_shape
from onestep.teacher.load import load_teacher
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


def batch_bytes(sampler: Sampler, batch_size: int) -> int:
    """An estimate of the memory one batch of ``batch_size`` takes while it is decoded, low rather than high: two
    float32 activations per sample at the image's full resolution, as wide as the decoder's last layer reads (the
    widest input of a convolution that outputs the image's channels)."""
    c, h, w = tokenizer_image_shape(sampler.tokenizer)
    width = max([c, *(m.in_channels for m in sampler.tokenizer.modules()
                      if isinstance(m, torch.nn.Conv2d) and m.out_channels == c)])
    return batch_size * 2 * 4 * h * w * width


def check_batch_size(sampler: Sampler, batch_size: int, device) -> None:
    """ValueError (one line naming ``--batch-size``) when a batch's estimated memory (:func:`batch_bytes`) exceeds
    the memory available on ``device``."""
    if getattr(sampler, "tokenizer", None) is None:  # (a stand-in that decodes nothing)
        return
    device = torch.device(device)
    have = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else memory_available()
    need = batch_bytes(sampler, batch_size)
    if have is not None and need > have:
        raise ValueError(f"argument --batch-size: a batch of {batch_size} needs about {need / 2 ** 30:.3g} GiB of "
                         f"memory on {device}, more than the {have / 2 ** 30:.3g} GiB available; pass a smaller "
                         f"--batch-size")


@torch.no_grad()
def sample_batches(sampler: Sampler, labels: Tensor, seed: int, batch_size: int = 256, n: int | None = None,
                   progress: bool = True):
    """Yield (uint8 images (b, C, H, W), labels (b,), tokens) on the CPU, one batch at a time, for ``n`` samples
    (default ``len(labels)``): sample i has label ``labels[i % len(labels)]``, and batch b draws from
    ``rng.stream_seed(seed, b)``: noise that no training stream drew (DD1's pairs included), and that two evaluation
    seeds do not share. A batch whose estimated memory exceeds what is available is refused first
    (:func:`check_batch_size`)."""
    n = len(labels) if n is None else n
    check_batch_size(sampler, min(batch_size, n), labels.device)
    for b in tqdm(range((n + batch_size - 1) // batch_size), desc=f"sample {sampler.name}", disable=not progress,
                  dynamic_ncols=True):
        g = torch.Generator(device=labels.device).manual_seed(rng.stream_seed(seed, b))
        lab = labels[torch.arange(b * batch_size, min(n, (b + 1) * batch_size), device=labels.device) % len(labels)]
        out = sampler.sample(lab, g)
        yield sampler.decode(out), lab.cpu(), out.cpu()


def generate(sampler: Sampler, labels: Tensor, seed: int, batch_size: int = 256, progress: bool = True,
             keep_tokens: bool = True) -> dict:
    """Images (uint8) and tokens for ``labels``, in memory (:func:`sample_batches`; ``onestep sample`` streams its
    batches to disk instead)."""
    imgs, toks = [], []
    for images, _, tokens in sample_batches(sampler, labels, seed, batch_size, progress=progress):
        imgs.append(images)
        if keep_tokens:
            toks.append(tokens)
    return {"images": torch.cat(imgs), "labels": labels.cpu(), "tokens": torch.cat(toks) if keep_tokens else None}


def build_teacher_sampler(method: str, run_dir: str, device="cpu", args=None) -> Sampler:
    """The teacher of a teacher run: "teacher" (KV cache) or "teacher-nocache" (the registry's builder,
    :mod:`onestep.methods`)."""
    teacher, _, tokenizer = load_teacher(run_dir, device)
    cfg = sampling_config_from_args(args) if args is not None else SamplingConfig()
    s = teacher_sampler(teacher, tokenizer, cfg, use_cache=method == "teacher", name=method)
    s.info["num_classes"] = teacher.num_classes
    return s
