"""DD2 networks (method.md section 3): the AR-diffusion model, used as generator and as guidance network.

``ARDiffusion`` = a causal backbone (the teacher's transformer; feature row i sees only positions < i)
+ a MAR-style MLP head taking (q_i^t, t, f_i) and predicting the RectFlow velocity v (alpha_t = 1 - t,
sigma_t = t). Denoised estimate: x0 = q_t - t v.

As the generator, the backbone reads the noise sequence (row i sees eps_<i: "shifted by one", since
``features`` is causal) and the head reads eps_i at t = 1; the output is one Euler step from t = 1 to 0,
x_i = eps_i - v_i, for every position in ONE forward pass.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from onestep import rng


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as diffusion models do), (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1) if dim % 2 else emb


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """LayerNorm (no affine) -> adaLN modulation -> MLP -> gated residual (MAR's SimpleMLPAdaLN block)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class MLPHead(nn.Module):
    """Velocity head v(q_t, t, f): residual MLP with adaptive LayerNorm conditioned on f + emb(t).

    Zero-initialised adaLN gates and output layer (as in MAR), so a fresh head predicts v = 0.
    ``input_gain`` scales x_t before the input projection (1 for the image runs; the tabular exactness
    run uses 5 so that the one-step generator can learn sharp noise partitions quickly).
    """

    def __init__(self, code_dim: int, feature_dim: int, width: int = 256, depth: int = 3, time_dim: int = 128,
                 input_gain: float = 1.0):
        super().__init__()
        self.code_dim, self.feature_dim, self.width, self.depth, self.time_dim = code_dim, feature_dim, width, depth, time_dim
        self.input_gain = input_gain
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_proj = nn.Linear(feature_dim, width)
        self.input_proj = nn.Linear(code_dim, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final = nn.Linear(width, code_dim)
        self._init()

    def _init(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for b in self.blocks:
            nn.init.zeros_(b.ada[-1].weight)
            nn.init.zeros_(b.ada[-1].bias)
        nn.init.zeros_(self.final_ada[-1].weight)
        nn.init.zeros_(self.final_ada[-1].bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def config(self) -> dict:
        return {"code_dim": self.code_dim, "feature_dim": self.feature_dim, "width": self.width, "depth": self.depth,
                "time_dim": self.time_dim, "input_gain": self.input_gain}

    @torch.no_grad()
    def set_input_gain(self, gain: float) -> None:
        """Re-parameterise to ``input_gain = gain`` WITHOUT changing the function (the input projection's
        weight is divided by the gain ratio): only the optimisation geometry changes (Adam moves the
        effective input weights ~gain^2 times faster)."""
        self.input_proj.weight.mul_(self.input_gain / gain)
        self.input_gain = gain

    def forward(self, x_t: Tensor, t: Tensor, f: Tensor) -> Tensor:
        """x_t (..., C), t broadcastable to x_t.shape[:-1], f (..., D) -> v (..., C)."""
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).expand(x_t.shape[:-1])
        c = self.time_mlp(timestep_embedding(t, self.time_dim)) + self.cond_proj(f.float())
        h = self.input_proj(x_t.float() * self.input_gain)
        for b in self.blocks:
            h = b(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.final(modulate(self.final_norm(h), shift, scale))


class ARDiffusion(nn.Module):
    """Causal backbone + MLP velocity head (the AR-diffusion model, generator and guidance network).

    ``noise_stream`` (generators only; backbones whose ``features`` take ``extra``): a linear map of eps_i, zero at the
    start, added to the backbone's input row i in :meth:`generate`, so that eps_i reaches every layer of the backbone
    and not only the head (as in DD1, whose transformer reads the noise of every position). Zero-initialised, it
    changes nothing until trained."""

    def __init__(self, backbone: nn.Module, head: MLPHead, generator_t: float = 1.0, noise_stream: bool = False):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.generator_t = generator_t
        self.noise_stream = None
        if noise_stream:
            self.noise_stream = nn.Linear(head.code_dim, backbone.feature_dim)
            nn.init.zeros_(self.noise_stream.weight)
            nn.init.zeros_(self.noise_stream.bias)

    @property
    def noise_shape(self) -> tuple[int, int]:
        """The generator's noise per sample: (n, C)."""
        return self.backbone.seq_len, self.backbone.code_dim

    def features(self, x: Tensor, labels: Tensor) -> Tensor:
        """f (B, n, D): row i depends on x_<i (continuous vectors) and the label."""
        return self.backbone.features(x, labels)

    def velocity(self, x_t: Tensor, t: Tensor, f: Tensor) -> Tensor:
        return self.head(x_t, t, f)

    def denoise(self, x_t: Tensor, t: Tensor, f: Tensor) -> Tensor:
        """x0 = x_t - t v."""
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).expand(x_t.shape[:-1])[..., None]
        return x_t - t * self.velocity(x_t, t[..., 0], f)

    def generate(self, eps: Tensor, labels: Tensor) -> Tensor:
        """One-step generator: x_i = eps_i - v(eps_i, 1, f_i(eps_<i)), all positions in one pass.

        With ``generator_t`` = s < 1 the head reads the noise as a point of time s, x_s = s eps_i, and
        the output is its denoised estimate x_i = x_s - s v(x_s, s, f_i) (s = 1: the paper's form)."""
        s = self.generator_t
        if self.noise_stream is None:
            f = self.features(eps, labels)
        else:
            f = self.backbone.features(eps, labels, extra=self.noise_stream(eps.float()))
        return self.denoise(eps * s, s, f)

    def generate_and_resample(self, eps: Tensor, labels: Tensor, m: int,
                              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The one-step sample x (B, n, C) of :meth:`generate` and, without a graph, m more draws of every position
        with the prefix noise kept: y (m, B, n, C) with y_i = head(eps'_i, f_i(eps_<i)) for fresh eps'_i.

        Since row i of the backbone reads eps_<i only, the prefix x_<i is a function of eps_<i, and y_i are m exact
        samples of the generator's conditional distribution of x_i given its own prefix x_<i (the distribution the
        guidance network psi learns by DSM), for the backbone's cost of one pass."""
        if self.noise_stream is not None:
            raise ValueError("resampling a position needs a backbone that reads eps_<i only: the noise stream feeds "
                             "eps_i into the backbone")
        s = self.generator_t
        f = self.features(eps, labels)
        x = self.denoise(eps * s, s, f)
        with torch.no_grad():
            eps_m = rng.randn((m, *eps.shape), generator, eps.device)
            y = self.denoise(eps_m * s, s, f.detach().expand(m, *f.shape))
        return x, y

    def forward(self, eps: Tensor, labels: Tensor) -> Tensor:
        return self.generate(eps, labels)
