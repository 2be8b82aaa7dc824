"""VQ tokenizer: shapes, id/code consistency, normalised codebook, training, dead-code restart, gradients."""
import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from onestep.tokenizer.train import VQ_TRAIN_PRESETS, evaluate_tokenizer, tokenizer_loss
from onestep.tokenizer.vq import VQ_PRESETS, VQConfig, VQModel, vq_config


def _images(n: int = 16, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (blurred noise), (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size // 4, size // 4, generator=g)
    return torch.tanh(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))


def _tiny(**kw) -> VQModel:
    torch.manual_seed(0)
    return VQModel(vq_config("tiny", **kw))


def test_presets_and_config_roundtrip():
    assert set(VQ_PRESETS) >= {"tiny", "small", "default"} and set(VQ_TRAIN_PRESETS) >= {"tiny", "small", "default"}
    d = VQ_PRESETS["default"]
    assert d.image_size // d.downsample == 7 and 256 <= d.codebook_size <= 512
    cfg = VQConfig(**VQ_PRESETS["default"].to_dict())  # JSON-style dict (lists) -> same config
    assert cfg == VQ_PRESETS["default"]
    with pytest.raises(ValueError, match="divisible"):
        vq_config("default", image_size=30)


def test_round_trip_shapes():
    m = _tiny().eval()
    x = _images(3)
    assert m.grid == (4, 4) and m.seq_len == 16
    z_q, ids, losses = m.encode(x)
    assert z_q.shape == (3, 4, 4, 4) and ids.shape == (3, 16) and ids.dtype == torch.int64
    assert {"vq", "commit"} <= set(losses)
    rec = m.decode_ids(m.encode_ids(x))
    assert rec.shape == x.shape and rec.min() >= -1 and rec.max() <= 1
    recon, ids2, _ = m(x)
    assert recon.shape == x.shape and torch.equal(ids, ids2)
    # raster order: ids[b, i * w + j] is the code of latent cell (i, j)
    cb = m.codebook_vectors()
    assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(3, 16, -1), cb[ids], atol=1e-6)


def test_decode_ids_matches_decode_codes_and_codebook_is_normalised():
    m = _tiny().eval()
    with torch.no_grad():
        m.quantize.embedding.weight.mul_(torch.rand(32, 1) * 5 + 0.1)  # rows of arbitrary norms
    cb = m.codebook_vectors()
    assert cb.shape == (32, 4)
    assert torch.allclose(cb.norm(dim=-1), torch.ones(32), atol=1e-5)
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(m.decode_ids(ids), m.decode_codes(cb[ids]), atol=1e-6)
        # encode_ids of a decoded image's codes picks the nearest (max-cosine) codebook row
        z = F.normalize(m.quant_conv(m.encoder(_images(2))).permute(0, 2, 3, 1).reshape(2, 16, 4), dim=-1)
        assert torch.equal(m.encode_ids(_images(2)), (z @ cb.t()).argmax(-1))
    with pytest.raises(ValueError):
        m.decode_codes(torch.zeros(2, 15, 4))


def test_straight_through_gradient_reaches_encoder():
    m = _tiny().train()
    x = _images(4)
    recon, _, _ = m(x, generator=torch.Generator().manual_seed(0))
    F.mse_loss(recon, x).backward()  # pixel loss only: gradient must pass the quantizer straight through
    for p in (m.encoder.conv_in.weight, m.quant_conv.weight, m.decoder.conv_out.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert m.quantize.embedding.weight.grad is None or m.quantize.embedding.weight.grad.abs().sum() == 0


def test_training_steps_reduce_loss_and_evaluate():
    m = _tiny().train()
    x = _images(16)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, logs = tokenizer_loss(m, x, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert {"loss", "rec_mse", "psnr_db", "vq", "commit", "usage", "restarted"} <= set(logs)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    ev = evaluate_tokenizer(m, ((x + 1) * 127.5).round().to(torch.uint8), batch_size=10)
    assert set(ev) >= {"psnr_db", "codebook_usage", "rec_loss"} and 0 < ev["codebook_usage"] <= 1
    assert ev["psnr_db"] > 10 and m.training  # mode restored


def test_kmeans_init_on_first_training_batch():
    m = _tiny().train()
    assert int(m.quantize.initialized) == 0
    before = m.quantize.embedding.weight.detach().clone()
    m(_images(8), generator=torch.Generator().manual_seed(0))
    assert int(m.quantize.initialized) == 1 and not torch.equal(before, m.quantize.embedding.weight)
    m.eval()(_images(8))  # eval forward: no codebook updates
    assert int(m.quantize.unused_steps.max()) <= 1


def _dead_code_setup(restart_after: int):
    m = _tiny(restart_after=restart_after).train()
    x = _images(16)
    g = torch.Generator().manual_seed(0)
    m(x, generator=g)  # k-means init
    with torch.no_grad():  # codes 0..15 collapse onto one vector far from the data: at most one can be used
        z = F.normalize(m.quant_conv(m.encoder(x)).permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
        m.quantize.embedding.weight[:16] = -F.normalize(z.mean(0), dim=0)
    return m, x, g


def test_dead_code_restart_revives_unused_codes():
    m, x, g = _dead_code_setup(restart_after=3)
    dead = torch.arange(16)
    m.eval()
    assert len(set(m.encode_ids(x).unique().tolist()) & set(dead.tolist())) <= 1
    m.train()
    for _ in range(3):  # unused for restart_after steps -> restarted on the next training forward
        _, _, losses = m(x, generator=g)
    # at most one of the collapsed codes is used (see above); the others are unused for restart_after steps
    assert int((m.quantize.unused_steps[dead] >= 3).sum()) >= 15 and int(m.quantize.restarts) == 0
    _, _, losses = m(x, generator=g)
    assert float(losses["restarted"]) >= 15 and int(m.quantize.restarts) >= 15
    m.eval()
    revived = set(m.encode_ids(x).unique().tolist()) & set(dead.tolist())
    assert len(revived) >= 8  # restarted codes sit on current latents, so they are used again
    cb = m.codebook_vectors()
    assert torch.allclose(cb.norm(dim=-1), torch.ones(len(cb)), atol=1e-5)

    # disabled restart leaves the dead codes dead
    m2, x2, g2 = _dead_code_setup(restart_after=0)
    for _ in range(5):
        m2(x2, generator=g2)
    assert int(m2.quantize.restarts) == 0


def test_restart_state_is_saved_and_resume_is_deterministic():
    def step(m, opt, g, x):
        loss, _ = tokenizer_loss(m, x, g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    x = _images(16)
    a = _tiny(restart_after=2).train()
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        step(a, opt_a, g, x)
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    assert {"quantize.unused_steps", "quantize.initialized", "quantize.restarts"} <= set(sd)
    opt_sd, g_state = copy.deepcopy(opt_a.state_dict()), g.get_state()
    b = VQModel(vq_config("tiny", restart_after=2)).train()
    b.load_state_dict(sd)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-3)
    opt_b.load_state_dict(opt_sd)
    g_b = torch.Generator()
    g_b.set_state(g_state)
    for _ in range(4):
        step(a, opt_a, g, x)
        step(b, opt_b, g_b, x)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_train_tokenizer_run_on_image_folder(tmp_path):
    """End-to-end: the resumable run on a small folder data set; final/ loads back with test metrics."""
    import numpy as np
    from PIL import Image

    from onestep.teacher.load import load_tokenizer
    from onestep.tokenizer.train import train_tokenizer

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    cfg = replace(VQ_TRAIN_PRESETS["tiny"], steps=4, batch_size=8, log_every=2, ckpt_every=2)
    final = train_tokenizer(tmp_path / "run", cfg, data="folder", data_root=str(tmp_path / "data"))
    model, config = load_tokenizer(final)
    assert config["kind"] == "tokenizer" and set(config["eval"]) >= {"psnr_db", "codebook_usage"}
    assert model.grid == (4, 4) and model.config.in_channels == 1
    assert int(model.quantize.initialized) == 1


# ---- LlamaGen's published layout (vq_ds16_c2i.pt) -----------------------------------------------------------------
def test_vq16_preset_is_the_published_layout():
    """vq-16: the keys (in order), shapes, dtypes and parameter count of LlamaGen's vq_ds16_c2i.pt."""
    from test_teacher import assert_official_layout

    m, ref = assert_official_layout(lambda: VQModel(vq_config("vq-16")), "llamagen-vq-16")
    assert ref["persistent_buffers_in_state_dict"] == ["quantize.codebook_used"]
    assert m.grid == (16, 16) and m.vocab_size == 16384 and m.code_dim == 8


def test_llamagen_encoder_and_attention_by_hand():
    """The vq-16 structure written out from LlamaGen's description: per level res.j then attn.j (attention only at
    the lowest resolution), downsample; mid = res, attn, res; attention = softmax(q^T k / sqrt(C)) over positions,
    v-weighted, proj_out, residual; the decoder reads the l2-normalised codebook rows."""
    torch.manual_seed(0)
    m = VQModel(vq_config("vq-16-tiny", num_res_blocks=2, decoder_res_blocks=3)).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.tanh(torch.randn(2, 3, 16, 16))

    def attn(blk, h):
        B, C, H, W = h.shape
        n = blk.norm(h)
        q, k, v = (conv(n).reshape(B, C, H * W) for conv in (blk.q, blk.k, blk.v))
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * C ** -0.5, dim=-1)  # (B, query, key)
        return h + blk.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W))

    e = m.encoder
    with torch.no_grad():
        h = e.conv_in(x)
        for i, level in enumerate(e.conv_blocks):
            assert len(level.attn) == (2 if i == len(e.conv_blocks) - 1 else 0)
            for j in range(2):
                h = level.res[j](h)
                if len(level.attn):
                    h = attn(level.attn[j], h)
            if i < len(e.conv_blocks) - 1:
                h = level.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        h = e.mid[2](attn(e.mid[1], e.mid[0](h)))
        h = e.conv_out(F.silu(e.norm_out(h)))
        torch.testing.assert_close(e(x), h)
        assert len(m.decoder.conv_blocks[0].attn) == 3 and len(m.decoder.conv_blocks[-1].attn) == 0  # 2 + 1 blocks
        ids = m.encode_ids(x)
        z = F.normalize(m.quant_conv(h).permute(0, 2, 3, 1).reshape(2, 16, 4), dim=-1)
        cb = F.normalize(m.quantize.embedding.weight, dim=-1)
        assert torch.equal(ids, (z @ cb.t()).argmax(-1))
        torch.testing.assert_close(m.decode_ids(ids), m.decode(cb[ids].reshape(2, 4, 4, 4).permute(0, 3, 1, 2)))


def test_llamagen_decoder_by_hand():
    """The decoder in LlamaGen's order: conv_in, mid (res, attn, res), then conv_blocks.0 (lowest resolution: res.j
    each followed by attn.j, then upsample) ... conv_blocks.last (no attention, no upsample), norm, SiLU, conv_out."""
    torch.manual_seed(1)
    m = VQModel(vq_config("vq-16-tiny")).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    d = m.decoder
    z = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        h = d.mid[2](d.mid[1](d.mid[0](d.conv_in(z))))
        for k, level in enumerate(d.conv_blocks):
            assert len(level.res) == 2 and len(level.attn) == (2 if k == 0 else 0)
            for j in range(2):
                h = level.res[j](h)
                if k == 0:
                    h = level.attn[j](h)
            if k < len(d.conv_blocks) - 1:
                h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            else:
                assert not hasattr(level, "upsample")
        torch.testing.assert_close(d(z), d.conv_out(F.silu(d.norm_out(h))))
    assert vq_config("vq-16").decoder_blocks == 3 and vq_config("default", num_res_blocks=2).decoder_blocks == 2


def test_llamagen_usage_window_and_no_training_state():
    m = VQModel(vq_config("vq-16-tiny")).train()
    assert set(k for k in m.state_dict() if k.startswith("quantize.")) == {"quantize.codebook_used",
                                                                           "quantize.embedding.weight"}
    x = torch.tanh(torch.randn(3, 3, 16, 16))
    _, ids, _ = m(x)
    assert torch.equal(m.quantize.codebook_used[-48:].long(), ids.reshape(-1))  # the latest ids, in order
    assert torch.equal(m.quantize.codebook_used[:-48], torch.zeros(256 - 48))
    with pytest.raises(ValueError, match="training_state"):
        vq_config("vq-16-tiny", restart_after=5)


def test_tokenizer_saved_with_the_old_key_names_still_loads(tmp_path):
    """Run directories written before the LlamaGen key names (encoder.down.i / decoder.up.i / mid.) load unchanged."""
    import re

    from onestep import checkpoint as ckpt
    from onestep.teacher.load import load_tokenizer

    m = _tiny().eval()
    old = {}
    for k, v in m.state_dict().items():
        k = re.sub(r"^encoder\.conv_blocks\.", "encoder.down.", k)
        k = re.sub(r"^decoder\.conv_blocks\.", "decoder.up.", k)
        old[re.sub(r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.", k)] = v
    assert "encoder.mid.conv1.weight" in old and "decoder.up.0.res.0.conv1.weight" in old
    # names of the shipped tokenizer before the rename, and what they became
    from onestep.tokenizer.vq import upgrade_legacy_keys

    pairs = {"encoder.down.0.res.0.conv1.weight": "encoder.conv_blocks.0.res.0.conv1.weight",
             "encoder.down.1.downsample.conv.bias": "encoder.conv_blocks.1.downsample.conv.bias",
             "encoder.mid.norm1.weight": "encoder.mid.0.norm1.weight", "decoder.mid.conv2.bias": "decoder.mid.0.conv2.bias",
             "decoder.up.1.upsample.conv.weight": "decoder.conv_blocks.1.upsample.conv.weight",
             "decoder.up.2.res.0.nin_shortcut.weight": "decoder.conv_blocks.2.res.0.nin_shortcut.weight",
             "encoder.conv_in.weight": "encoder.conv_in.weight", "quantize.unused_steps": "quantize.unused_steps"}
    assert list(upgrade_legacy_keys(dict.fromkeys(pairs, torch.zeros(1)))) == list(pairs.values())
    ckpt.save_tensors(tmp_path / "tok" / "final" / "model.safetensors", old)
    ckpt.write_json(tmp_path / "tok" / "final" / "config.json", {"kind": "tokenizer", "model": m.config.to_dict()})
    loaded, _ = load_tokenizer(tmp_path / "tok")
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode_ids(loaded.encode_ids(x)), m.decode_ids(m.encode_ids(x)))


# ---- codebook updates outside the optimizer leave out non-finite latents --------------------------------------------
def test_kmeans_init_leaves_out_nonfinite_latents():
    """A NaN image gives NaN latents: the k-means init runs on the other rows exactly as if they were absent, and a
    batch with no finite row leaves the codebook uninitialised for the next batch."""
    q = _tiny().quantize
    z = F.normalize(torch.randn(40, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    z_bad = z.clone()
    z_bad[[3, 17, 18]] = float("nan")
    z_bad[25, 0] = float("inf")
    clean = torch.cat([z[:3], z[4:17], z[19:25], z[26:]])
    q.kmeans_init(z_bad, torch.Generator().manual_seed(0))
    ref = _tiny().quantize
    ref.kmeans_init(clean, torch.Generator().manual_seed(0))
    assert torch.isfinite(q.embedding.weight).all() and int(q.initialized) == 1
    assert torch.equal(q.embedding.weight, ref.embedding.weight)

    m = _tiny().train()
    before = m.quantize.embedding.weight.detach().clone()
    m(torch.full((4, 1, 16, 16), float("nan")), generator=torch.Generator().manual_seed(0))
    assert int(m.quantize.initialized) == 0 and torch.equal(m.quantize.embedding.weight, before)
    x = _images(8)
    x[2] = float("nan")  # one corrupt image in the first batch
    m(x, generator=torch.Generator().manual_seed(0))
    assert int(m.quantize.initialized) == 1 and torch.isfinite(m.quantize.embedding.weight).all()


def test_dead_code_restart_never_picks_a_nonfinite_latent():
    m, x, g = _dead_code_setup(restart_after=3)
    for _ in range(3):
        m(x, generator=g)
    dead = m.quantize.unused_steps >= 3
    assert int(dead.sum()) >= 15
    _, _, losses = m(torch.full_like(x, float("nan")), generator=g)  # a NaN batch when the codes are due
    assert float(losses["restarted"]) == 0 and torch.isfinite(m.quantize.embedding.weight).all()
    assert bool((m.quantize.unused_steps[dead] >= 3).all())  # still dead: restarted by the next usable batch
    x_bad = x.clone()
    x_bad[::2] = float("nan")  # half the images corrupt
    _, _, losses = m(x_bad, generator=g)
    assert float(losses["restarted"]) >= 15 and torch.isfinite(m.quantize.embedding.weight).all()


def test_a_tokenizer_run_whose_final_lacks_its_config_is_not_finished(tmp_path, capsys):
    """final/model.safetensors without final/config.json (a run stopped between the two writes): the re-run writes
    final/ again, with its evaluation, instead of calling it finished."""
    import numpy as np
    from PIL import Image

    from onestep.teacher.load import load_tokenizer
    from onestep.tokenizer.train import train_tokenizer

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "a").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "data" / "a" / f"{i}.png")
    cfg = replace(VQ_TRAIN_PRESETS["tiny"], steps=2, batch_size=4, log_every=1, ckpt_every=2)
    final = train_tokenizer(tmp_path / "run", cfg, data="folder", data_root=str(tmp_path / "data"))
    (final / "config.json").unlink()
    capsys.readouterr()
    train_tokenizer(tmp_path / "run", cfg, data="folder", data_root=str(tmp_path / "data"))
    assert "already finished" not in capsys.readouterr().out
    _, config = load_tokenizer(tmp_path / "run")
    assert config["kind"] == "tokenizer" and "psnr_db" in config["eval"]
    train_tokenizer(tmp_path / "run", cfg, data="folder", data_root=str(tmp_path / "data"))
    assert "already finished" in capsys.readouterr().out  # now it is
