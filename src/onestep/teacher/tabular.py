"""A tabular AR teacher whose joint distribution is known exactly (for the exactness tests of DD1 and DD2).

V codes in C dimensions, n positions, one conditional table p(q_i | prefix) per prefix. Tables are drawn
with varied entropy (a per-row temperature), so some conditionals are peaked and some flat. Continuous
inputs are snapped to the nearest code before the table lookup (the teacher conditions on tokens).

``step_sizes`` groups positions into AR steps (default: one position per step, raster-style). With groups
(VAR-style, e.g. (1, 2): position 0, then positions 1 and 2 together) the prefix of position i is every position
of the EARLIER steps, so the positions of one step are conditionally independent given them.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from onestep.teacher.base import ARTeacher


class TabularTeacher(ARTeacher):
    """p(q_1..q_n) = prod_i table_i[q_<i, q_i]; features are the conditional logits themselves."""

    def __init__(self, vocab_size: int = 4, seq_len: int = 3, code_dim: int = 2, seed: int = 0,
                 code_scale: float = 1.0, min_temp: float = 0.3, max_temp: float = 3.0,
                 step_sizes: tuple[int, ...] | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.seq_len, self.vocab_size, self.code_dim = seq_len, vocab_size, code_dim
        sizes = tuple(step_sizes) if step_sizes is not None else (1,) * seq_len
        if sum(sizes) != seq_len or min(sizes) < 1:
            raise ValueError(f"step_sizes {sizes} must be positive and sum to seq_len {seq_len}")
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        self._steps = [(a, a + s) for a, s in zip(starts, sizes)]
        # the number of prefix positions of each position: every position of the earlier AR steps
        self._prefix_len = [a for a, b in self._steps for _ in range(a, b)]
        self.num_classes = 1
        self.feature_dim = vocab_size
        codes = torch.randn(vocab_size, code_dim, generator=g)
        codes = code_scale * codes / codes.norm(dim=-1, keepdim=True)
        self.register_buffer("codes_VC", codes)
        for i in range(seq_len):
            rows = vocab_size ** self._prefix_len[i]
            temp = min_temp + (max_temp - min_temp) * torch.rand(rows, 1, generator=g)
            logits = torch.randn(rows, vocab_size, generator=g) / temp
            self.register_buffer(f"table_{i}", torch.log_softmax(logits, -1))

    def codebook(self) -> Tensor:
        return self.codes_VC

    def ar_steps(self) -> list[tuple[int, int]]:
        return list(self._steps)

    def _table(self, i: int) -> Tensor:
        return getattr(self, f"table_{i}")

    def _ids(self, x: Tensor) -> Tensor:
        return x if x.dtype == torch.long else self.nearest_ids(x)

    def _row_index(self, ids: Tensor, i: int) -> Tensor:
        """Row of position i's table: the ids of its prefix (the positions of the earlier AR steps) in base V;
        i = seq_len gives the flat index of the whole sequence."""
        idx = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        for j in range(self._prefix_len[i] if i < self.seq_len else self.seq_len):
            idx = idx * self.vocab_size + ids[:, j]
        return idx

    def features(self, x: Tensor, labels: Tensor) -> Tensor:
        ids = self._ids(x)
        return torch.stack([self._table(i)[self._row_index(ids, i)] for i in range(self.seq_len)], 1)

    def head(self, h: Tensor) -> Tensor:
        return h

    def new_cache(self, batch, device, dtype=torch.float32):
        return {"ids": torch.zeros(batch, self.seq_len, dtype=torch.long, device=device)}

    def step(self, cache, x_prev, labels, step_index):
        if step_index > 0:
            a, b = self._steps[step_index - 1]
            cache["ids"][:, a:b] = self._ids(x_prev)
        a, b = self._steps[step_index]
        return torch.stack([self._table(i)[self._row_index(cache["ids"], i)] for i in range(a, b)], 1)

    # ---- exact quantities ----------------------------------------------------------------------
    def all_sequences(self) -> Tensor:
        """Every sequence of ids (V^n, n), in lexicographic order (= the flat index of :meth:`exact_joint`)."""
        return torch.tensor(list(itertools.product(range(self.vocab_size), repeat=self.seq_len)))

    def exact_joint(self) -> Tensor:
        """(V^n,) exact probabilities of :meth:`all_sequences`."""
        seqs = self.all_sequences().to(self.codes_VC.device)
        logp = self.features(seqs, torch.zeros(len(seqs), dtype=torch.long)).gather(-1, seqs[..., None])
        return logp.squeeze(-1).sum(-1).exp()

    def marginals(self) -> Tensor:
        """(n, V) exact per-position marginals (what the onestep* baseline samples from independently)."""
        seqs, joint = self.all_sequences(), self.exact_joint().cpu()
        return torch.stack([torch.zeros(self.vocab_size).index_add_(0, seqs[:, i], joint)
                            for i in range(self.seq_len)])

    def flat_index(self, ids: Tensor) -> Tensor:
        """Sequence ids (B, n) -> index into :meth:`exact_joint`."""
        return self._row_index(ids, self.seq_len)


def empirical_joint(flat_idx: Tensor, size: int) -> Tensor:
    """Histogram of flat sequence indices, normalised to a distribution."""
    return torch.bincount(flat_idx.cpu(), minlength=size).double() / flat_idx.numel()


def total_variation(p: Tensor, q: Tensor) -> float:
    return 0.5 * (p.double().cpu() - q.double().cpu()).abs().sum().item()
