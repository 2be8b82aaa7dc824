"""Loading a tokenizer run and a teacher run back, each built as its family says (:mod:`onestep.teacher.families`).

    tokenizer run  ->  teacher run (config["tokenizer_dir"])

The stages above the teacher (DD1, DD2, MapKD, the importers, the samplers) load their teacher, and with it its
tokenizer, through :func:`load_teacher`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from onestep import checkpoint as ckpt
from onestep.runs import final_dir, resolve_ref
from onestep.teacher.families import family_of

__all__ = ["load_tokenizer", "load_teacher"]


def load_tokenizer(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(tokenizer, config) from a tokenizer run (or model) directory, in eval mode: a VQModel (LlamaGen family) or a
    multi-scale VQVAE (VAR family), as ``config["family"]`` says."""
    d = final_dir(run_dir)
    config = ckpt.read_config(d)
    if config.get("kind") != "tokenizer":
        raise ckpt.CheckpointError(f"{d} is a {config.get('kind')!r} run, not a tokenizer")
    # (VQModel.upgrade_state_dict renames keys saved before LlamaGen's names)
    model = ckpt.load_model(d, lambda: family_of(config).tokenizer(config["model"]), config)
    return model.to(device).eval(), config


def load_teacher(run_dir: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = True):
    """(teacher, config, tokenizer | None) from a teacher run directory: a GPT (``config["family"]`` "llamagen") or a
    VAR ("var"); the codebook (and VAR's phi convs) come from its tokenizer."""
    d = final_dir(run_dir)
    config = ckpt.read_config(d)
    if config.get("kind") != "teacher":
        raise ckpt.CheckpointError(f"{d} is a {config.get('kind')!r} run, not a teacher")
    tokenizer, _ = load_tokenizer(resolve_ref(config["tokenizer_dir"], d), device)
    model = ckpt.load_model(d, lambda: family_of(config).teacher(config["model"], tokenizer), config)
    return model.to(device).eval(), config, (tokenizer if with_tokenizer else None)
