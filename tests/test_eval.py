"""Evaluation: FID, IS, precision/recall, PPL, the Inception network, speed harness, report."""
import json

import numpy as np
import pytest
import torch

from onestep.eval import metrics
from onestep.eval.report import save_grid, write_report
from onestep.eval.speed import measure


def _feats(n=500, d=16, seed=0, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_fid_of_identical_sets_is_zero_and_grows_with_noise():
    x = _feats()
    assert abs(metrics.fid_from_features(x, x)) < 1e-8
    rng = np.random.default_rng(1)
    fids = [metrics.fid_from_features(x, x + s * rng.normal(size=x.shape)) for s in (0.1, 0.5, 1.0)]
    assert 0 < fids[0] < fids[1] < fids[2]


def test_frechet_distance_matches_scipy_sqrtm():
    a, b = _feats(400, 12, 0), _feats(400, 12, 1, shift=0.3) @ np.diag(np.linspace(0.5, 2, 12))
    mu1, s1 = metrics.feature_stats(a)
    mu2, s2 = metrics.feature_stats(b)
    ours, ref = metrics.frechet_distance(mu1, s1, mu2, s2), metrics.frechet_distance_scipy(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_precision_recall_identical_and_disjoint():
    x = _feats(300, 8)
    p, r = metrics.precision_recall(x, x, k=3)
    assert p == 1.0 and r == 1.0
    p, r = metrics.precision_recall(x, _feats(300, 8, 2, shift=50.0), k=3)
    assert p < 0.01 and r < 0.01


def test_inception_score_of_uniform_logits_is_one_and_of_confident_diverse_is_k():
    assert metrics.inception_score(torch.zeros(100, 10)) == pytest.approx(1.0)
    confident = torch.full((100, 10), -30.0)
    confident[torch.arange(100), torch.arange(100) % 10] = 30.0
    assert metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-6)


def test_class_accuracy():
    logits = torch.eye(4)[[0, 1, 2, 3, 0]]
    assert metrics.class_accuracy(logits, torch.tensor([0, 1, 2, 3, 1])) == pytest.approx(0.8)


def test_ppl_is_zero_for_constant_and_positive_for_smooth_generator():
    labels = torch.zeros(20, dtype=torch.long)
    feat = lambda x: x  # noqa: E731
    const = metrics.perceptual_path_length(lambda z, y: torch.ones(len(z), 4), (4,), labels, feat)
    assert const == 0.0
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    smooth = metrics.perceptual_path_length(lambda z, y: torch.tanh(z @ w), (4,), labels, feat)
    assert 0 < smooth < 1e3


def test_inception_network_runs_on_cpu():
    from onestep.eval.inception import inception_features

    imgs = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    f = inception_features(imgs)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    # the NHWC input layout (the default, faster on a CPU) computes the same features as NCHW
    torch.testing.assert_close(f, inception_features(imgs, channels_last=False), rtol=1e-4, atol=1e-4)


def test_stats_npz_roundtrip(tmp_path):
    from onestep.eval.evaluate import load_stats, save_stats

    mu, sigma = np.arange(3.0), np.eye(3)
    save_stats(tmp_path / "ref.npz", mu, sigma)
    d = load_stats(tmp_path / "ref.npz")
    assert np.array_equal(d["mu"], mu) and np.array_equal(d["sigma"], sigma)
    np.savez(tmp_path / "bad.npz", x=mu)
    with pytest.raises(ValueError, match="mu"):
        load_stats(tmp_path / "bad.npz")


def test_speed_harness_ratios():
    import time

    res = measure({"slow": lambda b: time.sleep(0.02), "fast": lambda b: time.sleep(0.002)}, batch_sizes=(1, 4),
                  warmup=1, repeats=3, reference="slow")
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["slow"]["speedup_b1"] == 1.0
    assert rows["fast"]["speedup_b1"] > 3
    assert rows["fast"]["throughput_b4"] > rows["slow"]["throughput_b4"]
    assert res["machine"]["torch_threads"] == torch.get_num_threads()


def test_report_writes_markdown_html_and_plots(tmp_path):
    grid = save_grid(torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8), tmp_path / "run" / "g.png", nrow=3)
    rows = [{"method": "teacher", "steps": 49, "fid_classifier": 2.0, "latency_b1_s": 0.1, "grid": "g.png"},
            {"method": "dd2", "steps": 1, "fid_classifier": 4.0, "latency_b1_s": 0.004, "grid": "g.png"}]
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"rows": rows, "data_floor_fid": {"classifier": 0.5}}))
    md = write_report([tmp_path / "run"], tmp_path / "out")
    text = md.read_text()
    assert "| teacher | 49 |" in text and "dd2" in text and "Data floor" in text
    assert (tmp_path / "out" / "report.html").exists()
    assert (tmp_path / "out" / "fid_vs_steps.png").exists() and (tmp_path / "out" / "fid_vs_latency.png").exists()
    assert grid.exists()


def test_classifier_training_step_and_features():
    from onestep.eval.classifier import ClassifierConfig, train_classifier

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    model, stats = train_classifier(imgs, labels, imgs[:16], labels[:16], ClassifierConfig(batch_size=16),
                                    progress=False, max_steps=3)
    f, logits = model.embed(imgs[:5])
    assert f.shape == (5, 128) and logits.shape == (5, 10) and 0 <= stats["test_accuracy"] <= 1


def test_evaluation_noise_is_no_training_noise():
    """generate() draws batch b from rng.stream_seed(seed, b): not DD1's pair shard b (seeded seed + b, which the old
    rule seed + b reproduced exactly for seed 0), and two seeds share no batch (with seed + b, seed 1's batch b was
    seed 0's batch b + 1)."""
    from types import SimpleNamespace

    from onestep import rng
    from onestep.dd1.pairs import _shard_noise
    from onestep.samplers import generate
    from onestep.teacher.tabular import TabularTeacher

    T = TabularTeacher(4, 3, 2, seed=0)
    s = SimpleNamespace(name="noise", decode=lambda x: x,
                        sample=lambda lab, g: torch.randn(len(lab), T.seq_len, T.code_dim, generator=g))
    labels = torch.zeros(12, dtype=torch.long)
    b0, b1 = (generate(s, labels, seed, batch_size=4, progress=False)["images"].split(4) for seed in (0, 1))
    shards = [_shard_noise(i, 4, 0, T)[0] for i in range(4)]
    assert not any(torch.equal(a, b) for a in (*b0, *b1) for b in shards)
    assert not any(torch.equal(a, b) for a in b0 for b in b1)
    assert len({rng.stream_seed(seed, i) for seed in range(3) for i in range(1000)}) == 3000
    assert rng.stream_seed(0, 0) != rng.stream_seed(0, 0, "ppl") and rng.stream_seed(0, 0) >= 2 ** 20


def test_cached_rows_are_reused_only_under_the_same_protocol():
    """A pipeline re-uses a cached evaluation row only with the same sample counts, seed and noise rule (a row of
    2000 samples beside rows of 1000, another seed's row, or one scored with the old noise rule is re-evaluated)."""
    from onestep.pipeline import EVAL_NOISE, PIPELINE_PRESETS, Pipeline

    p = Pipeline.__new__(Pipeline)
    p.cfg, p.seed = PIPELINE_PRESETS["full"], 0
    row = {"n": 2000, "seed": 0, "noise": EVAL_NOISE, "fid_classifier_10000": 1.0, "n_inception": 2000}
    assert p.meets_protocol(row, headline=True) and p.meets_protocol(row, headline=False)
    for change in ({"n": 4000}, {"seed": 1}, {"noise": None}, {"n_inception": 5000}):
        assert not p.meets_protocol({**row, **change}, headline=True), change
    assert not p.meets_protocol({k: v for k, v in row.items() if k != "fid_classifier_10000"}, headline=True)


def test_folder_caches_are_keyed_by_the_folders_files(tmp_path, monkeypatch):
    """Two image folders of the same name and image shape (6 and 3 classes) get a classifier and reference statistics
    each; changing a folder's files changes its key."""
    from PIL import Image

    from onestep.eval.evaluate import Evaluator

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    roots = {}
    for name, classes in (("a", 6), ("b", 3)):
        root = roots[name] = tmp_path / name / "images"
        for k in range(classes):
            (root / f"c{k}").mkdir(parents=True)
            for i in range(20):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / f"c{k}" / f"{i}.png")
    ev_a = Evaluator("folder", str(roots["a"]), progress=False, n_ref_pr=50)
    ev_b = Evaluator("folder", str(roots["b"]), progress=False, n_ref_pr=50)
    assert ev_a.classifier.cfg.num_classes == 6 and ev_b.classifier.cfg.num_classes == 3
    assert ev_b.classifier_meta["steps"] > 0  # a folder smaller than one batch of the classifier still trains it
    assert ev_a.cache != ev_b.cache and ev_a.cache.parent == ev_b.cache.parent
    from onestep.data import data_fingerprint

    assert {p.name for p in (tmp_path / "cache").glob("classifier-*")} == {
        f"classifier-folder-1x8x8-{data_fingerprint('folder', str(r))}" for r in roots.values()}
    assert ev_a.data_floor(n_inception=0)["n"] == 12 and ev_b.data_floor(n_inception=0)["n"] == 6
    before = data_fingerprint("folder", str(roots["b"]))
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(roots["b"] / "c0" / "extra.png")
    assert data_fingerprint("folder", str(roots["b"])) != before
