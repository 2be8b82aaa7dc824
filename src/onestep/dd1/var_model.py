"""The DD1 generator for VAR-style teachers (VAR-DD, method.md section 2.3), with the released layout.

The same contract as :class:`onestep.dd1.model.DD1Generator`: a trajectory point (ids where ``clean``, the
original noise eps elsewhere, clean positions a prefix of whole scales) -> logits of the flow map's final token at
EVERY position. Layout as in ``tests/fixtures/checkpoints/dd1-var-d*.json`` (checked by a test):

- the teacher's modules and names, with one extra 1x1 level in front: internal scales (1,) + patch_nums, so
  ``pos_1LC`` has L + 1 rows and ``lvl_embed`` K + 1; slot 0 holds the class embedding plus ``pos_start``;
- input, ALIGNED (no next-scale shift): token i's own vector (its code if clean, eps_i if noise) through
  ``word_embed`` at slot 1 + i; the output at slot 1 + i is token i;
- attention ``attn_bias_for_masking``: a slot sees the slots of strictly earlier levels and itself. Token i's
  map output depends on eps_i and on the scales before its own (its scale's tokens are conditionally independent
  given them), so this is the rule the target needs;
- ``n_d_embed`` (row 1: clean slots and the class slot, row 0: noise) is added to the input, and
  ``layerwise_n_d_embed[i]`` (Linear C -> C) of it before block i and (index depth) before the heads;
- logits through the teacher's ``head_nm`` / ``head``; the released continuous head ``final_layer_conti`` is built
  only with ``conti_head=True`` (the official presets, for layout parity); training uses the logits.

:meth:`VARDD1Generator.from_teacher` copies the teacher's weights (level / position 0 to 0, teacher k to k + 1,
the new slot 1 from the teacher's first token); ``n_d_embed`` and ``layerwise_n_d_embed`` start at zero, so the
network starts as the teacher's transformer read in the aligned way.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from onestep.dd1.model import ContiHead
from onestep.teacher.var import AdaLNBeforeHead, AdaLNSelfAttn, VAR, VARArgs

__all__ = ["VARDD1Generator"]


class VARDD1Generator(nn.Module):
    """Trajectory point (ids, eps, clean mask, labels) -> logits (B, L, V) of the map's final tokens."""

    def __init__(self, args: VARArgs, conti_head: bool = False):
        super().__init__()
        self.args, self.conti_head = args, conti_head
        C, L = args.embed_dim, args.seq_len
        self.seq_len, self.vocab_size, self.code_dim, self.num_classes = L, args.vocab_size, args.code_dim, args.num_classes
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L + 1, C))
        lvl = torch.cat([torch.zeros(1, dtype=torch.long)] +
                        [torch.full((p * p,), k + 1) for k, p in enumerate(args.patch_nums)]).view(1, L + 1)
        self.register_buffer("lvl_1L", lvl)
        earlier = lvl.view(-1, 1) > lvl.view(1, -1)
        mask = torch.where(earlier | torch.eye(L + 1, dtype=torch.bool), 0.0, -torch.inf).view(1, 1, L + 1, L + 1)
        self.register_buffer("attn_bias_for_masking", mask.contiguous())
        self.word_embed = nn.Linear(args.code_dim, C)
        self.class_emb = nn.Embedding(args.num_classes + 1, C)
        self.lvl_embed = nn.Embedding(len(args.patch_nums) + 1, C)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(args) for _ in range(args.depth))
        self.head_nm = AdaLNBeforeHead(args)
        self.head = nn.Linear(C, args.vocab_size)
        self.n_d_embed = nn.Embedding(2, C)
        self.layerwise_n_d_embed = nn.ModuleList(nn.Linear(C, C) for _ in range(args.depth + 1))
        if conti_head:
            self.final_layer_conti = ContiHead(args.embed_dim, args.code_dim, args.norm_eps)
        self.register_buffer("codebook_VC", torch.zeros(args.vocab_size, args.code_dim), persistent=False)
        nn.init.zeros_(self.n_d_embed.weight)
        for lin in self.layerwise_n_d_embed:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def ar_steps(self) -> list[tuple[int, int]]:
        return self.args.ar_steps()

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher: VAR, conti_head: bool = False) -> "VARDD1Generator":
        """Copy every teacher weight (lvl_embed / pos_1LC re-indexed for the extra slot); the DD modules start at 0."""
        m = cls(teacher.args, conti_head).to(next(teacher.parameters()).device)
        own, src = m.state_dict(), dict(teacher.state_dict())
        with torch.no_grad():
            lvl, pos = src.pop("lvl_embed.weight"), src.pop("pos_1LC")
            own["lvl_embed.weight"].copy_(torch.cat([lvl[:1], lvl[:1], lvl[1:]]))
            own["pos_1LC"].copy_(torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], 1))
            for k in ("lvl_1L", "attn_bias_for_masking"):  # the DD structure, not the teacher's
                src.pop(k)
            unknown = sorted(k for k in src if k not in own or own[k].shape != src[k].shape)
            if unknown:
                raise ValueError(f"teacher weights do not fit the VAR-DD generator: {unknown}")
            for k, v in src.items():
                own[k].copy_(v)
            m.codebook_VC.copy_(teacher.codebook())
        m.load_state_dict(own, strict=True)
        return m

    def config(self) -> dict:
        return {"family": "var", "args": self.args.to_dict(), "conti_head": self.conti_head}

    @classmethod
    def from_config(cls, cfg: dict, codebook: Tensor | None = None) -> "VARDD1Generator":
        m = cls(VARArgs.from_dict(cfg["args"]), cfg.get("conti_head", False))
        if codebook is not None:
            m.codebook_VC.copy_(codebook)
        return m

    def codebook(self) -> Tensor:
        return self.codebook_VC

    # ---- forward --------------------------------------------------------------------------------
    def hidden(self, ids: Tensor, eps: Tensor, clean: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(final hidden states of the L + 1 slots (B, L + 1, C), class condition (B, C))."""
        B = ids.shape[0]
        dt = self.word_embed.weight.dtype
        x = torch.where(clean[..., None], self.codebook_VC[ids].to(eps.dtype), eps).to(dt)
        cond = self.class_emb(labels)
        h = torch.cat([cond[:, None] + self.pos_start, self.word_embed(x)], 1)
        h = h + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        flags = torch.cat([torch.ones(B, 1, dtype=torch.long, device=ids.device), clean.long()], 1)
        nd = self.n_d_embed(flags)
        h = h + nd
        bias = self.attn_bias_for_masking.to(h.dtype)
        for i, blk in enumerate(self.blocks):
            h = blk(h + self.layerwise_n_d_embed[i](nd), cond, bias)
        return h + self.layerwise_n_d_embed[self.args.depth](nd), cond

    def forward(self, ids: Tensor, eps: Tensor, clean: Tensor, labels: Tensor) -> Tensor:
        """Logits (B, L, V) of the final token of every position for the trajectory point (ids where ``clean``,
        eps elsewhere)."""
        h, cond = self.hidden(ids, eps, clean, labels)
        return self.head(self.head_nm(h, cond))[:, 1:]

    def predict(self, ids: Tensor, eps: Tensor, clean: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """(logits (B, L, V), the continuous head's tokens (B, L, C_vae) or None without the head), one pass."""
        h, cond = self.hidden(ids, eps, clean, labels)
        conti = self.final_layer_conti(h, cond)[:, 1:] if self.conti_head else None
        return self.head(self.head_nm(h, cond))[:, 1:], conti

    def continuous(self, ids: Tensor, eps: Tensor, clean: Tensor, labels: Tensor) -> Tensor:
        """The released continuous head's tokens (B, L, C_vae) (needs ``conti_head=True``)."""
        if not self.conti_head:
            raise ValueError("this VAR-DD generator was built without the continuous head (conti_head=False)")
        h, cond = self.hidden(ids, eps, clean, labels)
        return self.final_layer_conti(h, cond)[:, 1:]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
