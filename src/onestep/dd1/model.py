"""The DD1 generator (method.md section 2.3): a copy of the teacher's LlamaGen GPT reading trajectory points.

A trajectory point is X_k = (q_1..q_{k-1}, eps_k..eps_n) (method.md, 1-based k = 1..n+1). In code we
use the 0-based **number of clean positions** m = k - 1 in [0, n]: positions i < m hold the flow map's
tokens q_i, positions i >= m hold the original noise eps_i. The generator predicts the flow map's
final token of EVERY position.

Input (a length n + 1 sequence, like the teacher's, with the published DD1 layout):

- position 0: the class embedding (``cls_embedding``, copied from the teacher; null row kept);
- position 1 + i: ``tok_embeddings(q_i)`` (copied teacher table) where i is clean, a learned projection
  ``noise_proj(eps_i)`` (Linear C -> dim) where i is noise (``input_mode="table"``, default); or
  ``input_mode="linear"``: one ``tok_embeddings = Linear(C, dim)`` with bias applied to code vectors
  and to noise alike, as in the released LlamaGen-DD generator (initialised by least squares to
  reproduce the teacher's table on the codebook);
- plus ``n_d_embed`` (2 rows; zero-initialised, so clean positions start exactly at the teacher's
  embedding): row 1 for the class position and clean-prefix tokens, row 0 for noise positions.

Aligned output, no next-token shift: the output at sequence position 1 + i (the class position is
dropped) gives the logits of token i, through the teacher's ``norm`` and ``output`` head.

Attention: CAUSAL (the teacher's own mask). With aligned input, output i sees the class, the clean
prefix / noise at positions <= i, and nothing later. That is exactly what it needs: the flow map's
token i is a deterministic function of (class, eps_1..eps_i) (each position's ODE starts from its own
eps_i under p_i, which depends on tokens < i, themselves functions of eps_<i), and for a trajectory
point the clean prefix is a function of the same noise. Later noise is independent of token i, so a
bidirectional mask would only add inputs the target does not depend on, and would break the
teacher's pretrained causal attention pattern the initialisation relies on. Causal + aligned is
therefore sufficient and consistent (it is also the released LlamaGen-DD architecture); VAR-DD's
"strictly earlier levels plus itself" mask is the same rule for multi-token AR steps.

Training target: cross-entropy of the logits against the map's tokens (``onestep.dd1.train``). The released
generators' continuous head ``final_layer_conti`` (:class:`ContiHead`, reading the last block's output before the
final RMSNorm) is built with ``conti_head=True``, for layout parity with the released files (``input_mode="linear",
conti_head=True`` is the LlamaGen-DD state_dict key for key, tests/test_dd1.py) and for :meth:`continuous`;
training uses the logits.
"""
from __future__ import annotations


import torch
from torch import Tensor, nn

from onestep.teacher.llamagen import GPT, ModelArgs, rotary_table_2d

__all__ = ["DD1Generator", "ContiHead", "clean_mask"]


class ContiHead(nn.Module):
    """``final_layer_conti`` of the released DD1 generators: (shift, scale) = scale_shift_table rows + the class
    embedding; Linear(LN(h) (1 + scale) + shift) -> continuous tokens (code_dim). LN has no affine, eps 1e-6."""

    def __init__(self, dim: int, code_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.linear = nn.Linear(dim, code_dim)

    def forward(self, h: Tensor, cond_BD: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + cond_BD[:, None]).unbind(1)
        return self.linear(self.norm_final(h) * (1 + scale[:, None]) + shift[:, None])


def clean_mask(n_clean: Tensor, n: int) -> Tensor:
    """(B,) numbers of clean positions -> (B, n) bool, True at positions i < n_clean (data)."""
    return torch.arange(n, device=n_clean.device)[None] < n_clean[:, None]


class DD1Generator(nn.Module):
    """Trajectory point (ids, eps, clean mask, labels) -> logits (B, n, V) of the map's final tokens."""

    def __init__(self, args: ModelArgs, codebook: Tensor | None = None, input_mode: str = "table",
                 conti_head: bool = False):
        super().__init__()
        if input_mode not in ("table", "linear"):
            raise ValueError(f"input_mode must be 'table' or 'linear', got {input_mode!r}")
        # a GPT of the same shape provides the modules (names and order follow the teacher / released layout)
        g = GPT(args, codebook)
        self.args, self.input_mode, self.conti_head = args, input_mode, conti_head
        self.seq_len, self.vocab_size, self.code_dim, self.num_classes = args.seq_len, args.vocab_size, args.code_dim, args.num_classes
        self.cls_embedding = g.cls_embedding
        if input_mode == "table":
            if args.input_embedding == "table":
                self.tok_embeddings = g.tok_embeddings
            else:
                self.tok_mlp = g.tok_mlp  # continuous-input teacher (DD2 stage 0): data = tok_mlp(code)
            self.noise_proj = nn.Linear(args.code_dim, args.dim)
        else:
            self.tok_embeddings = nn.Linear(args.code_dim, args.dim)
        self.layers, self.norm, self.output = g.layers, g.norm, g.output
        if conti_head:
            self.final_layer_conti = ContiHead(args.dim, args.code_dim)
        self.n_d_embed = nn.Embedding(2, args.dim)
        self.register_buffer("rope", rotary_table_2d(args.grid_h, args.grid_w, args.head_dim, args.rope_base),
                             persistent=False)
        self.register_buffer("codebook_VC", g.codebook_VC.clone(), persistent=False)
        nn.init.zeros_(self.n_d_embed.weight)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher: GPT, input_mode: str = "table", noise_scale: float | None = None,
                     conti_head: bool = False) -> "DD1Generator":
        """Copy the teacher's weights; the noise projection is drawn so that its outputs have the RMS of
        the teacher's token embeddings (``noise_scale`` overrides that target RMS)."""
        m = cls(teacher.args, teacher.codebook(), input_mode, conti_head)
        m.to(next(teacher.parameters()).device)
        own = m.state_dict()
        src = {k: v for k, v in teacher.state_dict().items() if k in own and own[k].shape == v.shape}
        if input_mode == "linear":
            src.pop("tok_embeddings.weight", None)
        # Only the DD1-specific modules may stay at their fresh initialisation: anything else is a bug.
        fresh = {k for k in own if k not in src}
        allowed = ("n_d_embed.", "noise_proj.", "final_layer_conti.",
                   "tok_embeddings." if input_mode == "linear" else "n_d_embed.")
        unexpected = sorted(k for k in fresh if not k.startswith(allowed))
        if unexpected:
            raise ValueError(f"teacher weights do not cover DD1 generator keys: {unexpected}")
        m.load_state_dict({**own, **src}, strict=True)
        with torch.no_grad():
            cb = teacher.codebook().float()
            emb = teacher.embed_tokens(torch.arange(teacher.vocab_size, device=cb.device)[None])[0].float()
            rms = emb.pow(2).mean().sqrt().item() if noise_scale is None else noise_scale
            if input_mode == "table":
                nn.init.normal_(m.noise_proj.weight, std=rms / teacher.code_dim ** 0.5)
                nn.init.zeros_(m.noise_proj.bias)
            else:  # least squares: [c, 1] @ [W^T; b] ~= emb(j)
                A = torch.cat([cb, torch.ones(len(cb), 1, device=cb.device)], 1)
                sol = torch.linalg.lstsq(A.cpu().double(), emb.cpu().double()).solution.float()
                m.tok_embeddings.weight.copy_(sol[:-1].t())
                m.tok_embeddings.bias.copy_(sol[-1])
        return m

    def config(self) -> dict:
        out = {"args": self.args.to_dict(), "input_mode": self.input_mode}
        return {**out, "conti_head": True} if self.conti_head else out  # (runs made before the option: no key)

    @classmethod
    def from_config(cls, cfg: dict, codebook: Tensor | None = None) -> "DD1Generator":
        return cls(ModelArgs.from_dict(cfg["args"]), codebook, cfg["input_mode"], cfg.get("conti_head", False))

    def codebook(self) -> Tensor:
        return self.codebook_VC

    def ar_steps(self) -> list[tuple[int, int]]:
        """One token per AR step (the teacher's raster order)."""
        return [(i, i + 1) for i in range(self.seq_len)]

    # ---- forward --------------------------------------------------------------------------------
    def embed(self, ids: Tensor, eps: Tensor, clean: Tensor) -> Tensor:
        """(B, n) ids, (B, n, C) noise, (B, n) bool clean mask -> (B, n, dim) input embeddings (no flags)."""
        dt = self.n_d_embed.weight.dtype
        if self.input_mode == "linear":
            x = torch.where(clean[..., None], self.codebook_VC[ids].to(eps.dtype), eps)
            return self.tok_embeddings(x.to(dt))
        data = self.tok_embeddings(ids) if hasattr(self, "tok_embeddings") else self.tok_mlp(self.codebook_VC[ids].to(dt))
        return torch.where(clean[..., None], data, self.noise_proj(eps.to(dt)))

    def hidden(self, ids: Tensor, eps: Tensor, clean: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(the last block's output over the n + 1 slots (B, n + 1, dim), before the final norm; the class
        embedding (B, dim))."""
        B, n = ids.shape
        cond = self.cls_embedding(labels)
        h = torch.cat([cond[:, None], self.embed(ids, eps, clean)], dim=1)
        flags = torch.cat([torch.ones(B, 1, dtype=torch.long, device=ids.device), clean.long()], dim=1)
        h = h + self.n_d_embed(flags)
        rope = self.rope[: n + 1]
        for layer in self.layers:
            h = layer(h, rope)
        return h, cond

    def forward(self, ids: Tensor, eps: Tensor, clean: Tensor, labels: Tensor) -> Tensor:
        """Logits (B, n, V) of the final token of every position for the trajectory point (ids where
        ``clean``, eps elsewhere). ``ids`` at noise positions are ignored (any valid id)."""
        h, _ = self.hidden(ids, eps, clean, labels)
        return self.output(self.norm(h[:, 1:]))

    def predict(self, ids: Tensor, eps: Tensor, clean: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """(logits (B, n, V), the continuous head's tokens (B, n, code_dim) or None without the head), one pass."""
        h, cond = self.hidden(ids, eps, clean, labels)
        conti = self.final_layer_conti(h, cond)[:, 1:] if self.conti_head else None
        return self.output(self.norm(h[:, 1:])), conti

    def continuous(self, ids: Tensor, eps: Tensor, clean: Tensor, labels: Tensor) -> Tensor:
        """The released continuous head's tokens (B, n, code_dim) (needs ``conti_head=True``)."""
        if not self.conti_head:
            raise ValueError("this DD1 generator was built without the continuous head (conti_head=False)")
        h, cond = self.hidden(ids, eps, clean, labels)
        return self.final_layer_conti(h, cond)[:, 1:]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
