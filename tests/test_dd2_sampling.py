"""DD2 sampling (paper Alg. 4) and the stage-1 Euler sampler on tiny random models."""
from dataclasses import replace

import torch

from onestep.dd2.model import ARDiffusion, MLPHead
from onestep.dd2.sampling import multi_step, one_step
from onestep.dd2.tune import euler_sample
from onestep.teacher.base import nearest_code
from onestep.teacher.llamagen import GPT
from onestep.teacher.sampling import SamplingConfig


def _models(tiny_gpt):
    torch.manual_seed(1)
    bb = GPT(replace(tiny_gpt.args, input_embedding="mlp"), codebook=tiny_gpt.codebook())
    head = MLPHead(bb.code_dim, bb.feature_dim, width=16, depth=1, time_dim=8)
    for p in head.parameters():  # non-zero head so the outputs depend on the inputs
        torch.nn.init.normal_(p, std=0.2)
    return ARDiffusion(bb, head).eval(), tiny_gpt


def test_multi_step_keeps_one_step_prefix_and_resamples_the_tail(tiny_gpt):
    gen, teacher = _models(tiny_gpt)
    labels = torch.arange(6) % teacher.num_classes
    cfg = SamplingConfig(cfg_scale=2.0)
    one = nearest_code(one_step(gen, labels, torch.Generator().manual_seed(3)), teacher.codebook())
    L = teacher.seq_len
    for k in (1, 2, 3):
        ids = multi_step(gen, teacher, labels, cfg, k, torch.Generator().manual_seed(3))
        assert ids.shape == (6, L)
        assert torch.equal(ids[:, : L - (k - 1)], one[:, : L - (k - 1)])  # same noise -> same one-step part
    # the teacher's re-sampled tail follows the teacher: with top-k 1 it is the teacher's argmax given the prefix
    greedy = SamplingConfig(cfg_scale=2.0, top_k=1)
    ids = multi_step(gen, teacher, labels, greedy, 3, torch.Generator().manual_seed(3))
    from onestep.teacher.sampling import teacher_log_probs

    lp = teacher_log_probs(teacher, ids, labels, greedy)
    assert torch.equal(ids[:, L - 2:], lp[:, L - 2:].argmax(-1))


def test_one_step_is_one_forward_pass_and_causal(tiny_gpt):
    """Position i of G(eps) depends on eps_<=i only (backbone shifted by one, head on eps_i)."""
    gen, _ = _models(tiny_gpt)
    L, C = gen.backbone.seq_len, gen.backbone.code_dim
    eps = torch.randn(2, L, C)
    labels = torch.tensor([0, 1])
    x = gen.generate(eps, labels)
    eps2 = eps.clone()
    eps2[:, 5:] += 1.0
    x2 = gen.generate(eps2, labels)
    assert torch.allclose(x[:, :5], x2[:, :5], atol=1e-6) and not torch.allclose(x[:, 5:], x2[:, 5:])


def test_euler_sampler_matches_teacher_forcing_features(tiny_gpt):
    """The KV-cache Euler sampler's last Euler step equals one recomputed with full teacher-forcing features."""
    gen, _ = _models(tiny_gpt)
    labels = torch.tensor([0, 3])
    x = euler_sample(gen, labels, torch.Generator().manual_seed(0), euler_steps=4)
    assert x.shape == (2, gen.backbone.seq_len, gen.backbone.code_dim) and torch.isfinite(x).all()
    # replay: the same noise draws and full-sequence features of the sampled prefix give the same result
    g = torch.Generator().manual_seed(0)
    f = gen.features(x, labels)
    ts = torch.linspace(1.0, 0.0, 5)
    replay = torch.empty_like(x)
    for i in range(gen.backbone.seq_len):
        z = torch.randn(2, 1, x.shape[-1], generator=g)
        for j in range(4):
            z = z - (ts[j] - ts[j + 1]) * gen.velocity(z, ts[j].expand(2, 1), f[:, i:i + 1])
        replay[:, i:i + 1] = z
    assert torch.allclose(replay, x, atol=1e-4)
