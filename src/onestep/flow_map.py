"""The closed-form noise-to-token map (method.md sections 1 and 2.1): DD1's pairs and sampling, and MapKD's tokens.

For one position with teacher probabilities p over the codes c_j, integrating the RectFlow ODE

    dx/dt = v(x, t) = (x - x0_hat(x, t)) / t          (``onestep.flow.velocity``)

from t = 1 (x = eps ~ N(0, I)) to t = 0 lands on a code, and the push-forward of N(0, I) is exactly p.
A whole sequence of noise eps_1..eps_n maps to tokens by doing this position after position in the
teacher's AR order, p_i coming from the teacher given the tokens already mapped (the teacher's own
stepping loop :func:`onestep.teacher.sampling.step_through`: KV cache, the SAME
:class:`~onestep.teacher.sampling.SamplingConfig` as sampling, CFG batch doubling [cond; null]).

Solver (documented choice; the DD1 paper only hints at "a DPM-solver style ODE with ~200 steps")
-------------------------------------------------------------------------------------------------
The ODE is integrated in the exponential-integrator ("data prediction") coordinates of DPM-Solver /
DDIM. With s = (1 - t) / t (= sqrt(SNR), s = 0 at t = 1, s -> inf at t = 0) and y = x / t,

    dy/ds = x0_hat(x = y / (1 + s), t = 1 / (1 + s)),

an exact rewrite of dx/dt = v (d(x/t)/dt = -x0_hat / t^2 and ds = d(1/t)). The right-hand side is a
convex combination of codes, bounded for all s, so there is no 1/t singularity and no stiffness. In
these coordinates

- ``solver="euler"`` is exactly the Euler step of dx/dt = v in t (= the DDIM step, 1 NFE per step);
- ``solver="heun"`` is the trapezoidal predictor-corrector (2nd order, 2 NFE per step);
- ``solver="ab2"`` (default) is the variable-step 2nd-order Adams-Bashforth multistep method (1 NFE
  per step, first step Euler): DPM-Solver++(2M)-like, with x0_hat extrapolated linearly in s rather
  than in log s;
- ``solver="ab2log"`` is the same multistep method with x0_hat extrapolated linearly in log s, the
  variable on which the log-SNR grid is uniform (DPM-Solver++(2M)'s choice): with
  x0_hat(s) ~ d_i + (d_i - d_{i-1}) (log s - log s_i) / (log s_i - log s_{i-1}) on [s_i, s_{i+1}],

      y_{i+1} = y_i + h_i d_i + (d_i - d_{i-1}) (s_{i+1} (log s_{i+1} - log s_i) - h_i) / (log s_i - log s_{i-1}),

  exact integration of that interpolant (1 NFE per step). Its first step, from s = 0, is the second-order
  Taylor step y + h x0_hat(0) + h^2 / 2 x0_hat'(0) with the slope in closed form, x0_hat'(0) = Cov_p(c) y
  (the posterior logits are linear in s at s = 0), and its second step is ``ab2``'s. It is MapKD's map
  (:data:`onestep.mapkd.generator.ODE_SOLVER`), on the grid :func:`codebook_grid` sizes to the codebook: on the
  Fashion-MNIST generator's conditionals, 16 steps put 1.0% of the tokens off a converged reference where ``ab2``
  on [0.05, 500] puts 3.3% at 32 steps and 15% at 16 (``benchmarks/ode_solvers.py``); on the tabular ladder's
  rungs the Taylor first step is what brings the push-forward to the sampling floor (without it, the Euler step from
  s = 0 to s_min leaves a bias of TV 0.005 on a 4-code mixture).

Time grid (``grid="logsnr"``, default): s_0 = 0 (t = 1, x = eps), then s geometric from ``s_min`` to
``s_max`` (uniform in log-SNR). The posterior logits are log p_j + s y.c_j - s^2 |c_j|^2 / 2, so two
codes at distance d are resolved around s ~ 1/d and the log-probabilities matter until s^2 d^2 ~
|log p_i - log p_j|: the decision scales are spread over decades and a log-uniform grid puts the same
number of steps on every decade, whatever the codebook's spacing. ``grid="uniform_t"`` (uniform in t,
the naive choice) is kept for comparison: it is good for well-separated codes in 8-D but 5-10x worse
for dense codes, whose decisions happen at large s. The ODE "ends on codes": after the last step the
point is snapped to the code with the largest posterior weight at s_max (the stats report how far the
final denoised mean x0_hat(s_max), i.e. the Euler step to t = 0, is from that code; it is ~0 unless
two codes are closer than ~10 / s_max = 0.02). Truncated codes (p_j = 0, log p = -inf) have weight
exactly 0 at every step, so the map never lands on them.

Defaults (``ODEConfig()``: AB2, 200 steps = 200 NFE, s in [0.05, 500], float32), measured on the
project's Fashion-MNIST teacher (n = 49, V = 512 l2-normalised 8-D codes, nearest-neighbour distances
0.13-0.43, CFG 2.0), 1000 sequences against a converged reference (AB2, 512 steps, float64):
sequences with any token different from the reference: AB2-64 20%, AB2-128 4.8%, AB2-200 1.1%,
AB2-256 0.4%; Heun-64 (128 NFE) 15.7%; Euler-128 53% (Euler also biases toward likely tokens: mean
log p of the chosen tokens -2.605 vs the teacher's -H = -2.625; AB2-200: -2.6385 vs -2.6405).
AB2-512 in float32 equals the float64 reference exactly. Push-forward tests against p: see
tests/test_dd1.py (chi-square p > 1e-3 in 2-D and 8-D, peaked and top-k-truncated p).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from onestep.teacher.base import ARTeacher
from onestep.teacher.sampling import SamplingConfig, step_through

__all__ = ["ODEConfig", "time_grid", "codebook_grid", "ode_map", "map_noise_to_tokens"]


@dataclass(frozen=True)
class ODEConfig:
    """How the per-position ODE is solved (see the module docstring).

    solver: "ab2" (1 NFE/step, 2nd order multistep), "ab2log" (the same, extrapolating in log s), "heun"
        (2 NFE/step) or "euler" (1 NFE/step, = DDIM).
    n_steps: number of intervals (NFE = n_steps, or 2 n_steps for Heun).
    grid: "logsnr" (s = (1-t)/t geometric in [s_min, s_max] after s = 0) or "uniform_t".
    dtype: "float32" or "float64" for the ODE state and the posterior weights.
    snap_tol: distance from x0_hat(s_max) to the snapped code above which the snap counts as "moved".
    """

    solver: str = "ab2"
    n_steps: int = 200
    grid: str = "logsnr"
    s_min: float = 5e-2
    s_max: float = 5e2
    dtype: str = "float32"
    snap_tol: float = 1e-3

    def __post_init__(self):
        if self.solver not in ("heun", "euler", "ab2", "ab2log"):
            raise ValueError(f"solver must be 'heun', 'euler', 'ab2' or 'ab2log', got {self.solver!r}")
        if self.grid not in ("logsnr", "uniform_t"):
            raise ValueError(f"grid must be 'logsnr' or 'uniform_t', got {self.grid!r}")
        if self.n_steps < 2:
            raise ValueError("n_steps must be >= 2")
        if not 0 < self.s_min < self.s_max:
            raise ValueError("need 0 < s_min < s_max")
        if self.dtype not in ("float32", "float64"):
            raise ValueError("dtype must be 'float32' or 'float64'")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    @property
    def nfe(self) -> int:
        return self.n_steps * (2 if self.solver == "heun" else 1)

    def to_dict(self) -> dict:
        return asdict(self)


def time_grid(cfg: ODEConfig) -> Tensor:
    """Increasing s = (1 - t) / t values (float64), starting at 0 (t = 1) and ending at ``s_max``."""
    if cfg.grid == "logsnr":
        rest = torch.logspace(math.log10(cfg.s_min), math.log10(cfg.s_max), cfg.n_steps, dtype=torch.float64)
        return torch.cat([torch.zeros(1, dtype=torch.float64), rest])
    t_end = 1.0 / (1.0 + cfg.s_max)
    t = torch.linspace(1.0, t_end, cfg.n_steps + 1, dtype=torch.float64)
    return (1.0 - t) / t


@torch.no_grad()
def codebook_grid(codebook: Tensor) -> tuple[float, float]:
    """(s_min, s_max) of a log-SNR grid sized to a codebook: 0.6 / its diameter and 5 / its closest pair's distance.

    The posterior leaves the prior once s |y| |c_i - c_j| ~ 1 for the farthest codes, and two codes at distance d
    are decided once s^2 d^2 / 2 exceeds their log-probability gap (s = 5 / d covers gaps up to 12.5). On the
    Fashion-MNIST codebook (512 l2-normalised 8-D codes, closest pair 0.134) this gives [0.3, 37.4]. Duplicate
    codes are skipped (no grid separates them).
    """
    cb = codebook.detach().double().cpu()
    duplicate = 1e-9 * 2 * cb.norm(dim=-1).max().item()  # distances below this (a diameter bound) are duplicates
    d_min, diameter = math.inf, 0.0
    chunk = max(1, 2 ** 24 // cb.numel())  # rows per block of differences (<= 128 MiB)
    for a in range(0, cb.shape[0], chunk):
        d = (cb[a:a + chunk, None, :] - cb[None, :, :]).norm(dim=-1)  # exact, no |a|^2 + |b|^2 - 2ab rounding
        diameter = max(diameter, d.max().item())
        d = d[d > duplicate]
        if d.numel():
            d_min = min(d_min, d.min().item())
    if not math.isfinite(d_min) or diameter <= 0:
        raise ValueError("codebook_grid needs at least two distinct codes")
    return 0.6 / diameter, 5.0 / d_min


class _Posterior:
    """x0_hat in the (y, s) coordinates, fused for speed: the posterior logits of section 1 are

        log w_j = log p_j + s y.c_j - s^2 |c_j|^2 / 2  (+ a constant over j),

    one ``addmm`` of the augmented state [s y, -s^2 / 2] against [c_j, |c_j|^2], a softmax and one
    matmul per evaluation (``onestep.flow.denoise`` at x = y t, t = 1 / (1 + s), without its extra passes).
    On a codebook of equal norms (LlamaGen's l2-normalised codes) the |c_j|^2 term is a constant and the
    logits are one ``addmm`` of y itself.

    With ``support`` (indices (N, K), padding mask (N, K)) the rows see only those codes (``codebook[support]``,
    log p given over them, (N, K)): the per-row products become batched ones over K codes instead of V. The codes
    are stored (N, C, K), so that both products are batched products of one row (the mean's against the
    transposed view).
    """

    def __init__(self, log_p: Tensor, codebook: Tensor, dtype: torch.dtype,
                 support: tuple[Tensor, Tensor] | None = None):
        self.cb = codebook.to(dtype)                                                     # (V, C)
        n2 = self.cb.pow(2).sum(-1)
        self.equal_norms = bool((n2.max() - n2.min()) <= 1e-6 * n2.max())
        self.support = None if support is None else support[0]
        if support is None:
            self.log_p = log_p.to(dtype)                                                 # (N, V)
            self.cb_t = self.cb.t().contiguous()                                         # (C, V)
            self.cb_aug = None if self.equal_norms else torch.cat([self.cb, n2[:, None]], 1).t().contiguous()
        else:
            support, pad = support
            self.log_p = log_p.to(dtype) if pad is None else log_p.to(dtype).masked_fill(pad, -math.inf)  # (N, K)
            N, K = support.shape
            self.rows_t = self.cb.t().index_select(1, support.reshape(-1)).reshape(-1, N, K).transpose(0, 1) \
                .contiguous()                                                            # (N, C, K)
            self.n2 = None if self.equal_norms else n2[support]                          # (N, K)
        self.logits = None

    def codes(self, ids: Tensor) -> Tensor:
        """The code vectors of ``ids`` (indices into this posterior's codes: the support where there is one)."""
        if self.support is None:
            return self.cb[ids]
        return self.rows_t.gather(2, ids[:, None, None].expand(-1, self.rows_t.shape[1], 1))[:, :, 0]

    def posterior_logits(self, y: Tensor, s: float) -> Tensor:
        if self.support is not None:
            dots = torch.bmm(y[:, None, :], self.rows_t)[:, 0]                          # (N, K)
            self.logits = self.log_p + s * dots if self.equal_norms else \
                self.log_p + s * dots - (0.5 * s * s) * self.n2
        elif self.equal_norms:
            self.logits = torch.addmm(self.log_p, y, self.cb_t, alpha=s)
        else:
            y_aug = torch.cat([y * s, y.new_full((y.shape[0], 1), -0.5 * s * s)], 1)
            self.logits = torch.addmm(self.log_p, y_aug, self.cb_aug)
        return self.logits

    def mean(self, w: Tensor) -> Tensor:
        """sum_j w_j c_j for weights w (N, V or K)."""
        if self.support is not None:
            return torch.bmm(w[:, None, :], self.rows_t.transpose(1, 2))[:, 0]
        return F.linear(w, self.cb_t)  # linear() against the (C, V) layout: softmax @ cb, faster for C << V

    def __call__(self, y: Tensor, s: float) -> Tensor:
        return self.mean(torch.softmax(self.posterior_logits(y, s), dim=-1))

    def slope_at_zero(self, y: Tensor) -> Tensor:
        """d x0_hat / ds at s = 0: Cov_p(c) y = sum_j p_j c_j (c_j . y) - mu (mu . y), mu = sum_j p_j c_j."""
        p = torch.softmax(self.log_p, dim=-1)
        mu = self.mean(p)
        dots = torch.bmm(y[:, None, :], self.rows_t)[:, 0] if self.support is not None else y @ self.cb_t
        return self.mean(p * dots) - mu * (mu * y).sum(-1, keepdim=True)


# The posterior's (rows, codes) matrices are streamed several times per evaluation; solving the ODE a block of rows
# at a time keeps a block's matrices in the cache (about 1 MiB of float32 each; on a support, its (rows, codes, C)
# code vectors): at 16,384 codes and 2,048 rows, 3.3x faster than all rows at once, with the same ids (every row is
# independent).
BLOCK_ELEMENTS = 2 ** 18
# Where every row gives non-zero probability to at most this fraction of the codebook (a top-k rule), the rows are
# solved on their own codes only (a truncated code has weight exactly 0 at every step, so the ids are the same).
SUPPORT_FRACTION = 0.125


def _support(log_p: Tensor) -> tuple[Tensor, Tensor] | None:
    """The codes each row gives log p > -inf, as (N, K) indices in increasing order with K the largest row's count,
    and the (N, K) mask of a shorter row's padding; None where K is above ``SUPPORT_FRACTION`` of the codebook."""
    N, V = log_p.shape
    kept = log_p != -math.inf
    count = kept.view(torch.uint8).sum(-1, dtype=torch.int64)  # 20x faster than a bool sum over the rows
    k = int(count.max()) if N else 0
    if k > SUPPORT_FRACTION * V:
        return None
    row, code = kept.nonzero(as_tuple=True)  # row-major: each row's codes in increasing order
    slot = torch.arange(row.shape[0], device=log_p.device) - (count.cumsum(0) - count)[row]
    idx = torch.zeros(N, k, dtype=torch.long, device=log_p.device)
    idx[row, slot] = code
    return idx, torch.arange(k, device=log_p.device) >= count[:, None]


def _solve(y: Tensor, x0: _Posterior, s: list[float], cfg: ODEConfig, return_stats: bool):
    """Integrate one block of rows (module docstring): the ids (N,) and, with ``return_stats``, the snap distances."""
    d = x0(y, s[0])
    d_prev, h_prev = None, None
    for i in range(len(s) - 1):
        h = s[i + 1] - s[i]
        if cfg.solver == "ab2log" and i >= 2:  # x0_hat linear in log s
            lam, lam_prev = math.log(s[i + 1] / s[i]), math.log(s[i] / s[i - 1])
            y_next = y + h * d + (d - d_prev) * ((s[i + 1] * lam - h) / lam_prev)
        elif cfg.solver == "ab2log" and i == 0:  # from s = 0: second-order Taylor, x0_hat'(0) in closed form
            y_next = y + h * d + (0.5 * h * h) * x0.slope_at_zero(y)
        elif cfg.solver in ("ab2", "ab2log") and d_prev is not None:  # variable-step Adams-Bashforth 2 (1 NFE/step)
            r = h / (2 * h_prev)
            y_next = y + h * ((1 + r) * d - r * d_prev)
        else:
            y_next = y + h * d
        if cfg.solver == "heun":
            y_next = y + 0.5 * h * (d + x0(y_next, s[i + 1]))
        d_prev, h_prev = d, h
        if i == len(s) - 2 and not return_stats:  # at s_max only the posterior's argmax is needed
            y = y_next
            x0.posterior_logits(y, s[-1])
            break
        y, d = y_next, x0(y_next, s[i + 1])
    ids = x0.logits.argmax(-1)  # the posterior at s_max (the last evaluation)
    snap = (d - x0.codes(ids)).norm(dim=-1) if return_stats else None
    if x0.support is not None:
        ids = x0.support.gather(1, ids[:, None])[:, 0]
    return ids, snap


@torch.no_grad()
def ode_map(eps: Tensor, log_p: Tensor, codebook: Tensor, cfg: ODEConfig | None = None,
            return_stats: bool = False, support: Tensor | None = None):
    """Map noise eps (..., C) to code ids (...) under probabilities ``log_p`` (..., V) (-inf = truncated).

    With ``support`` (..., K) code indices, ``log_p`` (..., K) gives the log-probabilities of those codes only
    (every other code truncated): a top-k rule's values and indices, solved on the K codes directly (or, where K is
    above ``SUPPORT_FRACTION`` of the codebook, scattered into a dense solve).

    Integrates dx/dt = v from t = 1 to t = 0 (module docstring), then snaps to the code with the
    largest posterior weight. Every leading position is independent (vectorised, in blocks of rows, on the
    codes the rows can reach where that is a small part of the codebook: ``BLOCK_ELEMENTS``,
    ``SUPPORT_FRACTION``). With ``return_stats`` also returns {"snap_dist": (...) distance from x0_hat(s_max)
    to the chosen code}.
    """
    cfg = cfg or ODEConfig()
    dt = cfg.torch_dtype
    lead = eps.shape[:-1]
    y = eps.reshape(-1, eps.shape[-1]).to(dt)
    log_p = log_p.reshape(-1, log_p.shape[-1])
    codebook = codebook.to(device=eps.device)
    s = time_grid(cfg).tolist()
    if support is not None and support.shape[-1] > SUPPORT_FRACTION * codebook.shape[0]:  # cheaper dense
        log_p = torch.full((log_p.shape[0], codebook.shape[0]), -math.inf, dtype=log_p.dtype, device=log_p.device) \
            .scatter_(1, support.reshape(-1, support.shape[-1]), log_p)
        support = None
    elif support is not None:
        support = (support.reshape(-1, support.shape[-1]), None)
    else:
        support = _support(log_p)
        if support is not None:
            log_p = log_p.gather(1, support[0])
    per_row = log_p.shape[-1] if support is None else max(1, support[0].shape[-1]) * codebook.shape[-1]
    rows = max(1, BLOCK_ELEMENTS // per_row)
    ids, snaps = [], []
    for a in range(0, y.shape[0], rows):
        sup = None if support is None else tuple(None if t is None else t[a:a + rows] for t in support)
        x0 = _Posterior(log_p[a:a + rows], codebook, dt, sup)
        ids_b, snap_b = _solve(y[a:a + rows], x0, s, cfg, return_stats)
        ids.append(ids_b)
        snaps.append(snap_b)
    ids = torch.cat(ids).reshape(lead) if ids else y.new_zeros(lead, dtype=torch.long)
    if not return_stats:
        return ids
    return ids, {"snap_dist": torch.cat(snaps).reshape(lead) if snaps else y.new_zeros(lead)}


@torch.no_grad()
def map_noise_to_tokens(teacher: ARTeacher, eps: Tensor, labels: Tensor, sampling_cfg: SamplingConfig,
                        ode: ODEConfig | None = None, prefix: Tensor | None = None, start_step: int = 0,
                        end_step: int | None = None, return_stats: bool = False):
    """DD1's map: noise (B, n, C) -> token ids (B, n), following the teacher's AR order.

    AR steps before ``start_step`` keep the ids of ``prefix`` (fed to the teacher, not mapped); steps
    from ``end_step`` on are left as they are in ``prefix`` (zeros without one) and never computed.
    Deterministic in ``eps`` and independent of how sequences are batched (up to float rounding of the
    teacher's batched matmuls, which moves a point only if it sits on a decision boundary).
    With ``return_stats``: also {"snap_moved": fraction of mapped positions whose x0_hat(s_max) is more
    than ``ode.snap_tol`` from the snapped code, "snap_max": the largest such distance}.
    """
    ode = ode or ODEConfig()
    B, n = eps.shape[:2]
    steps = teacher.ar_steps()
    ids = torch.zeros(B, n, dtype=torch.long, device=eps.device) if prefix is None else prefix.clone()
    cb = teacher.codebook()
    st = {"moved": 0, "total": 0, "max": 0.0}

    def to_code(k: int, log_p: Tensor) -> Tensor:
        a, b = steps[k]
        if not return_stats:
            return ode_map(eps[:, a:b], log_p, cb, ode)
        q, s = ode_map(eps[:, a:b], log_p, cb, ode, return_stats=True)
        st["moved"] += int((s["snap_dist"] > ode.snap_tol).sum())
        st["total"] += s["snap_dist"].numel()
        st["max"] = max(st["max"], float(s["snap_dist"].max()))
        return q

    step_through(teacher, ids, labels, sampling_cfg, to_code, start_step, end_step)
    if return_stats:
        return ids, {"snap_moved": st["moved"] / max(st["total"], 1), "snap_max": st["max"], "mapped": st["total"]}
    return ids
