"""flow.py: closed-form score/velocity of a Dirac mixture under RectFlow (method.md section 1)."""
import pytest
import torch

from onestep import flow


def _setup(V=6, C=3, N=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cb = torch.nn.functional.normalize(torch.randn(V, C, generator=g, dtype=dtype), dim=-1)
    log_p = torch.log_softmax(3 * torch.randn(N, V, generator=g, dtype=dtype), -1)
    log_p[0, :2] = float("-inf")  # truncated codes (top-k) must get zero weight
    log_p[0] = torch.log_softmax(log_p[0], -1)
    return cb, log_p, g


@pytest.mark.parametrize("t", [1e-3, 1e-2, 0.1, 0.5, 0.9, 1.0 - 1e-6])
def test_score_is_gradient_of_log_density(t):
    cb, log_p, g = _setup()
    for _ in range(3):
        x0 = cb[torch.randint(len(cb), (log_p.shape[0],), generator=g)]
        x = ((1 - t) * x0 + t * torch.randn(x0.shape, generator=g, dtype=x0.dtype)).requires_grad_()
        (grad,) = torch.autograd.grad(flow.log_density(x, t, log_p, cb).sum(), x)
        s = flow.score(x, t, log_p, cb)
        assert torch.allclose(s, grad, atol=1e-5 * max(1.0, grad.abs().max().item()), rtol=1e-5)


def test_score_float32_matches_float64_over_t_range():
    cb, log_p, g = _setup()
    for t in torch.logspace(-3, 0, 10).tolist():
        t = min(t, 1 - 1e-4)
        x = (1 - t) * cb[:5] + t * torch.randn(5, cb.shape[1], generator=g, dtype=cb.dtype)
        v64 = flow.velocity(x, t, log_p, cb)
        v32 = flow.velocity(x.float(), t, log_p.float(), cb.float())
        assert torch.isfinite(v32).all()
        # x0_hat is a convex combination of codes: check it in float32 to a tolerance relative to 1/t
        assert (v32.double() - v64).abs().max() * t < 1e-3


def test_truncated_codes_get_zero_weight():
    cb, log_p, g = _setup()
    x = torch.randn(5, cb.shape[1], generator=g, dtype=cb.dtype)
    w = flow.log_weights(x, 0.5, log_p, cb).exp()
    assert (w[0, :2] == 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(5, dtype=w.dtype))


def test_monte_carlo_denoising_target_matches_x0_hat():
    """E[x_0 | x_t] estimated by rejection-free importance sampling over (x_0, eps) pairs equals x0_hat."""
    cb, log_p, g = _setup(V=4, C=2, N=1)
    t = 0.6
    x = torch.tensor([[0.3, -0.2]], dtype=cb.dtype)
    # Sample x_0 ~ p, weight by the Gaussian likelihood of x given x_0: self-normalised estimate.
    n = 400_000
    j = torch.multinomial(log_p[0].exp(), n, replacement=True, generator=g)
    lw = -((x - (1 - t) * cb[j]) ** 2).sum(-1) / (2 * t * t)
    w = torch.softmax(lw, 0)
    mc = (w[:, None] * cb[j]).sum(0)
    assert torch.allclose(mc, flow.denoise(x, t, log_p, cb)[0], atol=5e-3)


def test_velocity_score_conversions_roundtrip():
    cb, log_p, g = _setup()
    x = torch.randn(5, cb.shape[1], generator=g, dtype=cb.dtype)
    t = torch.rand(5, generator=g, dtype=cb.dtype) * 0.9 + 0.05
    v = flow.velocity(x, t, log_p, cb)
    s = flow.score(x, t, log_p, cb)
    assert torch.allclose(flow.score_to_velocity(s, x, t), v, atol=1e-10)
    assert torch.allclose(flow.velocity_to_score(v, x, t), s, atol=1e-10)
    assert torch.allclose(flow.velocity_to_x0(v, x, t), flow.denoise(x, t, log_p, cb), atol=1e-10)


def test_mixture_denoiser_of_samples_is_the_code_denoiser_when_samples_repeat_the_codes():
    """flow.mixture_denoise with M samples that repeat code j count_j times = flow.denoise with p = count / M."""
    cb, _, g = _setup(V=5, C=3, dtype=torch.float32)
    counts = torch.tensor([1, 3, 0, 4, 8])
    samples = torch.cat([cb[j].expand(int(c), 3) for j, c in enumerate(counts)])  # (M, C)
    M, S = int(counts.sum()), (2, 4)
    samples = samples[:, None, None, :].expand(M, *S, 3)
    x = torch.randn(3, *S, 3, generator=g)
    t = 0.05 + 0.9 * torch.rand(3, *S, generator=g)
    log_p = torch.log(counts.float() / M).expand(3, *S, 5)
    assert torch.allclose(flow.mixture_denoise(x, t, samples), flow.denoise(x, t, log_p, cb), atol=1e-5)
