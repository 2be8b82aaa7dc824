"""Import published VAR weights as onestep run directories (``onestep import-var``).

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

import re
from pathlib import Path

import torch

from onestep import checkpoint as ckpt


def read_state_dict(path: str | Path, nested: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.pth`` / ``.pt`` / ``.safetensors`` file (tensors only, no code is unpickled),
    optionally under the keys ``nested`` (e.g. ``("trainer", "ema_parameters")``)."""
    path = Path(path)
    if not path.exists():
        raise ckpt.CheckpointError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        sd = ckpt.load_tensors(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ckpt.CheckpointError(f"cannot read {path} as a weights-only torch file: {e}") from None
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


def import_var(var_path: str | Path, vae_path: str | Path, out: str | Path, var_preset: str | None = None,
               vae_preset: str = "vae-ch160", num_classes: int | None = None) -> tuple[Path, Path]:
    """Write the tokenizer and teacher run directories of published VAR weights; returns their ``final/`` dirs.

    ``var_preset`` defaults to ``VAR-d{depth}`` with the depth read from the file; ``num_classes`` defaults to the
    class embedding's rows minus the null row."""
    from onestep.runs import ref_to
    from onestep.teacher.var import VAR, VAR_PRESETS, var_args
    from onestep.tokenizer.msvq import VQVAE, vqvae_config

    out = Path(out)
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
    tok_dir, teacher_dir = out / "tokenizer" / "final", out / "teacher" / "final"
    source = {"var": str(var_path), "vae": str(vae_path)}
    ckpt.save_model(tok_dir, vae, {"kind": "tokenizer", "family": "var", "model": c.to_dict(), "data": None,
                                   "imported_from": source, "preset": vae_preset})
    ckpt.save_model(teacher_dir, teacher, {"kind": "teacher", "family": "var", "model": args.to_dict(),
                                           "tokenizer_dir": ref_to(tok_dir.parent, teacher_dir.parent), "data": None,
                                           "imported_from": source, "preset": preset})
    return tok_dir, teacher_dir


def cmd_import_var(args) -> None:
    tok, teacher = import_var(args.var, args.vae, args.out, args.var_preset, args.vae_preset, args.num_classes)
    print(f"tokenizer: {tok}\nteacher: {teacher}\n(e.g. onestep sample --run {teacher.parent} --cfg-schedule linear "
          f"--cfg-scale 2.5 --top-k 900)")


def register(sub) -> None:
    p = sub.add_parser("import-var", help="import published VAR + VQVAE weights as tokenizer and teacher runs",
                       description="Convert var_dNN.pth and vae_ch160v4096z32.pth (bare state_dicts, on disk) into "
                                   "onestep run directories OUT/tokenizer and OUT/teacher. Strict: a file of another "
                                   "shape fails with every mismatched key listed.")
    p.add_argument("--var", required=True, help="VAR transformer weights (.pth, .pt or .safetensors)")
    p.add_argument("--vae", required=True, help="VAR VQVAE weights")
    p.add_argument("--out", required=True, help="output directory (gets tokenizer/ and teacher/)")
    p.add_argument("--var-preset", default=None, help="VAR preset (default: VAR-d{depth of the file})")
    p.add_argument("--vae-preset", default="vae-ch160", help="tokenizer preset (default: vae-ch160, the published one)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the class embedding's rows - 1")
    p.set_defaults(func=cmd_import_var)
