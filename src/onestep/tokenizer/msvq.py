"""VAR's multi-scale residual VQ tokenizer (VQVAE), with the official layout of ``vae_ch160v4096z32.pth``.

Layout (names follow VAR's ``models/vqvae.py`` and ``basic_vae.py``; checked against
``tests/fixtures/checkpoints/var-vqvae-ch160-v4096-z32.json`` by a test)::

    image (B, in_ch, H, W) in [-1, 1]
      -> encoder: conv_in, down.{i}.block.{j} (ResnetBlocks), down.{i}.attn.{j} (lowest level only),
         down.{i}.downsample (zero-pad right/bottom, 3x3 stride 2), mid.block_1 / attn_1 / block_2, conv_out
      -> quant_conv (3x3, C_vae -> C_vae) = f
      -> quantize (:class:`~onestep.tokenizer.quant.MultiScaleQuantizer`): residual quantisation over the scales
         -> token ids (B, L), L = sum pn^2, and f_hat = sum_k phi_k(upsample(codes of scale k))
      -> post_quant_conv (3x3) -> decoder (mirror, 3 blocks per level, up.{i} indexed by resolution) -> image

Training (VAR's quantiser forward): f_hat is built from the codes with a straight-through estimator; the
loss per scale is beta |sg(f_hat_k) - f|^2 (the encoder's commitment) + |f_hat_k - sg(f)|^2 (codebook and
phi), averaged over the scales. As the LlamaGen-style tokenizer does, the codebook starts from latents of the
first training batch, and dead codes are restarted at random current residuals. The only training state is VAR's own
persistent buffer ``quantize.ema_vocab_hit_SV`` (an EMA of each code's hits per scale), so a resumed run continues
identically and the state_dict keeps the official layout: a code is dead when its EMA hits fall below
``restart_below`` times the mean.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from onestep.tokenizer.quant import OFFICIAL_PATCH_NUMS, OFFICIAL_PHI_INDEX, MultiScaleQuantizer, ScaleArgs
from onestep.tokenizer.vq import (Downsample, ResnetBlock, Upsample, _dist_world, _norm, all_ranks_agree, finite_rows,
                                  make_level, run_level)


def _broadcast(t: Tensor) -> None:
    if _dist_world() > 1:
        dist.broadcast(t, src=0)


@dataclass
class VQVAEConfig:
    image_size: int = 256
    in_channels: int = 3
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)   # one level per entry; len - 1 stride-2 downsamplings
    num_res_blocks: int = 2                      # encoder blocks per level (the decoder has one more)
    norm_groups: int = 32
    level_attn: bool = True                      # self-attention at the lowest-resolution level (VAR: using_sa)
    mid_attn: bool = True                        # ... and in the middle (using_mid_sa)
    codebook_size: int = 4096
    code_dim: int = 32                           # C_vae
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    num_phi: int = 4
    phi_index: tuple[int, ...] | None = OFFICIAL_PHI_INDEX
    quant_resi: float = 0.5
    beta: float = 0.25                           # commitment weight
    restart_below: float = 0.03                  # restart a code whose EMA hits are below this x the mean (0 = never)
    family: str = field(default="var", init=False)

    def __post_init__(self):
        self.ch_mult, self.patch_nums = tuple(self.ch_mult), tuple(self.patch_nums)
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by the downsampling {self.downsample}")
        if self.patch_nums[-1] != self.image_size // self.downsample:
            raise ValueError(f"the last scale {self.patch_nums[-1]} must be the latent size "
                             f"{self.image_size // self.downsample}")
        self.phi_index = tuple(self.quant_args().phi_index)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def quant_args(self) -> ScaleArgs:
        """The quantiser's part of the teacher configuration (scales, phi mapping, codebook shape)."""
        return ScaleArgs(vocab_size=self.codebook_size, code_dim=self.code_dim, patch_nums=self.patch_nums,
                       num_phi=self.num_phi, phi_index=self.phi_index, quant_resi=self.quant_resi)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("family")
        d["ch_mult"], d["patch_nums"], d["phi_index"] = list(self.ch_mult), list(self.patch_nums), list(self.phi_index)
        return d


VQVAE_PRESETS: dict[str, VQVAEConfig] = {
    # the official VAR tokenizer (256px -> 16x16 latent, 10 scales)
    "vae-ch160": VQVAEConfig(),
    # unit tests: 28x28 -> 7x7 latent, scales 1, 3, 7 (59 tokens); the presets are sized for the 28x28 data sets and
    # carry their scales to other image sizes (vqvae_config: 32x32 -> 8x8 latent, scales 1, 3, 8)
    "var-tiny": VQVAEConfig(image_size=28, in_channels=1, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4,
                            level_attn=False, mid_attn=False, codebook_size=32, code_dim=4, patch_nums=(1, 3, 7),
                            num_phi=2, phi_index=(0, 0, 1)),
    # 28x28 -> 7x7 latent, scales 1, 2, 3, 4, 5, 7 (104 tokens); sized for a 2-core CPU
    "var-small": VQVAEConfig(image_size=28, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                             level_attn=False, mid_attn=False, codebook_size=512, code_dim=8,
                             patch_nums=(1, 2, 3, 4, 5, 7), num_phi=4, phi_index=None),
}


def scales_for(patch_nums: tuple[int, ...], latent: int) -> tuple[int, ...]:
    """A preset's scales carried to another latent size: the first stays 1, the last becomes ``latent``, the others
    are scaled by ``latent / patch_nums[-1]`` and rounded, and repeats are dropped (strictly increasing).
    ``scales_for((1, 3, 7), 8) == (1, 3, 8)``; ``scales_for((1, 2, 3, 4, 5, 7), 8) == (1, 2, 3, 5, 6, 8)``."""
    if latent < 1:
        raise ValueError(f"latent size must be >= 1, got {latent}")
    ref = patch_nums[-1]
    out = [1]
    for p in patch_nums[1:-1]:
        q = min(latent - 1, max(1, round(p * latent / ref)))
        if q > out[-1]:
            out.append(q)
    if latent > out[-1]:
        out.append(latent)
    return tuple(out)


def vqvae_config(preset: str, **overrides) -> VQVAEConfig:
    """``VQVAE_PRESETS[preset]`` with ``overrides``. An ``image_size`` other than the preset's carries the preset's
    scales to the new latent size (:func:`scales_for`) unless ``patch_nums`` is given; when that changes the number
    of scales, a preset's explicit phi mapping gives way to the default one."""
    if preset not in VQVAE_PRESETS:
        raise KeyError(f"unknown VAR tokenizer preset {preset!r}; choose one of {', '.join(VQVAE_PRESETS)}")
    base = VQVAE_PRESETS[preset]
    size = overrides.get("image_size", base.image_size)
    if size != base.image_size and "patch_nums" not in overrides:
        down = base.downsample if "ch_mult" not in overrides else 2 ** (len(overrides["ch_mult"]) - 1)
        if size % down:
            raise ValueError(f"the {preset} tokenizer downsamples by {down}: its image size must be a multiple of "
                             f"{down}, got {size}")
        overrides["patch_nums"] = scales_for(base.patch_nums, size // down)
        if len(overrides["patch_nums"]) != len(base.patch_nums) and "phi_index" not in overrides:
            overrides["phi_index"] = None
    return replace(base, **overrides)


class AttnBlock(nn.Module):
    """GroupNorm, one 1x1 conv ``qkv`` (q, k, v), softmax(q k^T / sqrt(C)) v, 1x1 ``proj_out``, residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                                           v.transpose(1, 2)[:, None])[:, 0]
        return x + self.proj_out(y.transpose(1, 2).reshape(B, C, H, W))


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int, attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups) if attn else nn.Identity()
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        ins = (1,) + cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(n):
            cin, cout = cfg.ch * ins[i], cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(cfg.num_res_blocks)]
            attn = [AttnBlock(cout, g) for _ in range(cfg.num_res_blocks)] if cfg.level_attn and i == n - 1 else []
            self.down.append(make_level(blocks, attn, Downsample(cout) if i < n - 1 else None, "downsample", "block"))
        top = cfg.ch * cfg.ch_mult[-1]
        self.mid = _Mid(top, g, cfg.mid_attn)
        self.norm_out = _norm(top, g)
        self.conv_out = nn.Conv2d(top, cfg.code_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h, "block")
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.code_dim, cin, 3, padding=1)
        self.mid = _Mid(cin, g, cfg.mid_attn)
        levels = []
        for i in reversed(range(n)):  # built from the lowest resolution up, indexed by resolution level
            cout = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(cfg.num_res_blocks + 1)]
            attn = [AttnBlock(cout, g) for _ in range(cfg.num_res_blocks + 1)] if cfg.level_attn and i == n - 1 else []
            levels.insert(0, make_level(blocks, attn, Upsample(cout) if i > 0 else None, "upsample", "block"))
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = run_level(level, h, "block")
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQVAE(nn.Module):
    """Encoder + multi-scale residual VQ + decoder; the tokenizer API of :class:`~onestep.tokenizer.vq.VQModel`
    (``encode`` / ``decode`` / ``encode_ids`` / ``decode_ids`` / ``decode_codes``) with multi-scale tokens."""

    family = "var"

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = MultiScaleQuantizer(config.quant_args())
        self.quant_conv = nn.Conv2d(config.code_dim, config.code_dim, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.code_dim, 3, padding=1)
        nn.init.uniform_(self.quantize.embedding.weight, -1 / config.codebook_size, 1 / config.codebook_size)

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.config.patch_nums)

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def code_dim(self) -> int:
        return self.config.code_dim

    @property
    def grid(self) -> tuple[int, int]:
        s = self.config.patch_nums[-1]
        return s, s

    def codebook_vectors(self) -> Tensor:
        return self.quantize.embedding.weight

    # ---- quantisation with the straight-through estimator ----
    def _quantize(self, f: Tensor, generator: torch.Generator | None, update: bool):
        cfg, q = self.config, self.quantize
        if update and not bool(q.ema_vocab_hit_SV.sum() > 0):  # first training step: codes from the batch's latents
            z = finite_rows(f.detach().permute(0, 2, 3, 1).reshape(-1, cfg.code_dim))  # none with a NaN / inf
            if all_ranks_agree(len(z) > 0, z.device):
                pick = torch.randint(len(z), (cfg.codebook_size,), generator=generator).to(z.device)
                q.embedding.weight.data.copy_(z[pick] + 1e-3 * torch.randn(z[pick].shape, generator=generator).to(z))
                _broadcast(q.embedding.weight.data)  # under DDP every rank takes rank 0's codebook
        f_sg = f.detach()
        ids, f_hats, residuals = q.residual_quantize(f)
        loss = sum(cfg.beta * F.mse_loss(fh.detach(), f) + F.mse_loss(fh, f_sg) for fh in f_hats)
        restarted = 0
        if update:
            restarted = self._restart_dead(ids, residuals, generator)
        return f_hats[-1].detach() - f_sg + f, ids, {"vq": loss / len(cfg.patch_nums), "commit": f.new_zeros(()),
                                                 "restarted": torch.tensor(float(restarted))}

    @torch.no_grad()
    def _restart_dead(self, ids: Tensor, residuals: Tensor, generator: torch.Generator | None) -> int:
        """Update the per-scale EMA of code hits (VAR's ``ema_vocab_hit_SV``, rate 0.99; the first step sets it), then
        restart the codes whose total EMA hits are below ``restart_below`` x the mean at random current residuals
        without a NaN / inf (their EMA is reset to the mean, so a restarted code has time to be used)."""
        cfg, ema = self.config, self.quantize.ema_vocab_hit_SV
        first = not bool(ema.sum() > 0)
        hits = torch.stack([torch.bincount(ids[:, a:b].reshape(-1), minlength=cfg.codebook_size)
                            for a, b in self.quantize.args.ar_steps()]).to(ema)
        if _dist_world() > 1:  # the hits of the global batch: every rank keeps the same statistics and restarts
            dist.all_reduce(hits)
        ema.copy_(hits if first else 0.99 * ema + 0.01 * hits)
        if cfg.restart_below <= 0 or first:
            return 0
        total = ema.sum(0)
        dead = (total < cfg.restart_below * total.mean()).nonzero().squeeze(1)
        residuals = finite_rows(residuals)  # a residual with a NaN / inf is never picked
        if len(dead) == 0 or not all_ranks_agree(len(residuals) > 0, residuals.device):
            return 0
        pick = torch.randint(len(residuals), (len(dead),), generator=generator).to(residuals.device)
        self.quantize.embedding.weight.data[dead] = residuals[pick].to(self.quantize.embedding.weight)
        _broadcast(self.quantize.embedding.weight.data)
        ema[:, dead] = ema.mean(1, keepdim=True)
        return len(dead)

    # ---- the tokenizer API ----
    def encode(self, images: Tensor, generator: torch.Generator | None = None, update: bool | None = None):
        """images -> (f_hat (B, C_vae, h, w) straight-through, ids (B, L), losses)."""
        f = self.quant_conv(self.encoder(images))
        return self._quantize(f, generator, self.training if update is None else update)

    @torch.no_grad()
    def encode_ids(self, images: Tensor) -> Tensor:
        return self.quantize.quantize(self.quant_conv(self.encoder(images)))[0]

    def _decode_raw(self, f_hat: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(f_hat))

    def decode(self, f_hat: Tensor) -> Tensor:
        return self._decode_raw(f_hat).clamp(-1.0, 1.0)

    def decode_codes(self, codes_BLC: Tensor, normalize: bool = False) -> Tensor:
        """(B, L, C_vae) code vectors of all scales (possibly off the codebook) -> images in [-1, 1].
        (``normalize`` is accepted for API parity; the raw codebook is not normalised, so it must be False.)"""
        if normalize:
            raise ValueError("the VAR tokenizer's codebook is not l2-normalised: decode_codes(normalize=True) is undefined")
        if codes_BLC.shape[1:] != (self.seq_len, self.code_dim):
            raise ValueError(f"expected (B, {self.seq_len}, {self.code_dim}) code vectors, got {tuple(codes_BLC.shape)}")
        return self.decode(self.quantize.f_hat(codes_BLC))

    def decode_ids(self, ids_BL: Tensor) -> Tensor:
        return self.decode_codes(self.codebook_vectors()[ids_BL])

    def forward(self, images: Tensor, generator: torch.Generator | None = None):
        f_hat, ids, losses = self.encode(images, generator)
        return self._decode_raw(f_hat), ids, losses
