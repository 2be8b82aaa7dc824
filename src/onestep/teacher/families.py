"""The model families, in one registry: what differs between a LlamaGen-style raster teacher and a VAR-style
next-scale teacher.

A run records its family in ``config.json`` (``"family"``, "llamagen" when absent: runs written before the VAR family
existed). Every stage asks :func:`family_of` for the family of the run it reads and calls the family's builders, so a
new family is one :class:`Family` entry here, not a branch in every stage.

=========  ======================================  ===============================  ==========
family     tokenizer                               teacher                          DD2 stage 0
=========  ======================================  ===============================  ==========
llamagen   ``tokenizer.vq.VQModel``                ``teacher.llamagen.GPT``         needed
var        ``tokenizer.msvq.VQVAE`` (multi-scale)  ``teacher.var.VAR``              none
=========  ======================================  ===============================  ==========

DD2's stage 0 replaces a token-table input by an MLP on code vectors (method.md section 3); a VAR teacher reads code
vectors natively (through f_hat), so its family needs no stage 0. The generators distilled from a family's teacher
are their method's: DD1's generator of each family (``DD1Generator``, ``VARDD1Generator``) is
:data:`onestep.dd1.load.GENERATORS`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from onestep import checkpoint as ckpt
from onestep import rng
from onestep.teacher.llamagen import GPT, ModelArgs, continuous_copy, model_args
from onestep.teacher.var import VAR, VARArgs, var_args
from onestep.tokenizer.msvq import VQVAE, VQVAEConfig
from onestep.tokenizer.vq import VQConfig, VQModel

__all__ = ["Family", "FAMILIES", "family_of", "family_named"]


# ---- LlamaGen-style raster --------------------------------------------------------------------------------------
def _vq_from_config(model_cfg: dict) -> nn.Module:
    return VQModel(VQConfig(**model_cfg))


def _gpt_from_config(model_cfg: dict, tokenizer) -> nn.Module:
    return GPT(ModelArgs.from_dict(model_cfg), codebook=tokenizer.codebook_vectors().detach().cpu())


def _gpt_backbone(backbone_cfg: dict, teacher) -> nn.Module:
    return GPT(ModelArgs.from_dict(backbone_cfg), codebook=teacher.codebook().cpu())


def _new_gpt(preset: str, tokenizer, num_classes: int, class_dropout_prob: float, **overrides) -> nn.Module:
    h, w = tokenizer.grid
    args = model_args(preset, vocab_size=tokenizer.config.codebook_size, code_dim=tokenizer.config.code_dim,
                      grid_h=h, grid_w=w, num_classes=num_classes, class_dropout_prob=class_dropout_prob, **overrides)
    return GPT(args, codebook=tokenizer.codebook_vectors().detach())


def _noise_reader_llamagen(teacher) -> nn.Module:
    """A copy of the teacher that reads continuous inputs (MapKD's generator network): a token table becomes
    stage 0's MLP on C-dim inputs (``continuous_copy``), drawn so that N(0, I) inputs embed with the RMS of the
    teacher's token embeddings; a continuous-input teacher is copied as it is."""
    if teacher.args.input_embedding != "table":
        return copy.deepcopy(teacher)
    net = continuous_copy(teacher)
    with torch.no_grad():
        emb = teacher.tok_embeddings.weight.float()
        out = net.tok_mlp(rng.randn((4096, teacher.code_dim), torch.Generator().manual_seed(0), emb.device))
        net.tok_mlp[-1].weight.mul_(emb.pow(2).mean().sqrt() / out.pow(2).mean().sqrt().clamp_min(1e-8))
    return net


# ---- VAR-style next-scale -----------------------------------------------------------------------------------------
def _msvq_from_config(model_cfg: dict) -> nn.Module:
    return VQVAE(VQVAEConfig(**model_cfg))


def _var_from_config(model_cfg: dict, tokenizer) -> nn.Module:
    return VAR(VARArgs.from_dict(model_cfg), quantizer=tokenizer.quantize)


def _var_backbone(backbone_cfg: dict, teacher) -> nn.Module:
    backbone = VAR(VARArgs.from_dict(backbone_cfg))
    backbone.copy_quantizer(teacher)
    return backbone


def _new_var(preset: str, tokenizer, num_classes: int, class_dropout_prob: float, **overrides) -> nn.Module:
    c = tokenizer.config
    args = var_args(preset, vocab_size=c.codebook_size, code_dim=c.code_dim, patch_nums=c.patch_nums,
                    num_phi=c.num_phi, phi_index=c.phi_index, quant_resi=c.quant_resi, num_classes=num_classes,
                    class_dropout_prob=class_dropout_prob, **overrides)
    return VAR(args, quantizer=tokenizer.quantize)


def _noise_reader_var(teacher) -> nn.Module:
    return copy.deepcopy(teacher)  # VAR reads code vectors (through f_hat), so it reads noise as it is


@dataclass(frozen=True)
class Family:
    """One model family's builders."""

    name: str
    tokenizer: Callable[[dict], nn.Module]             # tokenizer config["model"] -> tokenizer (weights not loaded)
    teacher: Callable[[dict, nn.Module], nn.Module]    # (teacher config["model"], its tokenizer) -> teacher
    backbone: Callable[[dict, nn.Module], nn.Module]   # (DD2 backbone config, the loaded teacher) -> backbone
    new_teacher: Callable[..., nn.Module]              # (preset, tokenizer, num_classes, class_dropout_prob, **kw)
    needs_stage0: bool                                 # DD2 needs a continuous-input teacher made by `dd2 adapt`
    noise_reader: Callable[[nn.Module], nn.Module]     # teacher -> a copy reading continuous inputs (MapKD)


FAMILIES: dict[str, Family] = {
    "llamagen": Family("llamagen", _vq_from_config, _gpt_from_config, _gpt_backbone, _new_gpt, needs_stage0=True,
                       noise_reader=_noise_reader_llamagen),
    "var": Family("var", _msvq_from_config, _var_from_config, _var_backbone, _new_var, needs_stage0=False,
                  noise_reader=_noise_reader_var),
}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise ckpt.CheckpointError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: dict) -> Family:
    """The family a run's (or a model section's) config records; "llamagen" when it records none."""
    return family_named(config.get("family", "llamagen"))
