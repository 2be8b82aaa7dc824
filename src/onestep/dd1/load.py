"""Each model family's DD1 generator, and loading a DD1 run: the generator, its run config, and the teacher and
tokenizer it was distilled from."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from onestep import checkpoint as ckpt
from onestep.dd1.model import DD1Generator
from onestep.dd1.var_model import VARDD1Generator
from onestep.runs import final_dir, resolve_ref
from onestep.teacher.families import family_of
from onestep.teacher.load import load_teacher

__all__ = ["GENERATORS", "generator_class", "new_generator", "load_dd1"]

# the DD1 generator of each model family (:mod:`onestep.teacher.families`): LlamaGen-DD and VAR-DD (method.md 2.3)
GENERATORS: dict[str, type[nn.Module]] = {"llamagen": DD1Generator, "var": VARDD1Generator}


def generator_class(config: dict) -> type[nn.Module]:
    """The DD1 generator class of the family a config records (its ``from_config`` rebuilds a run's generator)."""
    return GENERATORS[family_of(config).name]


def new_generator(teacher: nn.Module, teacher_config: dict, input_mode: str) -> nn.Module:
    """A DD1 generator of the teacher's family (``teacher_config``: its run config) that starts from its weights;
    ``input_mode`` is :attr:`DD1Config.input_mode` (VAR-DD's input is ``word_embed`` of vectors: it has none)."""
    cls = generator_class(teacher_config)
    if cls is VARDD1Generator:
        return cls.from_teacher(teacher)
    return cls.from_teacher(teacher, input_mode=input_mode)


def load_dd1(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(DD1Generator in eval mode, config, teacher, tokenizer) from a DD1 training run."""
    d = final_dir(run_dir)
    config = ckpt.read_config(d)
    if config.get("kind") != "dd1":
        raise ckpt.CheckpointError(f"{d} is a {config.get('kind')!r} run, not a DD1 run (kind 'dd1')")
    teacher, _, tokenizer = load_teacher(resolve_ref(config["teacher_dir"], d), device)
    codebook, generator = teacher.codebook().detach().cpu(), generator_class(config["model"])
    model = ckpt.load_model(d, lambda: generator.from_config(config["model"], codebook), config)
    return model.to(device).eval(), config, teacher, tokenizer
