"""VAR-style next-scale teacher: official layout, multi-scale quantiser, block causality, KV cache, and the
teacher contract DD2 relies on (continuous prefixes, per-scale generator causality, CSD on a VAR teacher)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from onestep.teacher.sampling import SamplingConfig, sample_tokens, teacher_log_probs
from onestep.teacher.var import (OFFICIAL_PHI_INDEX, VAR, VAR_PRESETS, MultiScaleQuantizer, multiscale_inputs,
                                 phi_index_for, var_args)
from test_teacher import assert_official_layout


@pytest.fixture
def tiny_var():
    """A tiny VAR (scales 1, 2, 3: 14 tokens) with random non-zero weights and a random quantiser, in eval mode."""
    torch.manual_seed(0)
    args = var_args("tiny")
    q = MultiScaleQuantizer(args)
    for p in q.parameters():
        torch.nn.init.normal_(p, std=0.5)
    m = VAR(args, q)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.eval(), q


@pytest.mark.parametrize("preset,fixture", [("VAR-d16", "var-d16"), ("VAR-d20", "var-d20"), ("VAR-d24", "var-d24"),
                                            ("VAR-d30", "var-d30")])
def test_official_layout_matches_fixture(preset, fixture):
    m, ref = assert_official_layout(lambda: VAR(VAR_PRESETS[preset]), fixture)
    sd = m.state_dict()
    assert sorted(ref["persistent_buffers_in_state_dict"]) == sorted(k for k, _ in m.named_buffers() if k in sd)


def test_quantizer_layout_matches_the_official_vqvae_quantize_keys():
    _, ref = assert_official_layout(lambda: MultiScaleQuantizer(VAR_PRESETS["VAR-d16"]), "var-vqvae-ch160-v4096-z32",
                                    prefix="quantize.")
    assert list(OFFICIAL_PHI_INDEX) == ref["config"]["phi_index_per_scale"]


def test_phi_index_rule_and_presets():
    assert phi_index_for(6, 4) == VAR_PRESETS["small"].phi_index == (0, 0, 1, 2, 3, 3)
    # the official mapping agrees with the rule away from its two ties (scales 2 and 7)
    rule = phi_index_for(10, 4)
    assert all(rule[k] == OFFICIAL_PHI_INDEX[k] for k in range(10) if k not in (2, 7))
    for name, a in VAR_PRESETS.items():
        assert len(a.ar_steps()) == len(a.patch_nums) and a.ar_steps()[-1][1] == a.seq_len, name
    assert VAR_PRESETS["VAR-d16"].seq_len == 680
    with pytest.raises(ValueError, match="phi_index"):
        var_args("tiny", phi_index=(0, 2, 1))


def test_residual_quantisation_reconstructs_f_hat_from_its_ids(tiny_var):
    """quantize(f) -> ids; the f_hat rebuilt from the ids' code vectors (the teacher's input path) is the
    quantiser's own f_hat, and with more scales the residual shrinks."""
    _, q = tiny_var
    a = q.args
    f = torch.randn(4, a.code_dim, a.latent_size, a.latent_size, generator=torch.Generator().manual_seed(3))
    ids, f_hat = q.quantize(f)
    assert ids.shape == (4, a.seq_len)
    torch.testing.assert_close(q.f_hat(q.embedding.weight[ids]), f_hat, atol=1e-5, rtol=0)
    # the first scale alone: the 1x1 code nearest to the area mean of f
    z0 = f.mean((2, 3))
    assert torch.equal(ids[:, 0], torch.cdist(z0, q.embedding.weight).argmin(1))


def test_scale_inputs_are_area_downsampled_f_hat_by_hand(tiny_var):
    """The input of scale k is area-down(sum_{j<k} phi_j(bicubic-up(x_j))), written out for scales 1 and 2."""
    m, q = tiny_var
    a = m.args
    x = torch.randn(2, a.seq_len, a.code_dim, generator=torch.Generator().manual_seed(5))
    inputs, _ = multiscale_inputs(x, a, m.phi_w, m.phi_b)
    x0 = x[:, :1].transpose(1, 2).reshape(2, -1, 1, 1)
    x1 = x[:, 1:5].transpose(1, 2).reshape(2, -1, 2, 2)
    up0 = F.interpolate(x0, size=(3, 3), mode="bicubic")
    up1 = F.interpolate(x1, size=(3, 3), mode="bicubic")
    r = a.quant_resi

    def phi(j, h):  # phi(h) = (1 - r) h + r conv3x3_j(h), conv j of the quantiser
        return (1 - r) * h + r * q.quant_resi.qresi_ls[j](h)

    f1 = phi(a.phi_index[0], up0)
    f2 = f1 + phi(a.phi_index[1], up1)
    want1 = F.interpolate(f1, size=(2, 2), mode="area").flatten(2).transpose(1, 2)
    want2 = f2.flatten(2).transpose(1, 2)  # the last scale is the latent size: no resampling
    torch.testing.assert_close(inputs, torch.cat([want1, want2], 1), atol=1e-5, rtol=0)


def test_attention_and_adaln_follow_vars_formulas_by_hand():
    """One block written out from the official description: qkv bias [q_bias, 0, v_bias]; q, k l2-normalised per
    head, q times exp(min(s_h, ln 100)), softmax temperature 1; AdaLN chunks gamma1, gamma2, scale1, scale2, shift1,
    shift2; FFN with tanh GELU; and head_nm's chunks (scale, shift)."""
    import math

    from onestep.teacher.var import AdaLNBeforeHead, AdaLNSelfAttn

    torch.manual_seed(0)
    a = var_args("tiny")
    C, H, D = a.embed_dim, a.num_heads, a.embed_dim // a.num_heads
    blk = AdaLNSelfAttn(a)
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        blk.attn.scale_mul_1H11.copy_(torch.tensor([1.0, 6.0]).view(1, H, 1, 1))  # head 1 above ln 100: clamped
    B, L = 2, 5
    x, cond = torch.randn(B, L, C), torch.randn(B, C)
    mask = torch.where(torch.rand(L, L) < 0.3, -torch.inf, 0.0).fill_diagonal_(0.0)
    ada = blk.ada_lin[1](F.silu(cond))
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada[:, i * C:(i + 1) * C, None].transpose(1, 2) for i in range(6))

    def ln(z):
        return F.layer_norm(z, (C,), eps=1e-6)

    def attn(z):
        at = blk.attn
        qkv = z @ at.mat_qkv.weight.T + torch.cat([at.q_bias, torch.zeros(C), at.v_bias])
        q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in qkv.split(C, -1))
        mul = torch.tensor([math.exp(1.0), 100.0]).view(1, H, 1, 1)
        q, k = q / q.norm(dim=-1, keepdim=True) * mul, k / k.norm(dim=-1, keepdim=True)
        y = torch.softmax(q @ k.transpose(-1, -2) + mask, -1) @ v
        return at.proj(y.transpose(1, 2).reshape(B, L, C))

    def ffn(z):
        h = blk.ffn.fc1(z)
        return blk.ffn.fc2(0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))))

    h = x + gamma1 * attn(ln(x) * (1 + scale1) + shift1)
    want = h + gamma2 * ffn(ln(h) * (1 + scale2) + shift2)
    with torch.no_grad():
        torch.testing.assert_close(blk(x, cond, mask[None, None]), want.detach(), atol=1e-5, rtol=1e-5)
        nm = AdaLNBeforeHead(a)
        torch.nn.init.normal_(nm.ada_lin[1].weight, std=0.3)
        sc = nm.ada_lin[1](F.silu(cond))
        torch.testing.assert_close(nm(x, cond), ln(x) * (1 + sc[:, None, :C]) + sc[:, None, C:], atol=1e-5, rtol=1e-5)


def test_features_are_block_causal_over_scales(tiny_var):
    """Rows of scale k see x at scales < k only: every token of their own and later scales may change."""
    m, _ = tiny_var
    steps = m.ar_steps()
    ids = torch.randint(m.vocab_size, (2, m.seq_len), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        h = m.features(ids, labels)
        for k, (a, b) in enumerate(steps):
            ids2 = ids.clone()
            ids2[:, a:] = (ids2[:, a:] + 1) % m.vocab_size  # change scale k and everything after it
            h2 = m.features(ids2, labels)
            assert torch.equal(h[:, :b], h2[:, :b]), k  # rows up to the end of scale k are unchanged
            if b < m.seq_len:
                assert not torch.allclose(h[:, b:], h2[:, b:]), k


def test_kv_cache_logits_equal_full_forward(tiny_var):
    m, _ = tiny_var
    ids = torch.randint(m.vocab_size, (3, m.seq_len), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 5, m.num_classes])  # includes the null class
    x = m.codebook()[ids] + 0.1 * torch.randn(3, m.seq_len, m.code_dim)  # continuous inputs too
    with torch.no_grad():
        for inp in (ids, x):
            full = m(inp, labels)
            cache, steps, out = m.new_cache(3, "cpu"), m.ar_steps(), []
            for k, (a, b) in enumerate(steps):
                prev = None if k == 0 else inp[:, steps[k - 1][0]:steps[k - 1][1]]
                out.append(m.head(m.step(cache, prev, labels, k)))
            torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0)


def test_sampling_with_and_without_cache_agree_with_vars_cfg_ramp(tiny_var):
    m, _ = tiny_var
    labels = torch.tensor([1, 2, 3, 4])
    cfg = SamplingConfig(cfg_scale=2.5, cfg_schedule="linear", temperature=0.9, top_k=8)
    a = sample_tokens(m, labels, cfg, torch.Generator().manual_seed(0), use_cache=True)
    b = sample_tokens(m, labels, cfg, torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(a, b)
    # VAR's ramp with its cfg = 1.5: t = 1.5 k / (K - 1), logits = (1 + t) cond - t uncond
    with torch.no_grad():
        cond, unc = m(a, labels), m(a, torch.full_like(labels, m.num_classes))
    t = torch.cat([torch.full((b_ - a_,), 1.5 * k / 2) for k, (a_, b_) in enumerate(m.ar_steps())])[None, :, None]
    want = torch.log_softmax(((1 + t) * cond - t * unc) / 0.9, -1)
    got = teacher_log_probs(m, a, labels, SamplingConfig(cfg_scale=2.5, cfg_schedule="linear", temperature=0.9))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_class_dropout_only_in_training_mode(tiny_var):
    m, _ = tiny_var
    labels = torch.zeros(1000, dtype=torch.long)
    assert torch.equal(m.eval().drop_labels(labels), labels)
    dropped = (m.train().drop_labels(labels, torch.Generator().manual_seed(0)) == m.num_classes).float().mean()
    m.eval()
    assert abs(dropped.item() - m.args.class_dropout_prob) < 0.04


def test_set_quantizer_rejects_a_mismatched_quantizer(tiny_var):
    m, _ = tiny_var
    with pytest.raises(ValueError, match="codebook_VC"):
        m.set_quantizer(MultiScaleQuantizer(var_args("tiny", vocab_size=32)))
    with pytest.raises(ValueError, match="scales"):
        m.set_quantizer(MultiScaleQuantizer(var_args("tiny", patch_nums=(1, 3), phi_index=(0, 1))))


def test_dd2_runs_on_a_var_teacher_with_per_scale_causality(tiny_var):
    """The DD2 contract on the VAR family: the AR-diffusion model on a VAR backbone is a one-step generator whose
    scale k depends on the noise of scales <= k only (the backbone reads the noise shifted by one SCALE), and the
    CSD generator turn reaches only the generator, with teacher probabilities from the linear CFG ramp."""
    from onestep.dd2.csd import DD2, CSDConfig, CSDSchedule
    from onestep.dd2.model import ARDiffusion, MLPHead

    m, _ = tiny_var
    gen = ARDiffusion(copy.deepcopy(m).train(), MLPHead(m.code_dim, m.feature_dim, 32, 2, time_dim=16))
    for p in gen.head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    eps = torch.randn(2, m.seq_len, m.code_dim, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        x = gen.generate(eps, labels)
        for k, (a, b) in enumerate(m.ar_steps()):
            eps2 = eps.clone()
            eps2[:, b:] += 1.0  # later scales' noise
            assert torch.equal(gen.generate(eps2, labels)[:, :b], x[:, :b]), k
            eps3 = eps.clone()
            eps3[:, a:b] += 1.0  # this scale's noise changes this scale
            assert not torch.allclose(gen.generate(eps3, labels)[:, a:b], x[:, a:b]), k
    sampling = SamplingConfig(cfg_scale=2.0, cfg_schedule="linear")
    dd2 = DD2(gen, copy.deepcopy(gen), m, sampling, CSDConfig(batch_size=2, guidance_steps=1, warmup_steps=0))
    before = [p.detach().clone() for p in m.parameters()]
    sched = CSDSchedule(dd2)
    logs = sched.step(0, lambda n: labels, torch.Generator().manual_seed(1))
    assert not logs["nonfinite"] and logs["score_gap"] >= 0
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # the teacher is frozen
    assert all(p.grad is None for p in m.parameters())


# ---- the multi-scale VQ tokenizer (VQVAE) ---------------------------------------------------------------------
def test_vqvae_official_layout_matches_fixture():
    from onestep.tokenizer.msvq import VQVAE, VQVAE_PRESETS

    assert_official_layout(lambda: VQVAE(VQVAE_PRESETS["vae-ch160"]), "var-vqvae-ch160-v4096-z32")


def test_vqvae_training_pass_straight_through_and_codebook_state():
    """The training pass: f_hat is straight-through (the encoder gets the decoder's gradient), the codebook and the
    phi convs get the |f_hat - sg(f)|^2 gradient; the first training pass initialises the codebook from latents and
    records hits in ema_vocab_hit_SV (the only state: a second pass or a reload does not re-initialise); the ids of
    the training pass are those of encode_ids; decode_ids inverts to images of the data's shape."""
    from onestep.tokenizer.msvq import VQVAE, vqvae_config

    torch.manual_seed(0)
    m = VQVAE(vqvae_config("var-tiny", restart_below=0.0)).train()
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    g = torch.Generator().manual_seed(0)
    before = m.quantize.embedding.weight.detach().clone()
    rec, ids, losses = m(x, g)
    assert not torch.equal(before, m.quantize.embedding.weight)  # initialised from the batch's latents
    assert m.quantize.ema_vocab_hit_SV.sum() == ids.numel()  # the first pass sets the hit counts
    (torch.nn.functional.mse_loss(rec, x) + losses["vq"]).backward()
    for mod in (m.encoder.conv_in, m.quant_conv, m.decoder.conv_out, m.quantize.quant_resi.qresi_ls[0]):
        assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0
    assert m.quantize.embedding.weight.grad.abs().sum() > 0
    init = m.quantize.embedding.weight.detach().clone()
    m.eval()
    assert torch.equal(m.encode_ids(x), ids)
    m.train()
    m(x, g)  # a second pass: no re-initialisation
    assert torch.equal(init, m.quantize.embedding.weight)
    fresh = VQVAE(vqvae_config("var-tiny", restart_below=0.0))
    fresh.load_state_dict(m.state_dict())  # the hit EMA travels in the (official) state_dict
    fresh.train()(x, g)
    assert torch.equal(init, fresh.quantize.embedding.weight)
    assert m.eval().decode_ids(ids).shape == x.shape


def test_vqvae_restarts_dead_codes_at_residuals():
    from onestep.tokenizer.msvq import VQVAE, vqvae_config

    torch.manual_seed(0)
    m = VQVAE(vqvae_config("var-tiny", restart_below=0.5)).train()
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    g = torch.Generator().manual_seed(0)
    m(x, g)  # initialisation step: no restarts
    m.quantize.ema_vocab_hit_SV[:, :5] = 0.0  # five codes unused
    _, _, losses = m(x, g)
    assert losses["restarted"] >= 5
    assert (m.quantize.ema_vocab_hit_SV[:, :5].sum(0) > 0).all()  # restarted codes get a grace EMA


def test_vqvae_codebook_updates_leave_out_nonfinite_latents():
    """A corrupt (NaN) image in the first batch or at a restart: the codebook is written from the finite latents."""
    from onestep.tokenizer.msvq import VQVAE, vqvae_config

    torch.manual_seed(0)
    m = VQVAE(vqvae_config("var-tiny", restart_below=0.5)).train()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    x[1] = float("nan")
    g = torch.Generator().manual_seed(0)
    m(x, g)  # initialisation from the batch's latents
    assert torch.isfinite(m.quantize.embedding.weight).all()
    m.quantize.ema_vocab_hit_SV[:, :5] = 0.0  # five codes unused
    _, _, losses = m(x, g)
    assert losses["restarted"] >= 5 and torch.isfinite(m.quantize.embedding.weight).all()


# ---- VAR-DD: the DD1 generator of the VAR family -----------------------------------------------------------------
@pytest.mark.parametrize("preset,fixture", [("VAR-d16", "dd1-var-d16"), ("VAR-d20", "dd1-var-d20"),
                                            ("VAR-d24", "dd1-var-d24")])
def test_var_dd_layout_matches_fixture(preset, fixture):
    from onestep.dd1.var_model import VARDD1Generator

    assert_official_layout(lambda: VARDD1Generator(VAR_PRESETS[preset], conti_head=True), fixture)


def test_var_dd_sees_strictly_earlier_scales_and_itself(tiny_var):
    """Output token i (scale k) depends on x_i and on the scales before k only; the clean prefix is read from ids,
    the rest from eps; the teacher's weights are copied with the extra slot."""
    from onestep.dd1.model import clean_mask
    from onestep.dd1.var_model import VARDD1Generator

    teacher, _ = tiny_var
    m = VARDD1Generator.from_teacher(teacher).eval()
    assert torch.equal(m.blocks[1].ffn.fc2.weight, teacher.blocks[1].ffn.fc2.weight)
    assert torch.equal(m.lvl_embed.weight[2:], teacher.lvl_embed.weight[1:])
    assert torch.equal(m.lvl_embed.weight[1], teacher.lvl_embed.weight[0])
    assert torch.equal(m.codebook(), teacher.codebook()) and not m.n_d_embed.weight.any()
    with torch.no_grad():
        m.n_d_embed.weight.normal_()
        for lin in m.layerwise_n_d_embed:
            lin.weight.normal_(std=0.1)
    n, V = teacher.seq_len, teacher.vocab_size
    g = torch.Generator().manual_seed(0)
    ids, eps = torch.randint(V, (2, n), generator=g), torch.randn(2, n, teacher.code_dim, generator=g)
    labels = torch.tensor([1, 2])
    clean = clean_mask(torch.tensor([1, 1]), n)  # scale 0 clean
    with torch.no_grad():
        out = m(ids, eps, clean, labels)
        ids2, eps2 = ids.clone(), eps.clone()
        ids2[:, 1:] = (ids2[:, 1:] + 1) % V  # ids at noise positions are ignored
        eps2[:, 0] += 1.0  # eps at clean positions too
        torch.testing.assert_close(m(ids2, eps2, clean, labels), out, atol=1e-5, rtol=0)
        # token 2 sits in scale 1 (positions 1..4): other tokens of scale 1 and later scales do not reach it
        eps3 = eps.clone()
        eps3[:, [1, 3, 4, 6, 10]] += 1.0
        torch.testing.assert_close(m(ids, eps3, clean, labels)[:, 2], out[:, 2], atol=1e-5, rtol=0)
        eps4 = eps.clone()
        eps4[:, 2] += 1.0  # its own noise does
        assert not torch.allclose(m(ids, eps4, clean, labels)[:, 2], out[:, 2])
        # a token of scale 2 sees every token of scale 1
        eps5 = eps.clone()
        eps5[:, 3] += 1.0
        assert not torch.allclose(m(ids, eps5, clean, labels)[:, 7], out[:, 7])


def test_var_dd_trains_on_the_var_flow_map_and_samples_at_scale_boundaries(tiny_var, tmp_path):
    """DD1 on a VAR teacher: the pairs come from the teacher's per-scale flow map, trajectory points and the
    2-step split fall on scale boundaries, and a few steps of training lower the loss."""
    import numpy as np

    from onestep.dd1 import pairs, sampling
    from onestep.flow_map import ODEConfig
    from onestep.dd1.train import TrajectoryConfig, TrajectorySampler, fit
    from onestep.dd1.var_model import VARDD1Generator

    teacher, _ = tiny_var
    cfg = SamplingConfig(cfg_scale=1.5, cfg_schedule="linear")
    pairs.generate_pairs(teacher, 128, tmp_path / "p", shard_size=128, seed=0, sampling_cfg=cfg,
                         ode=ODEConfig(n_steps=16), progress=False, eps_dtype="float32")
    data = pairs.load_pairs(tmp_path / "p")
    model = VARDD1Generator.from_teacher(teacher)
    counts = TrajectorySampler(TrajectoryConfig(p_all_noise=0.0), teacher.seq_len, model.ar_steps())(
        500, torch.Generator().manual_seed(0))
    assert set(counts.tolist()) == {1, 5}  # the starts of scales 1 and 2
    hist = fit(model, data, steps=40, batch_size=32, lr=2e-3, seed=0, ar_steps=model.ar_steps())
    assert np.mean([h["loss"] for h in hist[-5:]]) < 0.8 * np.mean([h["loss"] for h in hist[:5]])
    s = sampling.default_split(teacher.seq_len, model.ar_steps())
    assert s == 5  # round(14 * 80 / 256) = 4 -> the nearest scale boundary
    eps, labels = data["eps"][:4], data["labels"][:4]
    one, two = sampling.one_step(model, eps, labels), sampling.two_step(model, eps, labels)
    assert torch.equal(two[:, :s], one[:, :s])


def test_var_dd_mask_and_flag_embeddings_follow_the_released_rule(tiny_var):
    """attn_bias_for_masking is 0 exactly where level(query) > level(key) or query = key (slot 0 = the class, level
    0; token i of scale k at slot 1 + i, level k + 1); layerwise_n_d_embed[0] is added right before block 0 (a bias
    there equals the same shift of every slot's position embedding)."""
    from onestep.dd1.model import clean_mask
    from onestep.dd1.var_model import VARDD1Generator

    teacher, _ = tiny_var
    m = VARDD1Generator.from_teacher(teacher).eval()
    lvl = [0] + [k + 1 for k, (a, b) in enumerate(teacher.ar_steps()) for _ in range(a, b)]
    L1 = len(lvl)
    want = torch.tensor([[0.0 if (lvl[q] > lvl[k] or q == k) else -float("inf") for k in range(L1)] for q in range(L1)])
    assert torch.equal(m.attn_bias_for_masking[0, 0], want)
    assert m.lvl_1L[0].tolist() == lvl
    g = torch.Generator().manual_seed(1)
    ids, eps = torch.randint(m.vocab_size, (2, m.seq_len), generator=g), torch.randn(2, m.seq_len, m.code_dim, generator=g)
    clean, labels = clean_mask(torch.tensor([5, 1]), m.seq_len), torch.tensor([0, 3])
    b = torch.randn(m.args.embed_dim, generator=g)
    shifted = VARDD1Generator.from_teacher(teacher).eval()
    with torch.no_grad():
        m.layerwise_n_d_embed[0].bias.copy_(b)
        shifted.pos_1LC.add_(b)
        torch.testing.assert_close(m(ids, eps, clean, labels), shifted(ids, eps, clean, labels), atol=1e-5, rtol=1e-5)


# ---- importing published VAR weights ------------------------------------------------------------------------------
def test_import_var_writes_runs_that_reproduce_the_models_and_refuses_other_shapes(tmp_path, capsys):
    """Bare state_dicts as published (.pth) -> tokenizer and teacher runs; the loaded teacher gives the original's
    logits and the tokenizer its ids; a VQVAE file with another scale count of ema_vocab_hit_SV loads (VAR's own
    tolerance); a VAR file of another shape fails, listing the keys."""
    from onestep.cli import main
    from onestep.teacher.load import load_teacher, load_tokenizer
    from onestep.tokenizer.msvq import VQVAE, vqvae_config

    torch.manual_seed(0)
    vae = VQVAE(vqvae_config("var-tiny"))
    for p in vae.parameters():
        torch.nn.init.normal_(p, std=0.2)
    a = vae.config
    teacher = VAR(var_args("tiny", vocab_size=a.codebook_size, code_dim=a.code_dim, patch_nums=a.patch_nums,
                           phi_index=a.phi_index), vae.quantize)
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.2)
    vae_sd = {**vae.state_dict(), "quantize.ema_vocab_hit_SV": torch.ones(7, a.codebook_size)}
    torch.save(vae_sd, tmp_path / "vae.pth")
    torch.save(teacher.state_dict(), tmp_path / "var.pth")
    main(["import-var", "--var", str(tmp_path / "var.pth"), "--vae", str(tmp_path / "vae.pth"), "--out",
          str(tmp_path / "imp"), "--var-preset", "tiny", "--vae-preset", "var-tiny"])
    loaded, tconf, tok = load_teacher(tmp_path / "imp" / "teacher")
    assert tconf["family"] == "var" and tconf["imported_from"]["var"].endswith("var.pth")
    ids = torch.randint(a.codebook_size, (2, teacher.seq_len), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, labels), teacher.eval()(ids, labels), atol=0, rtol=0)
        x = torch.rand(2, 1, 28, 28) * 2 - 1
        assert torch.equal(load_tokenizer(tmp_path / "imp" / "tokenizer")[0].encode_ids(x), vae.eval().encode_ids(x))
    main(["sample", "--run", str(tmp_path / "imp" / "teacher"), "-n", "2", "--out", str(tmp_path / "s"),
          "--cfg-schedule", "linear"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a depth-2 file read as depth 3
        main(["import-var", "--var", str(tmp_path / "var.pth"), "--vae", str(tmp_path / "vae.pth"), "--out",
              str(tmp_path / "bad"), "--var-preset", "small", "--vae-preset", "var-tiny"])
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "missing keys" in err and "blocks.5.attn" in err  # depth 6 vs 2
    assert "shape mismatches" in err and "word_embed.weight: checkpoint [32, 4] vs model [192, 4]" in err
    assert not (tmp_path / "bad" / "teacher").exists()


# ---- the shared machinery on multi-token AR steps, exactly: a grouped tabular teacher ------------------------------
def test_grouped_tabular_teacher_sampling_and_the_dd1_map_are_exact():
    """A tabular teacher with VAR-style AR steps (position 0, then positions 1 and 2 together, conditionally
    independent given position 0): its exact joint is the product of the tables; KV-cache sampling equals
    full teacher forcing; the empirical joints of 20k ancestral samples and of 20k DD1 flow-map outputs (each AR
    step's positions mapped jointly from their own noise) match the exact joint."""
    from onestep.flow_map import map_noise_to_tokens
    from onestep.teacher.tabular import TabularTeacher, empirical_joint, total_variation

    T = TabularTeacher(4, 3, 2, seed=3, step_sizes=(1, 2))
    assert T.ar_steps() == [(0, 1), (1, 3)]
    seqs, joint = T.all_sequences(), T.exact_joint().double()
    t0, t1, t2 = (T._table(i).exp().double() for i in range(3))
    assert t1.shape == t2.shape == (4, 4)  # positions 1 and 2 are conditioned on position 0 only
    by_hand = t0[0, seqs[:, 0]] * t1[seqs[:, 0], seqs[:, 1]] * t2[seqs[:, 0], seqs[:, 2]]
    torch.testing.assert_close(joint, by_hand)
    assert abs(joint.sum().item() - 1) < 1e-6  # float32 tables
    labels = torch.zeros(20000, dtype=torch.long)
    cfg = SamplingConfig()
    a = sample_tokens(T, labels[:64], cfg, torch.Generator().manual_seed(0), use_cache=True)
    b = sample_tokens(T, labels[:64], cfg, torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(a, b)
    ids = sample_tokens(T, labels, cfg, torch.Generator().manual_seed(1))
    assert total_variation(empirical_joint(T.flat_index(ids), len(joint)), joint) < 0.03  # noise ~0.01
    eps = torch.randn(20000, 3, 2, generator=torch.Generator().manual_seed(2))
    mapped = map_noise_to_tokens(T, eps, labels, cfg)
    assert total_variation(empirical_joint(T.flat_index(mapped), len(joint)), joint) < 0.03
    # the map of position 2 reads position 0 only, not position 1 of its own step
    eps2 = eps[:500].clone()
    eps2[:, 1] += 2.0
    assert torch.equal(map_noise_to_tokens(T, eps2, labels[:500], cfg)[:, 2], mapped[:500, 2])


def test_vqvae_ddp_ranks_keep_one_codebook(tmp_path):
    """Under DDP (2 gloo processes, different data and random picks per rank) the codebook initialisation, the hit
    statistics and the dead-code restarts are global: the ranks end with identical weights and buffers."""
    import subprocess
    import sys
    from pathlib import Path

    from test_trainer import ENV, _free_port

    script = Path(__file__).parent / "scripts" / "train_vqvae_ddp.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script), str(tmp_path)]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert a["restarted"] > 0  # the restart path ran
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


def test_mapkd_generator_of_a_var_teacher_reads_the_noise_of_earlier_scales_only(tiny_var):
    """MapKD on a next-scale teacher (families' ``noise_reader``: VAR reads noise as code vectors): the
    logits of scale k do not move with the noise of scale k or later, and do with the noise of earlier scales."""
    from onestep.mapkd.generator import MapKDGenerator

    tiny_var = tiny_var[0]
    gen = MapKDGenerator.from_teacher(tiny_var, family="var").eval()
    n, C = gen.noise_shape
    eps, labels = torch.randn(2, n, C, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1])
    steps = tiny_var.ar_steps()
    with torch.no_grad():
        base = gen.log_probs(eps, labels)
        for k, (a, b) in enumerate(steps):
            moved = eps.clone()
            moved[:, a:b] += 1.0
            out = gen.log_probs(moved, labels)
            assert torch.allclose(out[:, :b], base[:, :b], atol=1e-5), k  # scales <= k do not read scale k's noise
            if b < n:
                assert (out[:, b:] - base[:, b:]).abs().max() > 1e-4, k
    ids = gen.sample_ids(eps, labels, ode_steps=8)
    assert ids.shape == (2, n) and int(ids.max()) < tiny_var.vocab_size
    with pytest.raises(ValueError, match="token table"):  # prefix codes embed ids through the teacher's token table
        MapKDGenerator.from_teacher(tiny_var, family="var", prefix_codes=True)
