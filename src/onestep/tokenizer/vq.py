"""VQ tokenizer: LlamaGen's VQGAN-style conv autoencoder with an l2-normalised, low-dim codebook.

The module tree and state_dict are LlamaGen's ``VQModel``: the ``vq-16`` preset holds exactly the keys, shapes
and order of the published ``vq_ds16_c2i.pt`` (``onestep import-llamagen`` loads it strictly); the small presets
use the same module tree, narrower, without attention, with as many decoder as encoder blocks per level (LlamaGen:
one more), and with this module's codebook-maintenance buffers::

    image (B, in_ch, H, W) in [-1, 1]
      -> encoder (conv_in, ``conv_blocks.i``: GroupNorm+SiLU residual blocks [+ attention at the lowest
         resolution], stride-2 downsampling; ``mid``: res [, attn, res]; norm, SiLU, conv_out)
      -> quant_conv (1x1, z_channels -> code_dim)
      -> quantize: l2-normalise latents and codebook rows, nearest code (max cosine), straight-through
      -> post_quant_conv (1x1, code_dim -> z_channels)
      -> decoder (mirror of the encoder; nearest-neighbour x2 upsampling + conv) -> image

Tokens are the codes of the (h, w) = (H, W) / 2**(len(channel_mult) - 1) latent grid in raster
(row-major) order, so ``seq_len = h * w``. ``codebook_vectors()`` is the (V, C) l2-normalised codebook:
the decoder only ever sees such unit vectors, and it is the space the AR teacher's flow lives in.

Decoder output: the training forward returns the raw (unbounded) decoder output, on which the pixel
loss is taken; every ``decode*`` method clamps it to [-1, 1].

Codebook usage is kept high by (i) the low-dim l2-normalised lookup, (ii) k-means initialisation of the
codebook from the first training batch's latents, and (iii) dead-code restart: a code unused for
``restart_after`` consecutive training steps is reset to a random latent of the current batch. Both write the
codebook outside the optimizer, so both leave out latents with a NaN / inf (e.g. from a corrupt image). The
restart state (``unused_steps``, ``initialized``, ``restarts``) lives in registered buffers, so it is
saved with the weights and a resumed run continues identically (``training_state=False``, the ``vq-16`` preset:
none of these, only LlamaGen's ``codebook_used`` window of recent ids). All randomness comes from the
``torch.Generator`` passed to ``forward``; under DDP the decisions are all-reduced / broadcast from rank 0.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class VQConfig:
    image_size: int = 28
    in_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one level per entry; len - 1 stride-2 downsamplings
    num_res_blocks: int = 1  # residual blocks per level (encoder and decoder)
    norm_groups: int = 8
    z_channels: int = 64
    codebook_size: int = 512
    code_dim: int = 8
    beta: float = 0.25  # commitment loss weight (codebook loss has weight 1)
    entropy_weight: float = 0.0  # LlamaGen's entropy loss (sample entropy - batch-mean entropy); 0 = off
    entropy_temperature: float = 0.01
    kmeans_iters: int = 10  # spherical k-means iterations for the first-batch codebook init (0 = random latents)
    restart_after: int = 50  # training steps a code may go unused before it is restarted (0 = never)
    decoder_res_blocks: int | None = None  # residual blocks per decoder level (None: num_res_blocks; LlamaGen: +1)
    attn: bool = False  # self-attention at the lowest resolution (encoder and decoder) and in the mid blocks
    training_state: bool = True  # keep the codebook-init / dead-code state in buffers (initialized, unused_steps,
                                 # restarts); False gives LlamaGen's exact state_dict and no data init or restarts
    usage_window: int = 0  # LlamaGen's ``codebook_used`` buffer: the ids of the last N training tokens (0 = none)

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if not self.training_state and (self.restart_after > 0 or self.kmeans_iters > 0):
            raise ValueError("training_state=False keeps no codebook-init or restart state: set kmeans_iters=0 and "
                             "restart_after=0")
        f = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % f:
            raise ValueError(f"image_size {self.image_size} is not divisible by the downsampling factor {f}")

    @property
    def decoder_blocks(self) -> int:
        """Residual blocks per decoder level: ``decoder_res_blocks``, or ``num_res_blocks`` when that is None."""
        return self.num_res_blocks if self.decoder_res_blocks is None else self.decoder_res_blocks

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d


VQ_PRESETS: dict[str, VQConfig] = {
    # unit tests: 16x16 -> 4x4 tokens, a few ms per step
    "tiny": VQConfig(image_size=16, base_channels=8, channel_mult=(1, 2, 2), norm_groups=4, z_channels=16,
                     codebook_size=32, code_dim=4, kmeans_iters=2, restart_after=5),
    # quick runs: 28x28 -> 7x7 tokens, half the default's width
    "small": VQConfig(base_channels=16, channel_mult=(1, 2, 2), norm_groups=4, z_channels=32, codebook_size=256),
    # 28x28 -> 7x7 tokens (downsample 4), 512 codes of dim 8; sized for a 2-core CPU
    "default": VQConfig(),
    # 28x28 -> 14x14 tokens (downsample 2: 196 AR steps for a raster teacher; 32x32 -> 16x16), 512 codes of dim 8
    "ds2": VQConfig(channel_mult=(1, 2)),
    # LlamaGen's published VQ-16 (vq_ds16_c2i.pt): 256x256 RGB -> 16x16 tokens, 16384 codes of dim 8, 71.9M
    # parameters; its state_dict is the published one key for key (tests/test_tokenizer.py)
    "vq-16": VQConfig(image_size=256, in_channels=3, base_channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                      decoder_res_blocks=3, attn=True, norm_groups=32, z_channels=256, codebook_size=16384, code_dim=8,
                      kmeans_iters=0, restart_after=0, training_state=False, usage_window=65536),
    # the vq-16 architecture (attention, decoder_res_blocks = num_res_blocks + 1, LlamaGen's buffers only) at the
    # size of the unit tests: 16x16 RGB -> 4x4 tokens
    "vq-16-tiny": VQConfig(image_size=16, in_channels=3, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                           decoder_res_blocks=2, attn=True, norm_groups=4, z_channels=16, codebook_size=32, code_dim=4,
                           kmeans_iters=0, restart_after=0, training_state=False, usage_window=256),
}


def vq_config(preset: str = "default", **overrides) -> VQConfig:
    """A copy of ``VQ_PRESETS[preset]`` with fields replaced (e.g. image_size, in_channels from the data)."""
    if preset not in VQ_PRESETS:
        raise KeyError(f"unknown tokenizer preset {preset!r}; choose one of {', '.join(VQ_PRESETS)}")
    return replace(VQ_PRESETS[preset], **overrides)


# ---- building blocks -------------------------------------------------------------------------------
def _norm(ch: int, groups: int) -> nn.GroupNorm:
    g = groups
    while ch % g:
        g -= 1
    return nn.GroupNorm(g, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a 1x1 ``nin_shortcut`` where the channels change."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with separate 1x1 ``q``, ``k``, ``v`` convs, scale C^-1/2, residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q, self.k, self.v = (nn.Conv2d(ch, ch, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        B, C, H, W = x_BCHW.shape
        h = self.norm(x_BCHW)
        q, k, v = (m(h).reshape(B, C, H * W).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, HW, C)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=C ** -0.5)[:, 0]
        return x_BCHW + self.proj_out(a.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 conv3x3 with VQGAN's asymmetric (0, 1, 0, 1) padding: H -> H / 2 exactly."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def make_level(blocks: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, resample_name: str,
               blocks_name: str = "res") -> nn.Module:
    """One resolution level of an encoder / decoder: ``<blocks_name>.j`` (each followed by ``attn.j`` when the level
    has attention), then the resampling module as ``resample_name`` (none at the last level). LlamaGen names the
    residual blocks ``res``, VAR (tokenizer/msvq.py) ``block``."""
    level = nn.Module()
    setattr(level, blocks_name, nn.ModuleList(blocks))
    level.attn = nn.ModuleList(attn)
    if resample is not None:
        setattr(level, resample_name, resample)
    return level


def run_level(level: nn.Module, h: Tensor, blocks_name: str = "res") -> Tensor:
    """The blocks of a :func:`make_level` level in order (block j, then attention j), without the resampling."""
    for j, blk in enumerate(getattr(level, blocks_name)):
        h = blk(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


def _level(cin: int, c: int, n_res: int, attn: bool, groups: int, resample: nn.Module | None, name: str) -> nn.Module:
    return make_level([ResnetBlock(cin if j == 0 else c, c, groups) for j in range(n_res)],
                      [AttnBlock(c, groups) for _ in range(n_res if attn else 0)], resample, name)


def _mid(ch: int, attn: bool, groups: int) -> nn.ModuleList:
    """``mid``: [res] or, with attention, [res, attn, res] (LlamaGen's keys mid.0 / mid.1 / mid.2)."""
    return nn.ModuleList([ResnetBlock(ch, ch, groups)] + ([AttnBlock(ch, groups), ResnetBlock(ch, ch, groups)]
                                                          if attn else []))


class Encoder(nn.Module):
    """conv_in -> ``conv_blocks.i`` (highest resolution first; attention at the lowest) -> mid -> norm, SiLU, conv_out."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mult]
        g, last = cfg.norm_groups, len(chs) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        cin = chs[0]
        for i, c in enumerate(chs):
            self.conv_blocks.append(_level(cin, c, cfg.num_res_blocks, cfg.attn and i == last, g,
                                           Downsample(c) if i < last else None, "downsample"))
            cin = c
        self.mid = _mid(cin, cfg.attn, g)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        h = self.conv_in(x_BCHW)
        for level in self.conv_blocks:
            h = run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in -> mid -> ``conv_blocks.i`` in processing order (lowest resolution first, with attention) -> conv_out."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mult]
        g = cfg.norm_groups
        cin = chs[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, cfg.attn, g)
        self.conv_blocks = nn.ModuleList()
        for k, i in enumerate(reversed(range(len(chs)))):
            c = chs[i]
            self.conv_blocks.append(_level(cin, c, cfg.decoder_blocks, cfg.attn and k == 0, g,
                                           Upsample(c) if i > 0 else None, "upsample"))
            cin = c
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z_BCHW: Tensor) -> Tensor:
        h = self.conv_in(z_BCHW)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            h = run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- quantizer -------------------------------------------------------------------------------------
def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def finite_rows(x_NC: Tensor) -> Tensor:
    """The rows of ``x_NC`` without a NaN or an infinity (``x_NC`` itself when all rows are finite)."""
    ok = torch.isfinite(x_NC).all(1)
    return x_NC if bool(ok.all()) else x_NC[ok]


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """``flag`` on every rank (a MIN all-reduce under a process group): a codebook update that one rank skips is
    skipped by all, so none waits in a broadcast that the others never reach."""
    if _dist_world() <= 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class VectorQuantizer(nn.Module):
    """l2-normalised nearest-neighbour quantizer with k-means init and dead-code restart (see module doc)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if cfg.usage_window > 0:  # LlamaGen's name and dtype (it sits in the published file)
            self.register_buffer("codebook_used", torch.zeros(cfg.usage_window))
        if cfg.training_state:
            self.register_buffer("initialized", torch.zeros((), dtype=torch.long))
            self.register_buffer("unused_steps", torch.zeros(cfg.codebook_size, dtype=torch.long))
            self.register_buffer("restarts", torch.zeros((), dtype=torch.long))  # total codes restarted

    def codebook(self) -> Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    # -- codebook maintenance (training only, no gradients) --
    @torch.no_grad()
    def _sync_weight(self) -> None:
        if _dist_world() > 1:
            dist.broadcast(self.embedding.weight.data, src=0)

    @torch.no_grad()
    def kmeans_init(self, z_NC: Tensor, generator: torch.Generator | None) -> None:
        """Spherical k-means of (unit) latents ``z_NC`` -> codebook rows (random latents as the start). Rows with a
        NaN / inf are left out; with no finite row (on any rank) the codebook stays uninitialised and the next
        training batch initialises it."""
        z_NC = finite_rows(z_NC)
        if not all_ranks_agree(len(z_NC) > 0, self.embedding.weight.device):
            return
        V = self.cfg.codebook_size
        idx = torch.randint(0, len(z_NC), (V,), generator=generator).to(z_NC.device) if len(z_NC) < V else \
            torch.randperm(len(z_NC), generator=generator)[:V].to(z_NC.device)
        c = z_NC[idx].clone()
        if len(z_NC) < V:  # duplicates: jitter them apart
            c = F.normalize(c + 0.01 * torch.randn(c.shape, generator=generator).to(c.device), dim=-1)
        for _ in range(self.cfg.kmeans_iters):
            assign = (z_NC @ c.t()).argmax(1)
            sums = torch.zeros_like(c).index_add_(0, assign, z_NC)
            counts = torch.bincount(assign, minlength=V)
            c = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), c)
        self.embedding.weight.data.copy_(c)
        self._sync_weight()
        self.initialized.fill_(1)

    @torch.no_grad()
    def restart_dead(self, z_NC: Tensor, generator: torch.Generator | None) -> int:
        """Reset codes unused for ``restart_after`` steps to random current latents. Returns how many. Latents with a
        NaN / inf are never picked; with no finite one (on any rank) the dead codes wait for the next batch."""
        if self.cfg.restart_after <= 0:
            return 0
        dead = (self.unused_steps >= self.cfg.restart_after).nonzero().squeeze(1)
        if len(dead) == 0:
            return 0
        z_NC = finite_rows(z_NC)
        if not all_ranks_agree(len(z_NC) > 0, self.embedding.weight.device):
            return 0
        pick = torch.randint(0, len(z_NC), (len(dead),), generator=generator).to(z_NC.device)
        self.embedding.weight.data[dead] = z_NC[pick].to(self.embedding.weight.dtype)
        self._sync_weight()
        self.unused_steps[dead] = 0
        self.restarts += len(dead)
        return len(dead)

    @torch.no_grad()
    def update_usage(self, ids: Tensor) -> None:
        if self.cfg.usage_window > 0:  # a sliding window of the latest ids (this rank's)
            new = ids.reshape(-1)[-self.cfg.usage_window:].to(self.codebook_used.dtype)
            self.codebook_used.copy_(torch.cat([self.codebook_used[len(new):], new]))
        if not self.cfg.training_state:
            return
        used = torch.bincount(ids.reshape(-1), minlength=self.cfg.codebook_size) > 0
        if _dist_world() > 1:
            used = used.long()
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
            used = used.bool()
        self.unused_steps.add_(1).masked_fill_(used, 0)

    # -- quantisation --
    def forward(self, z_BCHW: Tensor, generator: torch.Generator | None = None, update: bool = False):
        """(B, C, h, w) latents -> (z_q (B, C, h, w) straight-through, ids (B, h*w), losses dict).

        ``update=True`` (training) runs the k-means init on the first call and dead-code restarts.
        """
        B, C, h, w = z_BCHW.shape
        z = F.normalize(z_BCHW.permute(0, 2, 3, 1).reshape(B, h * w, C), dim=-1)  # (B, n, C)
        z_flat = z.reshape(-1, C)
        restarted = 0
        if update and self.cfg.training_state:
            if not bool(self.initialized):
                self.kmeans_init(z_flat.detach().float(), generator)
            restarted = self.restart_dead(z_flat.detach(), generator)
        cb = self.codebook()
        logits = z_flat @ cb.t()  # cosine similarity; nearest code = largest
        ids = logits.detach().argmax(1)
        z_q = cb[ids].reshape(B, h * w, C)
        losses = {"vq": F.mse_loss(z_q, z.detach()), "commit": self.cfg.beta * F.mse_loss(z_q.detach(), z)}
        if self.cfg.entropy_weight > 0:
            losses["entropy"] = self.cfg.entropy_weight * _entropy_loss(-2 * (1 - logits), self.cfg.entropy_temperature)
        if update:  # a latent with a NaN / inf uses no code (its argmax is arbitrary)
            self.update_usage(ids[torch.isfinite(z_flat.detach()).all(1)])
        z_q = z + (z_q - z).detach()
        losses["restarted"] = torch.tensor(float(restarted))
        return z_q.reshape(B, h, w, C).permute(0, 3, 1, 2), ids.reshape(B, h * w), losses


def _entropy_loss(affinity: Tensor, temperature: float) -> Tensor:
    """LlamaGen's entropy loss: mean per-sample entropy minus the entropy of the mean assignment."""
    p = F.softmax(affinity / temperature, dim=-1)
    logp = F.log_softmax(affinity / temperature, dim=-1)
    sample_entropy = -(p * logp).sum(-1).mean()
    avg = p.mean(0)
    return sample_entropy + (avg * torch.log(avg + 1e-5)).sum()


# ---- the model -------------------------------------------------------------------------------------
_LEGACY_KEYS = [(re.compile(r"^encoder\.down\.(\d+)\."), r"encoder.conv_blocks.\1."),
                (re.compile(r"^decoder\.up\.(\d+)\."), r"decoder.conv_blocks.\1."),
                (re.compile(r"^(encoder|decoder)\.mid\.(?!\d)"), r"\1.mid.0.")]


def upgrade_legacy_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of a tokenizer saved before the layout took LlamaGen's names (``encoder.down.i`` ->
    ``encoder.conv_blocks.i``, ``decoder.up.i`` -> ``decoder.conv_blocks.i``, ``mid.`` -> ``mid.0.``); the weights
    and their order of use are unchanged. Other state_dicts are returned as they are."""
    if not any(k.startswith(("encoder.down.", "decoder.up.")) for k in state_dict):
        return state_dict
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in _LEGACY_KEYS:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


class VQModel(nn.Module):
    """Encoder + l2-normalised VQ + decoder. Images are float (B, C, H, W) in [-1, 1]."""

    upgrade_state_dict = staticmethod(upgrade_legacy_keys)  # old key names, applied by checkpoint.load_model_weights

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.z_channels, 1)

    # ---- geometry ----
    @property
    def grid(self) -> tuple[int, int]:
        s = self.config.image_size // self.config.downsample
        return s, s

    @property
    def seq_len(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def code_dim(self) -> int:
        return self.config.code_dim

    def codebook_vectors(self) -> Tensor:
        """(V, C) l2-normalised codebook (differentiable; ``.detach()`` it to freeze)."""
        return self.quantize.codebook()

    # ---- encode ----
    def encode(self, images: Tensor, generator: torch.Generator | None = None, update: bool | None = None):
        """images (B, C, H, W) -> (z_q (B, code_dim, h, w), ids (B, h*w), losses).

        ``update`` (default: ``self.training``) enables the codebook init / dead-code restart / usage counts.
        """
        z = self.quant_conv(self.encoder(images))
        return self.quantize(z, generator, self.training if update is None else update)

    @torch.no_grad()
    def encode_ids(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> token ids (B, h*w) in raster order; never touches the codebook state."""
        return self.encode(images, update=False)[1]

    # ---- decode ----
    def _decode_raw(self, z_q_BCHW: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q_BCHW))

    def decode(self, z_q_BCHW: Tensor) -> Tensor:
        """(B, code_dim, h, w) code vectors -> images (B, C, H, W) clamped to [-1, 1]."""
        return self._decode_raw(z_q_BCHW).clamp(-1.0, 1.0)

    def decode_codes(self, codes_BNC: Tensor, normalize: bool = False) -> Tensor:
        """(B, n, code_dim) vectors in code space (possibly off the codebook) -> images in [-1, 1].

        ``normalize=True`` l2-normalises each vector first (the decoder was trained on unit vectors).
        """
        B, n, C = codes_BNC.shape
        h, w = self.grid
        if n != h * w or C != self.config.code_dim:
            raise ValueError(f"expected (B, {h * w}, {self.config.code_dim}) code vectors, got {tuple(codes_BNC.shape)}")
        if normalize:
            codes_BNC = F.normalize(codes_BNC, dim=-1)
        return self.decode(codes_BNC.reshape(B, h, w, C).permute(0, 3, 1, 2))

    def decode_ids(self, ids_BN: Tensor) -> Tensor:
        """(B, h*w) token ids (raster order) -> images (B, C, H, W) in [-1, 1]."""
        return self.decode_codes(self.codebook_vectors()[ids_BN])

    # ---- training forward ----
    def forward(self, images: Tensor, generator: torch.Generator | None = None):
        """Training pass: (raw reconstruction (unclamped), ids (B, h*w), losses {vq, commit[, entropy], restarted})."""
        z_q, ids, losses = self.encode(images, generator)
        return self._decode_raw(z_q), ids, losses
