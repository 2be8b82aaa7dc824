"""The teacher interface shared by every AR family (LlamaGen raster, VAR next-scale, tabular test teachers).

DD1 and DD2 talk to teachers only through :class:`ARTeacher`, so a new family plugs in without touching
them. Vocabulary (one name per concept, used everywhere in onestep):

- ``n`` / ``seq_len``: number of token positions of one image; tokens are indexed 0..n-1.
- ``V`` / ``vocab_size``: codebook size;  ``C`` / ``code_dim``: dimension of one code vector.
- ``codebook``: (V, C) tensor of code vectors in the space the flow of method.md section 1 lives in
  (LlamaGen: the l2-normalised VQ codebook).
- AR step: a group of positions the teacher emits together (LlamaGen: one position; VAR: one scale).
  ``ar_steps()`` lists them in order as half-open ``(start, end)`` ranges that tile 0..n.
- ``labels``: class labels (B,) int64; ``num_classes`` is the null (unconditional) label used for CFG.
- A *sequence input* ``x`` is either token ids ``(B, n)`` int64 or continuous code vectors ``(B, n, C)``
  float. Teachers that embed ids with a table map a continuous input to its nearest code first;
  continuous-input teachers (DD2 stage 0) embed the vectors directly.
- ``features(x, labels)`` -> ``h_BND``: the backbone's hidden state used to predict position i; it
  depends only on ``labels`` and on x at positions of strictly earlier AR steps (teacher forcing).
- ``head(h_BND)`` -> ``logits_BNV``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from onestep import rng
from onestep.tokenizer.quant import nearest_code  # noqa: F401  (the codebook lookup, tokenizer side)


class ARTeacher(nn.Module):
    """Abstract AR teacher. Subclasses set ``seq_len, vocab_size, code_dim, num_classes, feature_dim``."""

    seq_len: int
    vocab_size: int
    code_dim: int
    num_classes: int
    feature_dim: int

    # ---- structure -------------------------------------------------------------------------
    def ar_steps(self) -> list[tuple[int, int]]:
        """Half-open position ranges of the AR steps, in generation order (default: one token per step)."""
        return [(i, i + 1) for i in range(self.seq_len)]

    def codebook(self) -> Tensor:
        """(V, C) code vectors the tokens stand for."""
        raise NotImplementedError

    # ---- teacher forcing ---------------------------------------------------------------------
    def features(self, x: Tensor, labels: Tensor) -> Tensor:
        """(B, n, D) hidden states; row i sees only ``labels`` and x at strictly earlier AR steps."""
        raise NotImplementedError

    def head(self, h: Tensor) -> Tensor:
        """(B, ..., D) -> (B, ..., V) logits."""
        raise NotImplementedError

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forcing logits (B, n, V)."""
        return self.head(self.features(x, labels))

    # ---- KV-cache sampling -------------------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Any:
        """Fresh per-sampling-run cache for ``batch`` sequences."""
        raise NotImplementedError

    def step(self, cache: Any, x_prev: Tensor | None, labels: Tensor, step_index: int) -> Tensor:
        """Features (B, k, D) for the positions of AR step ``step_index``.

        ``x_prev`` holds the tokens of step ``step_index - 1`` (ids (B, k') or vectors (B, k', C)),
        ``None`` for step 0. Calls must come in order 0, 1, 2, ... on one cache.
        """
        raise NotImplementedError

    def prefill(self, cache: Any, x: Tensor, labels: Tensor, start: int, end: int) -> None:
        """Feed AR steps [start, end) whose tokens are known (``x`` (B, n) ids or (B, n, C) vectors) into the cache.
        This default calls :meth:`step` once per step; a teacher that can do it in one pass overrides it."""
        steps = self.ar_steps()
        for k in range(start, end):
            self.step(cache, None if k == 0 else x[:, steps[k - 1][0]:steps[k - 1][1]], labels, k)

    # ---- training ----------------------------------------------------------------------------
    def drop_labels(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Classifier-free-guidance label dropout (to the null class ``num_classes``): only in training mode, with
        probability ``args.class_dropout_prob`` (0 for a teacher without ``args``); never in an eval-mode forward."""
        p = getattr(getattr(self, "args", None), "class_dropout_prob", 0.0)
        if not self.training or p <= 0:
            return labels
        drop = rng.rand(labels.shape, generator, labels.device) < p
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    # ---- helpers -----------------------------------------------------------------------------
    def ids_to_codes(self, ids: Tensor) -> Tensor:
        """(B, n) ids -> (B, n, C) code vectors."""
        return self.codebook()[ids]

    def nearest_ids(self, x: Tensor) -> Tensor:
        """(B, n, C) vectors -> (B, n) ids of the nearest code (squared Euclidean distance)."""
        return nearest_code(x, self.codebook())
