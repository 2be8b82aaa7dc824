"""LlamaGen-style teacher: official layout, KV cache, sampling rules (CFG, temperature, top-k, top-p)."""
import json
import math
from pathlib import Path

import pytest
import torch

from onestep.teacher.llamagen import GPT, GPT_PRESETS, model_args
from onestep.teacher.sampling import SamplingConfig, process_logits, sample_tokens, teacher_log_probs, truncate_logits

# The published models' state_dict layouts (key, shape, dtype; no weights), kept in the repository: fixtures/checkpoints
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"


def assert_official_layout(build, fixture: str, prefix: str = "") -> tuple:
    """Build a module on the meta device and check its state_dict against a published layout fixture: the same
    keys in the same order, shapes and dtypes (``prefix``: only the fixture's keys under it, prefix removed); and,
    for a whole model, the parameter count. Returns (module, fixture dict)."""
    path = FIXTURES / f"{fixture}.json"
    assert path.is_file(), f"layout fixture {path} is missing"
    ref = json.loads(path.read_text())
    with torch.device("meta"):
        m = build()
    sd = m.state_dict()
    want = {k[len(prefix):]: v for k, v in ref["state_dict"].items() if k.startswith(prefix)}
    assert list(sd) == list(want), "key order differs from the official state_dict"
    for k, v in sd.items():
        assert list(v.shape) == want[k]["shape"], k
        assert str(v.dtype).replace("torch.", "") == want[k]["dtype"], k
    if not prefix:
        assert sum(p.numel() for p in m.parameters()) == ref["num_params"]
    return m, ref


@pytest.mark.parametrize("preset,fixture", [("GPT-B", "llamagen-gpt-b-256"), ("GPT-L", "llamagen-gpt-l-256"),
                                            ("GPT-XL", "llamagen-gpt-xl-256"), ("GPT-XXL", "llamagen-gpt-xxl-256")])
def test_official_layout_matches_fixture(preset, fixture):
    m, ref = assert_official_layout(lambda: GPT(GPT_PRESETS[preset]), fixture)
    assert m.args.ffn_hidden == ref["config"]["ffn_hidden"]


def test_kv_cache_logits_equal_full_forward(tiny_gpt):
    m = tiny_gpt
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(m.vocab_size, (3, m.seq_len), generator=g)
    labels = torch.tensor([0, 5, m.num_classes])  # includes the null class
    with torch.no_grad():
        full = m(ids, labels)
        cache = m.new_cache(3, "cpu")
        steps = [m.head(m.step(cache, None if k == 0 else ids[:, k - 1:k], labels, k)) for k in range(m.seq_len)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_prefill_equals_step_by_step(tiny_gpt):
    """One prefill pass over steps [start, end) leaves the cache as end - start single steps do: the next step's
    logits agree, from the first step and from the middle, with and without CFG doubling."""
    from onestep.teacher.sampling import TeacherStepper

    m = tiny_gpt
    ids = torch.randint(m.vocab_size, (3, m.seq_len), generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 5, m.num_classes])
    with torch.no_grad():
        for start, end in ((0, 1), (0, 9), (3, 11), (5, m.seq_len - 1)):
            a, b = m.new_cache(3, "cpu"), m.new_cache(3, "cpu")
            for k in range(start):
                for c in (a, b):
                    m.step(c, None if k == 0 else ids[:, k - 1:k], labels, k)
            m.prefill(a, ids, labels, start, end)
            for k in range(start, end):
                m.step(b, None if k == 0 else ids[:, k - 1:k], labels, k)
            assert a.pos == b.pos == end
            nxt = [m.head(m.step(c, ids[:, end - 1:end], labels, end)) for c in (a, b)]
            torch.testing.assert_close(nxt[0], nxt[1], atol=1e-5, rtol=0)
        for cfg in (SamplingConfig(), SamplingConfig(cfg_scale=2.0)):
            s1, s2 = TeacherStepper(m, labels, cfg), TeacherStepper(m, labels, cfg)
            s1.feed_prefix(ids, 7)
            for k in range(7):
                s2.feed(None if k == 0 else ids[:, k - 1:k])
            torch.testing.assert_close(s1.log_probs(ids[:, 6:7]), s2.log_probs(ids[:, 6:7]), atol=1e-5, rtol=0)


def test_sampling_from_a_kept_prefix_with_and_without_cache_agree(tiny_gpt):
    """start_step > 0 (skip-n, DD1's windows, DD2's multi-step): the prefilled KV cache samples exactly what
    full teacher-forcing passes sample, with the same seed."""
    labels = torch.tensor([1, 2, 3, 4])
    cfg = SamplingConfig(cfg_scale=2.0, temperature=0.9, top_k=8)
    prefix = torch.randint(tiny_gpt.vocab_size, (4, tiny_gpt.seq_len), generator=torch.Generator().manual_seed(5))
    for start in (1, 6, tiny_gpt.seq_len - 3):
        a = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(0), prefix=prefix, start_step=start)
        b = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(0), use_cache=False, prefix=prefix,
                          start_step=start)
        assert torch.equal(a, b) and torch.equal(a[:, :start], prefix[:, :start])


def test_features_are_causal(tiny_gpt):
    m = tiny_gpt
    ids = torch.randint(m.vocab_size, (1, m.seq_len), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([3])
    with torch.no_grad():
        h = m.features(ids, labels)
        ids2 = ids.clone()
        ids2[0, 7] = (ids2[0, 7] + 1) % m.vocab_size
        h2 = m.features(ids2, labels)
    assert torch.equal(h[:, :8], h2[:, :8])  # rows 0..7 see tokens < row index only
    assert not torch.allclose(h[:, 8:], h2[:, 8:])


def test_sampling_with_and_without_cache_agree(tiny_gpt):
    labels = torch.tensor([1, 2, 3, 4])
    cfg = SamplingConfig(cfg_scale=2.0, temperature=0.9, top_k=8, top_p=0.9)
    a = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(0), use_cache=True)
    b = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(a, b)
    c = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(a, c)  # seeded generators make sampling reproducible


def test_sampling_matches_teacher_log_probs_distribution(tiny_gpt):
    """Empirical first-token frequencies match the processed teacher distribution."""
    n = 4000
    labels = torch.full((n,), 2)
    cfg = SamplingConfig(cfg_scale=1.5, top_k=6)
    ids = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(0))
    p = teacher_log_probs(tiny_gpt, ids[:1], labels[:1], cfg)[0, 0].exp()
    freq = torch.bincount(ids[:, 0], minlength=tiny_gpt.vocab_size).float() / n
    assert (freq[p == 0] == 0).all()
    assert (freq - p).abs().max() < 0.04


def test_cfg_hand_computed():
    cond = torch.tensor([[2.0, 0.0, -1.0]])
    uncond = torch.tensor([[1.0, 1.0, 0.0]])
    lp = process_logits(cond, uncond, SamplingConfig(cfg_scale=3.0))
    expected = torch.log_softmax(torch.tensor([[1 + 3 * 1.0, 1 + 3 * -1.0, 0 + 3 * -1.0]]), -1)
    torch.testing.assert_close(lp, expected)
    # linear schedule (VAR): scale 1 at the first step, full at the last
    cfg = SamplingConfig(cfg_scale=3.0, cfg_schedule="linear")
    assert cfg.scale_at(0, 10) == 1.0 and cfg.scale_at(9, 10) == 3.0 and math.isclose(cfg.scale_at(3, 10), 1 + 2 * 3 / 9)


def test_top_k_top_p_temperature_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    lk = truncate_logits(logits, top_k=2)
    assert torch.isinf(lk[0, 2:]).all() and torch.isfinite(lk[0, :2]).all()
    # top-p 0.7: 0.5 (mass before 0), 0.2 (before 0.5), 0.15 has 0.7 before it -> removed
    lp = truncate_logits(logits, top_p=0.7)
    assert torch.isfinite(lp[0, :2]).all() and torch.isinf(lp[0, 2:]).all()
    # top-p 0.71 keeps the third code too
    assert torch.isfinite(truncate_logits(logits, top_p=0.71)[0, :3]).all()
    # temperature 2 on log-probs = sqrt of probabilities, renormalised
    p = torch.softmax(truncate_logits(logits, temperature=2.0), -1)
    q = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]).sqrt()
    torch.testing.assert_close(p, q / q.sum())
    # top-1 always keeps the argmax, even with a tiny top_p
    assert torch.isfinite(truncate_logits(logits, top_p=0.01)[0, 0])
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)


def test_class_dropout_only_in_training_mode(tiny_gpt):
    labels = torch.arange(10).repeat(50)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(tiny_gpt.eval().drop_labels(labels, g), labels)
    dropped = tiny_gpt.train().drop_labels(labels, g)
    frac = (dropped == tiny_gpt.num_classes).float().mean().item()
    assert 0.05 < frac < 0.15
    tiny_gpt.eval()


def test_continuous_input_teacher_embeds_vectors():
    torch.manual_seed(0)
    m = GPT(model_args("tiny", input_embedding="mlp"), codebook=torch.randn(16, 4)).eval()
    ids = torch.randint(16, (2, 16))
    with torch.no_grad():
        a = m(ids, torch.tensor([0, 1]))
        b = m(m.ids_to_codes(ids), torch.tensor([0, 1]))
    torch.testing.assert_close(a, b)
    assert "tok_mlp.0.weight" in m.state_dict() and "tok_embeddings.weight" not in m.state_dict()


def test_presets_are_valid():
    for name, args in GPT_PRESETS.items():
        assert args.seq_len == args.grid_h * args.grid_w, name
    with pytest.raises(KeyError, match="unknown GPT preset"):
        model_args("GPT-Q")


def test_default_prefill_steps_through_a_kept_prefix():
    """ARTeacher.prefill's step-by-step default (the tabular teacher has no one-pass prefill): sampling from a kept
    prefix with the cache equals full teacher-forcing passes."""
    from onestep.teacher.tabular import TabularTeacher

    T = TabularTeacher(4, 4, 2, seed=3)
    labels = torch.zeros(500, dtype=torch.long)
    prefix = torch.randint(4, (500, 4), generator=torch.Generator().manual_seed(1))
    for start in (1, 2, 3):
        a = sample_tokens(T, labels, SamplingConfig(), torch.Generator().manual_seed(0), prefix=prefix, start_step=start)
        b = sample_tokens(T, labels, SamplingConfig(), torch.Generator().manual_seed(0), use_cache=False, prefix=prefix,
                          start_step=start)
        assert torch.equal(a, b) and torch.equal(a[:, :start], prefix[:, :start])


def test_import_llamagen_writes_runs_that_reproduce_the_models_and_refuses_other_shapes(tmp_path, capsys):
    """Files as LlamaGen publishes them (weights under 'model'; the GPT maybe with a stray freqs_cis) -> tokenizer
    and teacher runs: the loaded teacher gives the original's logits on the tokenizer's normalised codebook, the
    tokenizer its ids; a GPT file of another shape fails, listing the keys, and writes no teacher run."""
    from onestep.cli import main
    from onestep.teacher.load import load_teacher, load_tokenizer
    from onestep.tokenizer.vq import VQModel, vq_config

    torch.manual_seed(0)
    vq = VQModel(vq_config("vq-16-tiny"))
    for p in vq.parameters():
        torch.nn.init.normal_(p, std=0.2)
    gpt = GPT(model_args("tiny", vocab_size=vq.vocab_size, code_dim=vq.code_dim), codebook=vq.codebook_vectors())
    for p in gpt.parameters():
        torch.nn.init.normal_(p, std=0.2)
    import argparse

    # as LlamaGen's training scripts save them: weights under 'model', plus steps, optimizer state and the arguments
    opt = torch.optim.AdamW(gpt.parameters()).state_dict()
    torch.save({"model": vq.state_dict(), "steps": 3, "args": argparse.Namespace(codebook_size=32)}, tmp_path / "vq.pt")
    torch.save({"model": {**gpt.state_dict(), "freqs_cis": torch.zeros(17, 4, 2)}, "optimizer": opt, "steps": 3,
                "args": argparse.Namespace(gpt_model="GPT-B", cls_token_num=1)}, tmp_path / "gpt.pt")
    main(["import-llamagen", "--gpt", str(tmp_path / "gpt.pt"), "--vq", str(tmp_path / "vq.pt"), "--out",
          str(tmp_path / "imp"), "--gpt-preset", "tiny", "--vq-preset", "vq-16-tiny", "--image-size", "16"])
    loaded, tconf, tok = load_teacher(tmp_path / "imp" / "teacher")
    assert tconf["family"] == "llamagen" and tconf["imported_from"]["gpt"].endswith("gpt.pt")
    torch.testing.assert_close(loaded.codebook(), torch.nn.functional.normalize(vq.quantize.embedding.weight, dim=-1))
    ids = torch.randint(vq.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, labels), gpt.eval()(ids, labels), atol=0, rtol=0)
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        assert torch.equal(load_tokenizer(tmp_path / "imp" / "tokenizer")[0].encode_ids(x), vq.eval().encode_ids(x))
    main(["sample", "--run", str(tmp_path / "imp" / "teacher"), "-n", "2", "--out", str(tmp_path / "s")])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a 2-layer file read as the 6-layer "small" preset
        main(["import-llamagen", "--gpt", str(tmp_path / "gpt.pt"), "--vq", str(tmp_path / "vq.pt"), "--out",
              str(tmp_path / "bad"), "--gpt-preset", "small", "--vq-preset", "vq-16-tiny", "--image-size", "16"])
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "missing keys" in err and "layers.5.attention" in err
    assert "shape mismatches" in err and "tok_embeddings.weight" in err
    assert not (tmp_path / "bad" / "teacher").exists()
