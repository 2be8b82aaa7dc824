"""Load a DD1 run: the generator, its run config, and the teacher and tokenizer it was distilled from."""
from __future__ import annotations

from pathlib import Path

import torch

from onestep import checkpoint as ckpt

__all__ = ["load_dd1"]


def load_dd1(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(DD1Generator in eval mode, config, teacher, tokenizer) from a DD1 training run."""
    from onestep.families import family_of
    from onestep.runs import final_dir, load_teacher, resolve_ref

    d = final_dir(run_dir)
    config = ckpt.read_config(d)
    if config.get("kind") != "dd1":
        raise ckpt.CheckpointError(f"{d} is a {config.get('kind')!r} run, not a DD1 run (kind 'dd1')")
    teacher, _, tokenizer = load_teacher(resolve_ref(config["teacher_dir"], d), device)
    codebook, generator = teacher.codebook().detach().cpu(), family_of(config["model"]).dd1_generator()
    model = ckpt.load_model(d, lambda: generator.from_config(config["model"], codebook), config)
    return model.to(device).eval(), config, teacher, tokenizer
