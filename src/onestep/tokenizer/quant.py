"""VAR's multi-scale residual quantiser, on the tokenizer's side (VAR keeps it in ``quant.py`` beside its VQVAE).

The codebook and the phi convs are the ``quantize.*`` keys of the official VQVAE file. The scales' configuration is
:class:`ScaleArgs`; the next-scale teacher's :class:`~onestep.teacher.var.VARArgs` carries the same fields, so the
teacher reads its inputs (f_hat, :func:`multiscale_inputs`) with the functions of this module, and the tokenizer
imports nothing from ``teacher/``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn



def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook row for each vector of ``x`` (..., C) -> (...) (squared Euclidean distance)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    cb = codebook.float()
    d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)[None]
    return d.argmin(1).reshape(x.shape[:-1])

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
OFFICIAL_PHI_INDEX = (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)  # scale -> phi conv (two upstream ties resolved; hard-coded)


def phi_index_for(num_scales: int, num_phi: int) -> tuple[int, ...]:
    """VAR's scale -> phi mapping: argmin_j |tick_j - k / (K - 1)| with ticks linspace(1/(3P), 1 - 1/(3P), P).
    (For the official 10 scales and 4 phis use :data:`OFFICIAL_PHI_INDEX`: two scales tie there.)"""
    if num_phi == 1 or num_scales == 1:
        return (0,) * num_scales
    ticks = torch.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi, dtype=torch.float64)
    return tuple(int((ticks - k / (num_scales - 1)).abs().argmin()) for k in range(num_scales))


@dataclass(frozen=True)
class ScaleArgs:
    """The quantiser's configuration: codebook shape, scales (``patch_nums``, increasing; the last is the latent
    size) and the phi convs (``num_phi`` of them, ``phi_index`` giving each scale's; None: :func:`phi_index_for`)."""

    vocab_size: int = 4096
    code_dim: int = 32
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    num_phi: int = 4
    phi_index: tuple[int, ...] | None = OFFICIAL_PHI_INDEX
    quant_resi: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
        if self.phi_index is None:
            object.__setattr__(self, "phi_index", phi_index_for(len(self.patch_nums), self.num_phi))
        object.__setattr__(self, "phi_index", tuple(self.phi_index))
        if list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ValueError(f"patch_nums must increase strictly, got {self.patch_nums}")
        if len(self.phi_index) != len(self.patch_nums) or not all(0 <= j < self.num_phi for j in self.phi_index):
            raise ValueError(f"phi_index {self.phi_index} must give one index < num_phi={self.num_phi} per scale")

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    def ar_steps(self) -> list[tuple[int, int]]:
        return scale_steps(self.patch_nums)

    def to_dict(self) -> dict:
        return asdict(self)


def scale_steps(patch_nums) -> list[tuple[int, int]]:
    """(start, end) token positions of each scale, scales concatenated in order (VAR's AR steps)."""
    out, a = [], 0
    for p in patch_nums:
        out.append((a, a + p * p))
        a += p * p
    return out


def to_grid(codes_BNC: Tensor, pn: int) -> Tensor:
    """(B, pn*pn, C) row-major tokens -> (B, C, pn, pn)."""
    return codes_BNC.transpose(1, 2).reshape(codes_BNC.shape[0], -1, pn, pn)


def upsample(h_BCpp: Tensor, size: int) -> Tensor:
    """Bicubic upsampling to the latent size (the identity at the last scale)."""
    return h_BCpp if h_BCpp.shape[-1] == size else F.interpolate(h_BCpp, size=(size, size), mode="bicubic")


def downsample(f_BCHW: Tensor, pn: int) -> Tensor:
    """Area downsampling of f_hat to pn x pn, flattened row-major: (B, pn*pn, C)."""
    h = f_BCHW if f_BCHW.shape[-1] == pn else F.interpolate(f_BCHW, size=(pn, pn), mode="area")
    return h.flatten(2).transpose(1, 2)


def phi_apply(h_BCHW: Tensor, weight: Tensor, bias: Tensor, resi: float) -> Tensor:
    """phi(h) = (1 - r) h + r conv3x3(h) (VAR's Phi with quant_resi r)."""
    return h_BCHW * (1 - resi) + F.conv2d(h_BCHW, weight, bias, padding=1) * resi


class _PhiList(nn.Module):
    def __init__(self, num_phi: int, code_dim: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(nn.Conv2d(code_dim, code_dim, 3, padding=1) for _ in range(num_phi))


class MultiScaleQuantizer(nn.Module):
    """VAR's multi-scale residual quantiser: the codebook ``embedding`` (V, C), the phi convs
    ``quant_resi.qresi_ls.*`` and the (training-statistics) buffer ``ema_vocab_hit_SV`` (the official VQVAE
    file's ``quantize.*`` keys). Plain squared-Euclidean lookup on the raw codebook (VAR: using_znorm=False)."""

    def __init__(self, args: "ScaleArgs"):
        super().__init__()
        self.args = args
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(args.patch_nums), args.vocab_size))
        self.quant_resi = _PhiList(args.num_phi, args.code_dim)
        self.embedding = nn.Embedding(args.vocab_size, args.code_dim)

    def phi(self, k: int, h_BCHW: Tensor) -> Tensor:
        conv = self.quant_resi.qresi_ls[self.args.phi_index[k]]
        return phi_apply(h_BCHW, conv.weight, conv.bias, self.args.quant_resi)

    def residual_quantize(self, f_BCHW: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Multi-scale residual quantisation of a latent f (B, C, H, W), H = W = the last patch size: at each scale
        the residual is area-downsampled, quantised, upsampled, passed through phi, added to f_hat and subtracted from
        the residual. Returns token ids (B, L) (scales concatenated), f_hat after each scale (differentiable in the
        codebook and the phi convs; the residual itself is detached) and the residual vectors that were quantised
        (N, C)."""
        a = self.args
        rest = f_BCHW.detach().float().clone()
        f_hat, f_hats, ids, residuals = torch.zeros_like(rest), [], [], []
        for k, pn in enumerate(a.patch_nums):
            z = downsample(rest, pn)                                   # (B, pn*pn, C)
            idx = nearest_code(z, self.embedding.weight)
            h = self.phi(k, upsample(to_grid(self.embedding(idx), pn), a.latent_size))
            f_hat, rest = f_hat + h, rest - h.detach()
            f_hats.append(f_hat)
            ids.append(idx)
            residuals.append(z.reshape(-1, a.code_dim))
        return torch.cat(ids, 1), f_hats, torch.cat(residuals)

    @torch.no_grad()
    def quantize(self, f_BCHW: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) and f_hat of a latent (:meth:`residual_quantize` without gradients)."""
        ids, f_hats, _ = self.residual_quantize(f_BCHW)
        return ids, f_hats[-1]

    def f_hat(self, codes_BLC: Tensor) -> Tensor:
        """f_hat of a whole token sequence given as code vectors (B, L, C)."""
        return multiscale_inputs(codes_BLC, self.args, *phi_params(self))[1]


def phi_params(q: MultiScaleQuantizer) -> tuple[Tensor, Tensor]:
    return (torch.stack([c.weight for c in q.quant_resi.qresi_ls]), torch.stack([c.bias for c in q.quant_resi.qresi_ls]))


def multiscale_inputs(codes_BLC: Tensor, args: "ScaleArgs", phi_w: Tensor, phi_b: Tensor,
                      upto: int | None = None) -> tuple[Tensor, Tensor]:
    """Teacher-forcing inputs of scales 1..K-1 from the code vectors of scales 0..K-2 (B, L, C): for scale k,
    f_hat_k = sum_{j<k} phi_j(upsample(x_j)), area-downsampled to pn_k. Returns (B, L - pn_0^2, C) and the
    final f_hat (B, C, H, W) (all ``upto`` scales accumulated, default all). Differentiable in the codes."""
    steps, size = args.ar_steps(), args.latent_size
    upto = len(steps) if upto is None else upto
    B, C = codes_BLC.shape[0], args.code_dim
    f_hat = codes_BLC.new_zeros(B, C, size, size)
    nxt = []
    for k in range(upto):
        a, b = steps[k]
        j = args.phi_index[k]
        f_hat = f_hat + phi_apply(upsample(to_grid(codes_BLC[:, a:b], args.patch_nums[k]), size),
                                  phi_w[j], phi_b[j], args.quant_resi)
        if k + 1 < len(steps):
            nxt.append(downsample(f_hat, args.patch_nums[k + 1]))
    inputs = torch.cat(nxt, 1) if nxt else codes_BLC.new_zeros(B, 0, C)
    return inputs, f_hat
