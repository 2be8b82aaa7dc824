"""Import published LlamaGen and VAR weights, and the released DD1 generators, as onestep run directories
(``onestep import-llamagen``, ``onestep import-var``, ``onestep import-dd1``).

``c2i_{B,L,XL,XXL}_{256,384}.pt`` (the GPT's state_dict, under ``'model'``, or bare for the FSDP-consolidated XXL)
and ``vq_ds16_c2i.pt`` (the VQ-16 tokenizer's, under ``'model'``) become run directories the same way (family
"llamagen"). Upstream's GPT loaders are not strict and its sampler mentions a stray ``freqs_cis`` entry: that one
key (the rotary table, a derived attribute that is not saved) is dropped if present; everything else is strict.

``var_dNN.pth`` (a bare VAR state_dict) and ``vae_ch160v4096z32.pth`` (a bare VQVAE state_dict) become

    OUT/tokenizer/final/{model.safetensors, config.json}   (kind "tokenizer", family "var")
    OUT/teacher/final/{model.safetensors, config.json}     (kind "teacher", family "var", tokenizer_dir ../tokenizer)

so every later command takes them like trained runs (``onestep sample --run OUT/teacher``, ``onestep dd2 tune
--teacher OUT/teacher``, ``onestep dd1 pairs --teacher OUT/teacher``). Both loads are strict: a file of another
shape fails with every missing, unexpected and mismatched key listed. The one tolerance is VAR's own: the
VQVAE's training statistic ``quantize.ema_vocab_hit_SV`` may have another number of rows (upstream's loader
replaces it the same way). Nothing is downloaded: the files must be on disk.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from onestep import checkpoint as ckpt
from onestep.dd1.model import DD1Generator
from onestep.dd1.var_model import VARDD1Generator
from onestep.flow_map import ODEConfig
from onestep.runs import ref_to
from onestep.teacher.llamagen import GPT, GPT_PRESETS, model_args
from onestep.teacher.load import load_teacher
from onestep.teacher.sampling import SamplingConfig
from onestep.teacher.var import VAR, VAR_PRESETS, var_args
from onestep.tokenizer.msvq import VQVAE, vqvae_config
from onestep.tokenizer.vq import VQModel, vq_config


def read_state_dict(path: str | Path, nested: tuple[str, ...] = (), wrapper: str | tuple[str, ...] | None = None
                    ) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.pth`` / ``.pt`` / ``.safetensors`` file (tensors only, no code is unpickled),
    optionally under the keys ``nested`` (e.g. ``("trainer", "ema_parameters")``), or under the first key of
    ``wrapper`` that the file's top level has (LlamaGen's ``'model'``; a bare state_dict is read as it is)."""
    path = Path(path)
    if not path.exists():
        raise ckpt.CheckpointError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        sd = ckpt.load_tensors(path)
    else:
        try:  # LlamaGen's training checkpoints also pickle their argparse.Namespace of arguments under 'args'
            with torch.serialization.safe_globals([argparse.Namespace]):
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ckpt.CheckpointError(f"cannot read {path} as a weights-only torch file: {e}") from None
    for w in ((wrapper,) if isinstance(wrapper, str) else wrapper or ()):  # the first wrapper key present
        if isinstance(sd, dict) and isinstance(sd.get(w), dict):
            sd = sd[w]
            break
    for k in nested:
        if not isinstance(sd, dict) or k not in sd:
            raise ckpt.CheckpointError(f"{path}: no key {k!r} on the path {'/'.join(nested)}")
        sd = sd[k]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ckpt.CheckpointError(f"{path} does not hold a flat state_dict of tensors")
    return sd


def var_depth(sd: dict[str, torch.Tensor]) -> int:
    """The number of transformer blocks of a VAR state_dict."""
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not idx:
        raise ckpt.CheckpointError("not a VAR state_dict: no blocks.N.* keys")
    return max(idx) + 1


def write_runs(out: str | Path, family: str, source: dict, tokenizer: tuple, teacher: tuple) -> tuple[Path, Path]:
    """OUT/tokenizer/final and OUT/teacher/final of imported weights (``tokenizer`` / ``teacher``: (module, model
    config dict, preset name)); the teacher refers to the tokenizer by a relative path. Returns the two final dirs."""
    out = Path(out)
    tok_dir, teacher_dir = out / "tokenizer" / "final", out / "teacher" / "final"
    common = {"family": family, "data": None, "imported_from": source}
    ckpt.save_model(tok_dir, tokenizer[0], {"kind": "tokenizer", "model": tokenizer[1], "preset": tokenizer[2], **common})
    ckpt.save_model(teacher_dir, teacher[0], {"kind": "teacher", "model": teacher[1], "preset": teacher[2],
                                              "tokenizer_dir": ref_to(tok_dir.parent, teacher_dir.parent), **common})
    return tok_dir, teacher_dir


def import_var(var_path: str | Path, vae_path: str | Path, out: str | Path, var_preset: str | None = None,
               vae_preset: str = "vae-ch160", num_classes: int | None = None) -> tuple[Path, Path]:
    """Write the tokenizer and teacher run directories of published VAR weights; returns their ``final/`` dirs.

    ``var_preset`` defaults to ``VAR-d{depth}`` with the depth read from the file; ``num_classes`` defaults to the
    class embedding's rows minus the null row."""
    vae_sd = read_state_dict(vae_path)
    vae = VQVAE(vqvae_config(vae_preset))
    key = "quantize.ema_vocab_hit_SV"
    own = vae.state_dict()[key]
    if key in vae_sd and vae_sd[key].shape != own.shape and vae_sd[key].shape[1:] == own.shape[1:]:
        vae_sd = {**vae_sd, key: own.clone()}  # per-scale training statistics of another scale count
    ckpt.load_state_dict_strict(vae, vae_sd, source=str(vae_path))
    var_sd = read_state_dict(var_path)
    preset = var_preset or f"VAR-d{var_depth(var_sd)}"
    if preset not in VAR_PRESETS:
        raise ValueError(f"no VAR preset {preset!r} (depth {var_depth(var_sd)}); pass --var-preset")
    if num_classes is not None:
        classes = num_classes
    elif "class_emb.weight" in var_sd:
        classes = var_sd["class_emb.weight"].shape[0] - 1
    else:
        classes = VAR_PRESETS[preset].num_classes
    c = vae.config
    args = var_args(preset, vocab_size=c.codebook_size, code_dim=c.code_dim, patch_nums=c.patch_nums, num_phi=c.num_phi,
                    phi_index=c.phi_index, quant_resi=c.quant_resi, num_classes=classes)
    teacher = VAR(args, quantizer=vae.quantize)
    ckpt.load_state_dict_strict(teacher, var_sd, source=str(var_path))
    return write_runs(out, "var", {"var": str(var_path), "vae": str(vae_path)}, (vae, c.to_dict(), vae_preset),
                      (teacher, args.to_dict(), preset))


def llamagen_preset(sd: dict[str, torch.Tensor]) -> str:
    """The GPT preset of a LlamaGen c2i state_dict, from its width and depth."""
    if "tok_embeddings.weight" not in sd:
        raise ckpt.CheckpointError("not a LlamaGen GPT state_dict: no tok_embeddings.weight")
    dim = sd["tok_embeddings.weight"].shape[1]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))), default=-1)
    for name in ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL"):
        if (GPT_PRESETS[name].dim, GPT_PRESETS[name].n_layer) == (dim, depth):
            return name
    raise ckpt.CheckpointError(f"no official GPT preset has dim {dim} and {depth} layers; pass --gpt-preset")


def import_llamagen(gpt_path: str | Path, vq_path: str | Path, out: str | Path, gpt_preset: str | None = None,
                    image_size: int = 256, vq_preset: str = "vq-16", num_classes: int | None = None
                    ) -> tuple[Path, Path]:
    """Write the tokenizer and teacher run directories of published LlamaGen weights; returns their ``final/`` dirs.

    ``image_size`` (256 or 384 for the published models) sets the token grid, image_size / 16 per side: the
    GPT's weights do not depend on it (its 2-D rotary table is derived). ``gpt_preset`` defaults to the official
    size whose width and depth the file has; ``num_classes`` to the class table's rows minus the null row."""
    vq = VQModel(vq_config(vq_preset, image_size=image_size))
    ckpt.load_state_dict_strict(vq, read_state_dict(vq_path, wrapper="model"), source=str(vq_path))
    gpt_sd = read_state_dict(gpt_path, wrapper=("model", "module", "state_dict"))  # upstream's order (DDP, DeepSpeed)
    gpt_sd = {k: v for k, v in gpt_sd.items() if k != "freqs_cis"}  # upstream's derived rotary table, if saved
    preset = gpt_preset or llamagen_preset(gpt_sd)
    h, w = vq.grid
    classes = num_classes if num_classes is not None else (
        gpt_sd["cls_embedding.embedding_table.weight"].shape[0] - 1 if "cls_embedding.embedding_table.weight" in gpt_sd
        else None)
    overrides = {} if classes is None else {"num_classes": classes}
    args = model_args(preset, vocab_size=vq.vocab_size, code_dim=vq.code_dim, grid_h=h, grid_w=w, **overrides)
    teacher = GPT(args, codebook=vq.codebook_vectors().detach())
    ckpt.load_state_dict_strict(teacher, gpt_sd, source=str(gpt_path))
    return write_runs(out, "llamagen", {"gpt": str(gpt_path), "vq": str(vq_path)},
                      (vq, vq.config.to_dict(), vq_preset), (teacher, args.to_dict(), preset))


LLAMAGEN_DD_CONTI_FROM = 80  # the release's sampling default (--split_t 80): argmax codes before, continuous head after


def import_dd1(dd1_path: str | Path, teacher_run: str | Path, out: str | Path, sampling=None,
               conti_from: int | None = None) -> Path:
    """Write a DD1 run directory (``OUT/final``, kind "dd1") of a released DD1 generator for an imported (or trained)
    teacher run; returns ``OUT/final``.

    LlamaGen-DD (``llamagen-{B,L}.pt``): the weights under ``'ema'`` (what the release's README samples with), else
    ``'model'`` / ``'module'`` / ``'state_dict'`` or bare; the generator is ``DD1Generator(input_mode="linear",
    conti_head=True)``. VAR-DD (``VAR-DD/var-dNN.pth``): under ``['trainer']['ema_parameters']``; the
    generator is ``VARDD1Generator(conti_head=True)``. The release's loaders are not strict and its EMA dicts may lack
    the buffers: VAR-DD's structural buffers ``lvl_1L`` / ``attn_bias_for_masking`` are taken from the model when
    absent (they are fixed by the scales); every other key must be there with its shape. ``sampling`` (a
    SamplingConfig; default none) is the teacher rule recorded for teacher-involved sampling, which the release does
    not record.

    ``conti_from`` (recorded in the run; see :func:`onestep.dd1.sampling.dd_step_vectors`): the released output rule,
    argmax codes before that position and the continuous head's tokens from it on. Default for LlamaGen-DD: 80, the
    release's sampler default (kept only when the teacher has more positions); VAR-DD: none (its split is a
    sampling argument of the release; pass the position of a scale boundary). Negative: argmax codes everywhere."""
    teacher, tconf, _ = load_teacher(teacher_run, with_tokenizer=False)
    var = tconf.get("family", "llamagen") == "var"
    if conti_from is None and not var and teacher.seq_len > LLAMAGEN_DD_CONTI_FROM:
        conti_from = LLAMAGEN_DD_CONTI_FROM
    if conti_from is not None and conti_from < 0:
        conti_from = None
    if conti_from is not None and conti_from > teacher.seq_len:
        raise ValueError(f"conti_from {conti_from} lies past the teacher's {teacher.seq_len} positions")
    if var:
        model = VARDD1Generator.from_config({"args": teacher.args.to_dict(), "conti_head": True},
                                            teacher.codebook().detach())
        sd = read_state_dict(dd1_path, nested=("trainer", "ema_parameters"))
        own = model.state_dict()
        sd = {**{k: own[k] for k in ("lvl_1L", "attn_bias_for_masking") if k not in sd}, **sd}
    else:
        model = DD1Generator(teacher.args, teacher.codebook().detach(), input_mode="linear", conti_head=True)
        sd = read_state_dict(dd1_path, wrapper=("ema", "model", "module", "state_dict"))
        sd = {k: v for k, v in sd.items() if k != "freqs_cis"}
    ckpt.load_state_dict_strict(model, sd, source=str(dd1_path))
    out = Path(out)
    final = out / "final"
    config = {"kind": "dd1", "method": "DD1 (method.md section 2), released weights", "train": None,
              "teacher_dir": ref_to(teacher_run, out), "imported_from": {"dd1": str(dd1_path)},
              "sampling": (sampling or SamplingConfig()).to_dict(), "ode": ODEConfig().to_dict(),
              "model": model.config(), "data": tconf.get("data"), "conti_from": conti_from}
    ckpt.save_model(final, model, config)
    return final
