"""VAR-style class-conditional next-scale AR transformer (VAR, Tian et al. 2024) as an :class:`ARTeacher`.

One AR step is one scale: scale k holds ``pn_k x pn_k`` tokens in row-major order, and its tokens attend to
every token of scales <= k (block-causal). Parameter names and shapes follow the official VAR
(``models/var.py``), so the ``VAR-d16`` / ``d20`` / ``d24`` / ``d30`` presets build exactly the state_dict
described in ``tests/fixtures/checkpoints/var-d*.json`` (checked by a test), persistent buffers included
(``lvl_1L``, ``attn_bias_for_masking``, ``blocks.*.attn.zero_k_bias``):

- width C = 64 depth, heads = depth; LayerNorms without affine parameters (eps 1e-6); per-block AdaLN on the
  class embedding, ``ada_lin.1`` (C -> 6C) read as gamma1, gamma2, scale1, scale2, shift1, shift2;
  x += gamma1 Attn(LN(x)(1 + scale1) + shift1), then the same with the FFN (GELU, tanh) and index 2.
- attention: fused ``mat_qkv`` without bias, bias [q_bias, zero_k_bias, v_bias]; q and k l2-normalised per
  head, q times exp(min(scale_mul_1H11, ln 100)), softmax temperature 1.
- the class embedding (``class_emb``, last row = the null class of CFG) is the first token (plus
  ``pos_start``) and the AdaLN condition of every block and of ``head_nm``; ``lvl_embed`` + ``pos_1LC``.
- the input of scale k >= 1 is f_hat, the sum over scales j < k of phi_j(bicubic-upsampled code vectors of
  scale j), area-downsampled to pn_k x pn_k, through ``word_embed`` (Linear C_vae -> C).

The multi-scale residual quantiser (:class:`MultiScaleQuantizer`: the codebook and the phi convs, the
``quantize.*`` keys of the official VQVAE file) belongs to the tokenizer. As :class:`GPT` does with its
codebook, the teacher keeps a frozen copy of it in non-persistent buffers (:meth:`VAR.set_quantizer`), so its
state_dict is exactly the official one. The teacher reads code VECTORS natively (through f_hat), so a continuous
prefix needs no embedding MLP: DD2's stage 0 is the identity for this family.

Sampling uses the shared samplers of :mod:`onestep.teacher.sampling` through the KV-cache :meth:`VAR.step`;
VAR's CFG ramp t = cfg k / (K - 1), logits = (1 + t) cond - t uncond, is ``SamplingConfig(cfg_scale=1 + cfg,
cfg_schedule="linear")``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestep.teacher.base import ARTeacher
from onestep.tokenizer.quant import (OFFICIAL_PATCH_NUMS, OFFICIAL_PHI_INDEX, MultiScaleQuantizer,  # noqa: F401
                                   downsample, multiscale_inputs, phi_apply, phi_index_for, phi_params,
                                   scale_steps, to_grid, upsample)

@dataclass(frozen=True)
class VARArgs:
    """Configuration of :class:`VAR` and of its :class:`MultiScaleQuantizer` (names follow VAR's arguments)."""

    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # VAR's cond_drop_rate
    vocab_size: int = 4096
    code_dim: int = 32               # VAR's Cvae
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    num_phi: int = 4                 # VAR's share_quant_resi
    phi_index: tuple[int, ...] | None = OFFICIAL_PHI_INDEX  # None: phi_index_for(len(patch_nums), num_phi)
    quant_resi: float = 0.5          # phi(h) = (1 - r) h + r conv3x3(h)

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        if self.phi_index is None:
            object.__setattr__(self, "phi_index", phi_index_for(len(self.patch_nums), self.num_phi))
        object.__setattr__(self, "phi_index", tuple(self.phi_index))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ValueError(f"patch_nums must increase strictly, got {self.patch_nums}")
        if len(self.phi_index) != len(self.patch_nums) or not all(0 <= j < self.num_phi for j in self.phi_index):
            raise ValueError(f"phi_index {self.phi_index} must give one index < num_phi={self.num_phi} per scale")

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    def ar_steps(self) -> list[tuple[int, int]]:
        return scale_steps(self.patch_nums)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VARArgs":
        return cls(**d)


def _official(depth: int) -> VARArgs:
    return VARArgs(depth=depth, embed_dim=64 * depth, num_heads=depth)


VAR_PRESETS: dict[str, VARArgs] = {
    # Official VAR class-conditional ImageNet 256 sizes; layouts match tests/fixtures/checkpoints/var-d*.json.
    "VAR-d16": _official(16), "VAR-d20": _official(20), "VAR-d24": _official(24), "VAR-d30": _official(30),
    # Sized for a 2-core CPU: "tiny" for unit tests (3 scales, 14 tokens), "small" for 28x28 images (7x7 latent).
    "tiny": VARArgs(depth=2, embed_dim=32, num_heads=2, num_classes=10, vocab_size=16, code_dim=4,
                    patch_nums=(1, 2, 3), num_phi=2, phi_index=(0, 0, 1)),
    "small": VARArgs(depth=6, embed_dim=192, num_heads=6, num_classes=10, vocab_size=512, code_dim=8,
                     patch_nums=(1, 2, 3, 4, 5, 7), num_phi=4, phi_index=None),
}


def var_args(preset: str, **overrides) -> VARArgs:
    if preset not in VAR_PRESETS:
        raise KeyError(f"unknown VAR preset {preset!r}; choose from {sorted(VAR_PRESETS)}")
    return replace(VAR_PRESETS[preset], **overrides)


# ---- the transformer ----------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, args: VARArgs):
        super().__init__()
        C, H = args.embed_dim, args.num_heads
        self.num_heads, self.head_dim = H, C // H
        self.max_scale_mul = math.log(100)
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C)

    def forward(self, x_BLC: Tensor, attn_bias: Tensor | None, cache: "VARCache | None" = None, layer: int = 0):
        B, L, C = x_BLC.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias.to(x_BLC.dtype)).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D)
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q, k = F.normalize(q, dim=-1) * scale_mul.to(q.dtype), F.normalize(k, dim=-1)
        if cache is not None:  # a whole scale at once: it sees all cached scales and all of itself
            if cache.k[layer] is not None:
                k, v = torch.cat([cache.k[layer], k], 2), torch.cat([cache.v[layer], v], 2)
            cache.k[layer], cache.v[layer] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, args: VARArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.embed_dim, args.mlp_hidden)
        self.fc2 = nn.Linear(args.mlp_hidden, args.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """x += gamma1 Attn(LN(x)(1 + scale1) + shift1); x += gamma2 FFN(LN(x)(1 + scale2) + shift2)."""

    def __init__(self, args: VARArgs):
        super().__init__()
        C = args.embed_dim
        self.attn = SelfAttention(args)
        self.ffn = FFN(args)
        self.ln_wo_grad = nn.LayerNorm(C, eps=args.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x: Tensor, cond_BD: Tensor, attn_bias: Tensor | None, cache=None, layer: int = 0) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, x.shape[-1]).unbind(2)
        x = x + self.attn(self.ln_wo_grad(x) * (1 + scale1) + shift1, attn_bias, cache, layer) * gamma1
        return x + self.ffn(self.ln_wo_grad(x) * (1 + scale2) + shift2) * gamma2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, args: VARArgs):
        super().__init__()
        C = args.embed_dim
        self.ln_wo_grad = nn.LayerNorm(C, eps=args.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x: Tensor, cond_BD: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return self.ln_wo_grad(x) * (1 + scale) + shift


@dataclass
class VARCache:
    """Per-layer keys/values (B, H, S, D) of the scales seen so far, the next scale, and f_hat (B, C, H, W)."""

    k: list
    v: list
    f_hat: Tensor
    pos: int = 0


class VAR(ARTeacher):
    """VAR next-scale transformer implementing :class:`ARTeacher` (one scale per AR step)."""

    def __init__(self, args: VARArgs, quantizer: MultiScaleQuantizer | None = None):
        super().__init__()
        self.args = args
        C, L = args.embed_dim, args.seq_len
        self.seq_len, self.vocab_size, self.code_dim = L, args.vocab_size, args.code_dim
        self.num_classes, self.feature_dim = args.num_classes, C
        first = args.patch_nums[0] ** 2
        self.pos_start = nn.Parameter(torch.empty(1, first, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        lvl = torch.cat([torch.full((p * p,), k) for k, p in enumerate(args.patch_nums)]).view(1, L)
        self.register_buffer("lvl_1L", lvl)
        mask = torch.where(lvl.view(L, 1) >= lvl.view(1, L), 0.0, -torch.inf).view(1, 1, L, L)
        self.register_buffer("attn_bias_for_masking", mask.contiguous())
        self.word_embed = nn.Linear(args.code_dim, C)
        self.class_emb = nn.Embedding(args.num_classes + 1, C)
        self.lvl_embed = nn.Embedding(len(args.patch_nums), C)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(args) for _ in range(args.depth))
        self.head_nm = AdaLNBeforeHead(args)
        # ``head`` names both the official output layer (Linear C -> V) and ARTeacher's method: the layer is
        # registered under that name directly, and the method :meth:`head` calls it.
        self._modules["head"] = nn.Linear(C, args.vocab_size)
        # Not part of the state_dict: a frozen copy of the tokenizer's quantiser (codebook and phi convs).
        self.register_buffer("codebook_VC", torch.zeros(args.vocab_size, args.code_dim), persistent=False)
        self.register_buffer("phi_w", torch.zeros(args.num_phi, args.code_dim, args.code_dim, 3, 3), persistent=False)
        self.register_buffer("phi_b", torch.zeros(args.num_phi, args.code_dim), persistent=False)
        self.reset_parameters()
        if quantizer is not None:
            self.set_quantizer(quantizer)

    def reset_parameters(self) -> None:
        """Truncated-normal init with std sqrt(1 / (3C)) (VAR's default), small AdaLN and head weights."""
        std = (1 / self.args.embed_dim / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        for b in self.blocks:
            b.ada_lin[-1].weight.data.mul_(0.5)
            b.attn.scale_mul_1H11.data.fill_(math.log(4.0))
        self.head_nm.ada_lin[-1].weight.data.mul_(0.5)
        self._modules["head"].weight.data.mul_(0.02)

    # ---- the quantiser copy ---------------------------------------------------------------------------------
    @torch.no_grad()
    def set_quantizer(self, quantizer: MultiScaleQuantizer) -> None:
        if quantizer.args.patch_nums != self.args.patch_nums or quantizer.args.phi_index != self.args.phi_index:
            raise ValueError("the quantiser's scales / phi mapping differ from the teacher's")
        w, b = phi_params(quantizer)
        for name, src in (("codebook_VC", quantizer.embedding.weight), ("phi_w", w), ("phi_b", b)):
            dst = getattr(self, name)
            if src.shape != dst.shape:
                raise ValueError(f"quantiser {name} has shape {tuple(src.shape)}, the teacher expects {tuple(dst.shape)}")
            dst.copy_(src)

    @torch.no_grad()
    def copy_quantizer(self, other: "VAR") -> None:
        """The frozen quantiser copy of another VAR of the same shape (DD2's backbones copy the teacher's)."""
        for name in ("codebook_VC", "phi_w", "phi_b"):
            src, dst = getattr(other, name), getattr(self, name)
            if src.shape != dst.shape:
                raise ValueError(f"{name}: shape {tuple(src.shape)} != expected {tuple(dst.shape)}")
            dst.copy_(src)

    def codebook(self) -> Tensor:
        return self.codebook_VC

    def ar_steps(self) -> list[tuple[int, int]]:
        return self.args.ar_steps()

    def _codes(self, x: Tensor) -> Tensor:
        return self.ids_to_codes(x) if x.dtype == torch.long else x.to(self.word_embed.weight.dtype)

    # ---- teacher forcing ------------------------------------------------------------------------------------
    def features(self, x: Tensor, labels: Tensor) -> Tensor:
        """(B, L, C) hidden states after ``head_nm``: the rows of scale k see the label and x at scales < k."""
        cond = self.class_emb(labels)
        inputs, _ = multiscale_inputs(self._codes(x), self.args, self.phi_w, self.phi_b,
                                      upto=len(self.args.patch_nums) - 1)
        first = self.args.patch_nums[0] ** 2
        h = torch.cat([cond[:, None].expand(-1, first, -1) + self.pos_start, self.word_embed(inputs)], 1)
        h = h + self.lvl_embed(self.lvl_1L.expand(h.shape[0], -1)) + self.pos_1LC
        bias = self.attn_bias_for_masking.to(h.dtype)
        for blk in self.blocks:
            h = blk(h, cond, bias)
        return self.head_nm(h, cond)

    def head(self, h: Tensor) -> Tensor:
        """(B, ..., C) -> (B, ..., V) logits: the output layer ``head``."""
        return self._modules["head"](h)

    # ---- KV-cache sampling -----------------------------------------------------------------------------------
    def new_cache(self, batch: int, device, dtype: torch.dtype = torch.float32) -> VARCache:
        s = self.args.latent_size
        return VARCache([None] * self.args.depth, [None] * self.args.depth,
                        torch.zeros(batch, self.args.code_dim, s, s, device=device, dtype=torch.float32))

    def step(self, cache: VARCache, x_prev: Tensor | None, labels: Tensor, step_index: int) -> Tensor:
        """Features (B, pn_k^2, C) of scale ``step_index``; ``x_prev``: the tokens of the previous scale."""
        if step_index != cache.pos:
            raise ValueError(f"KV cache is at scale {cache.pos}, asked for scale {step_index}")
        a, pns = self.args, self.args.patch_nums
        cond = self.class_emb(labels)
        lo, hi = a.ar_steps()[step_index]
        if step_index == 0:
            h = cond[:, None].expand(-1, pns[0] ** 2, -1) + self.pos_start
        else:
            j = a.phi_index[step_index - 1]
            up = upsample(to_grid(self._codes(x_prev).float(), pns[step_index - 1]), a.latent_size)
            cache.f_hat = cache.f_hat + phi_apply(up, self.phi_w[j], self.phi_b[j], a.quant_resi)
            h = self.word_embed(downsample(cache.f_hat, pns[step_index]).to(self.word_embed.weight.dtype))
        h = h + self.lvl_embed.weight[step_index] + self.pos_1LC[:, lo:hi]
        for i, blk in enumerate(self.blocks):
            h = blk(h, cond, None, cache, i)
        cache.pos = step_index + 1
        return self.head_nm(h, cond)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["VARArgs", "VAR_PRESETS", "var_args", "VAR", "VARCache", "MultiScaleQuantizer", "multiscale_inputs",
           "phi_index_for", "OFFICIAL_PATCH_NUMS", "OFFICIAL_PHI_INDEX"]
