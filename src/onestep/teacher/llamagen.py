"""LlamaGen-style class-conditional raster AR transformer (the "GPT" of LlamaGen's c2i models).

Parameter names and shapes follow the official LlamaGen GPT (``autoregressive/models/gpt.py``), so the
``GPT-B`` / ``GPT-L`` / ``GPT-XL`` / ``GPT-XXL`` presets build exactly the state_dict layout described in
``tests/fixtures/checkpoints/llamagen-gpt-*.json`` (checked by a test):

- RMSNorm (eps 1e-5, normalised in float32, cast back, times weight), SwiGLU FFN (w1, w3, w2; hidden
  = round_up(int(2 * 4 * dim / 3), multiple_of)), no biases anywhere, untied output head.
- One ``wqkv`` projection whose output rows are q | k | v (head-major), causal SDPA with 1/sqrt(d).
- 2-D rotary positions in raster order: the class token sits at sequence position 0 with cos = sin = 0
  (its q and k become zero), image token p at position 1 + p, with y = p // W, x = p % W; rotary pair
  j < d/4 rotates by y * w_j, pair j >= d/4 by x * w_(j - d/4), w_k = base^(-4k/d).
- ``cls_embedding.embedding_table`` has ``num_classes + 1`` rows; the last one is the null class used
  for classifier-free guidance. Class dropout happens only through :meth:`GPT.drop_labels`, only in
  training mode (never inside an eval-mode forward).

Extensions for onestep (not in the official layout, off in the official presets):
- ``input_embedding="mlp"`` (DD2 stage 0, method.md section 3): the token table is replaced by an MLP
  on code vectors (``tok_mlp``), so the model takes continuous inputs (B, n, C).
- The KV cache is a plain object returned by :meth:`GPT.new_cache`, never registered buffers, so a
  model that has sampled has the same state_dict as a fresh one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestep.teacher.base import ARTeacher


@dataclass(frozen=True)
class ModelArgs:
    """Configuration of :class:`GPT` (field names follow LlamaGen's ModelArgs where they exist)."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    grid_h: int = 16
    grid_w: int = 16
    code_dim: int = 8
    input_embedding: str = "table"  # "table" (official) or "mlp" (continuous input, DD2 stage 0)

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if (self.dim // self.n_head) % 4:
            raise ValueError("head_dim must be divisible by 4 for 2-D rotary positions")
        if self.input_embedding not in ("table", "mlp"):
            raise ValueError(f"input_embedding must be 'table' or 'mlp', got {self.input_embedding!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def seq_len(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        return cls(**d)


_OFFICIAL = dict(vocab_size=16384, num_classes=1000, grid_h=16, grid_w=16, code_dim=8)
GPT_PRESETS: dict[str, ModelArgs] = {
    # Official LlamaGen c2i sizes (256px, 16x16 tokens); layouts match tests/fixtures/checkpoints.
    "GPT-B": ModelArgs(dim=768, n_layer=12, n_head=12, **_OFFICIAL),
    "GPT-L": ModelArgs(dim=1024, n_layer=24, n_head=16, **_OFFICIAL),
    "GPT-XL": ModelArgs(dim=1280, n_layer=36, n_head=20, **_OFFICIAL),
    "GPT-XXL": ModelArgs(dim=1536, n_layer=48, n_head=24, **_OFFICIAL),
    # Sized for a 2-core CPU. "tiny" is for unit tests, "small" for the demo and benchmarks.
    "tiny": ModelArgs(dim=32, n_layer=2, n_head=2, multiple_of=16, vocab_size=16, num_classes=10,
                      grid_h=4, grid_w=4, code_dim=4),
    "small": ModelArgs(dim=192, n_layer=6, n_head=6, multiple_of=64, vocab_size=512, num_classes=10,
                       grid_h=7, grid_w=7, code_dim=8),
}


def model_args(preset: str, **overrides) -> ModelArgs:
    """A named preset with optional field overrides (e.g. vocab_size from the tokenizer)."""
    if preset not in GPT_PRESETS:
        raise KeyError(f"unknown GPT preset {preset!r}; choose from {sorted(GPT_PRESETS)}")
    return replace(GPT_PRESETS[preset], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_hidden, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rotary_table_2d(grid_h: int, grid_w: int, head_dim: int, base: float, cls_token_num: int = 1) -> Tensor:
    """(cls_token_num + H*W, head_dim/2, 2) table of (cos, sin); class slots are all zero (LlamaGen)."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (half/2,)
    ys = torch.arange(grid_h).float()[:, None, None] * freqs  # (H, 1, half/2)
    xs = torch.arange(grid_w).float()[None, :, None] * freqs  # (1, W, half/2)
    ang = torch.cat([ys.expand(grid_h, grid_w, -1), xs.expand(grid_h, grid_w, -1)], dim=-1)
    table = torch.stack([ang.cos(), ang.sin()], dim=-1).reshape(grid_h * grid_w, half, 2)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def apply_rotary(x_BSHD: Tensor, table_S_2: Tensor) -> Tensor:
    """Rotate adjacent pairs (2j, 2j+1) of each head by the table's angles, in float32."""
    xs = x_BSHD.float().reshape(*x_BSHD.shape[:-1], -1, 2)
    t = table_S_2.view(1, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
                       xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], dim=-1)
    return out.flatten(3).type_as(x_BSHD)


class KVCache:
    """Per-layer key/value tensors (B, H, n, D) for one sampling run, plus the write position."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.head_dim = args.n_head, args.head_dim
        self.wqkv = nn.Linear(args.dim, 3 * args.dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)

    def forward(self, x_BSC: Tensor, rope: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, S, C = x_BSC.shape
        q, k, v = self.wqkv(x_BSC).split(C, dim=-1)
        q, k, v = (t.view(B, S, self.n_head, self.head_dim) for t in (q, k, v))
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            p = cache.pos
            cache.k[layer][:, :, p:p + S] = k
            cache.v[layer][:, :, p:p + S] = v
            keys = cache.k[layer][:, :, :p + S].to(q.dtype)
            vals = cache.v[layer][:, :, :p + S].to(q.dtype)
            if S == 1:
                y = F.scaled_dot_product_attention(q, keys, vals)
            else:  # a block of new queries: causal within the block, full over the cached prefix
                mask = torch.ones(S, p + S, dtype=torch.bool, device=x_BSC.device).tril(diagonal=p)
                y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, S, C))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, cache=None, layer=0):
        h = x + self.attention(self.attention_norm(x), rope, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra null row (index num_classes) for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class GPT(ARTeacher):
    """LlamaGen c2i transformer implementing :class:`ARTeacher` (one token per AR step, raster order)."""

    def __init__(self, args: ModelArgs, codebook: Tensor | None = None):
        super().__init__()
        self.args = args
        self.seq_len, self.vocab_size, self.code_dim = args.seq_len, args.vocab_size, args.code_dim
        self.num_classes, self.feature_dim = args.num_classes, args.dim
        self.cls_embedding = LabelEmbedder(args.num_classes, args.dim)
        if args.input_embedding == "table":
            self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        else:
            self.tok_mlp = nn.Sequential(nn.Linear(args.code_dim, args.dim), nn.SiLU(), nn.Linear(args.dim, args.dim))
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Not part of the state_dict: derived from the config / supplied by the tokenizer.
        self.register_buffer("rope", rotary_table_2d(args.grid_h, args.grid_w, args.head_dim, args.rope_base),
                             persistent=False)
        cb = torch.zeros(args.vocab_size, args.code_dim) if codebook is None else codebook.detach().float()
        self.register_buffer("codebook_VC", cb.clone(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LlamaGen init: normal(0, initializer_range) for Linear/Embedding, zero output head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.args.initializer_range)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.output.weight)

    # ---- ARTeacher ----------------------------------------------------------------------------
    def codebook(self) -> Tensor:
        return self.codebook_VC

    def set_codebook(self, codebook: Tensor) -> None:
        if codebook.shape != self.codebook_VC.shape:
            raise ValueError(f"codebook shape {tuple(codebook.shape)} != expected {tuple(self.codebook_VC.shape)}")
        self.codebook_VC.copy_(codebook)

    def embed_tokens(self, x: Tensor) -> Tensor:
        """Token ids (B, S) or code vectors (B, S, C) -> (B, S, dim)."""
        if self.args.input_embedding == "table":
            ids = x if x.dtype == torch.long else self.nearest_ids(x)
            return self.tok_embeddings(ids)
        if x.dtype == torch.long:
            x = self.ids_to_codes(x)
        return self.tok_mlp(x.to(self.tok_mlp[0].weight.dtype))

    def features(self, x: Tensor, labels: Tensor, extra: Tensor | None = None) -> Tensor:
        """(B, n, dim) normed hidden states: row i = [class, x_0..x_{i-1}] -> predicts token i.

        ``extra`` (B, n, dim), optional, is added to the input rows (row i's input is the class or x_{i-1}): the DD2
        generator's noise stream feeds eps_i there (:class:`onestep.dd2.model.ARDiffusion`)."""
        h = torch.cat([self.cls_embedding(labels)[:, None], self.embed_tokens(x[:, :-1])], dim=1)
        if extra is not None:
            h = h + extra.to(h.dtype)
        rope = self.rope[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, rope)
        return self.norm(h)

    def head(self, h: Tensor) -> Tensor:
        return self.output(h)

    def new_cache(self, batch: int, device, dtype: torch.dtype = torch.float32) -> KVCache:
        a = self.args
        return KVCache(a.n_layer, batch, a.n_head, a.seq_len, a.head_dim, device, dtype)

    def step(self, cache: KVCache, x_prev: Tensor | None, labels: Tensor, step_index: int) -> Tensor:
        if step_index != cache.pos:
            raise ValueError(f"KV cache is at position {cache.pos}, asked for step {step_index}")
        h = self.cls_embedding(labels)[:, None] if step_index == 0 else self.embed_tokens(x_prev)
        return self._cached_pass(cache, h, step_index)

    def _cached_pass(self, cache: KVCache, h: Tensor, start: int) -> Tensor:
        """The layers over input rows h (B, S, dim) at AR steps [start, start + S), writing their keys and values
        into the cache (causal within the block, full over the cached prefix); normed hidden states."""
        rope = self.rope[start:start + h.shape[1]]
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache, i)
        cache.pos = start + h.shape[1]
        return self.norm(h)

    def prefill(self, cache: KVCache, x: Tensor, labels: Tensor, start: int, end: int) -> None:
        """AR steps [start, end) in ONE pass over the cache (their tokens are known: ``x`` (B, n) ids or code
        vectors; step k reads the class at k = 0, else token k - 1); the same keys and values as ``end - start``
        calls of :meth:`step`. Used to feed a kept prefix (DD2's multi-step sampling, skip-n, DD1's windows)."""
        if start != cache.pos:
            raise ValueError(f"KV cache is at position {cache.pos}, asked to prefill from step {start}")
        if not start < end <= self.seq_len:
            raise ValueError(f"need {start} < end <= {self.seq_len}, got end = {end}")
        parts = [self.cls_embedding(labels)[:, None]] if start == 0 else []
        lo = max(start - 1, 0)
        if end - 1 > lo:
            parts.append(self.embed_tokens(x[:, lo:end - 1]))
        self._cached_pass(cache, torch.cat(parts, 1), start)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def continuous_copy(teacher: GPT) -> GPT:
    """A GPT with ``input_embedding="mlp"`` (an MLP on the C-dim code vectors in place of the token table, DD2's
    stage 0), every shared weight copied from ``teacher``; the new ``tok_mlp`` keeps its fresh initialisation."""
    student = GPT(replace(teacher.args, input_embedding="mlp"), codebook=teacher.codebook().detach().cpu())
    own = student.state_dict()
    shared = {k: v for k, v in teacher.state_dict().items() if k in own}
    missing = set(own) - set(shared)
    assert all(k.startswith("tok_mlp.") for k in missing), missing
    student.load_state_dict({**own, **shared})
    return student.to(teacher.codebook().device)


__all__ = ["ModelArgs", "GPT_PRESETS", "model_args", "GPT", "KVCache", "rotary_table_2d", "apply_rotary",
           "continuous_copy"]
