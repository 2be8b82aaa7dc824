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


def test_adm_npz_layout_round_trips(tmp_path):
    """save_images writes this project's layout (images (N,C,H,W), labels, extra arrays) or ADM's (arr_0 uint8
    (N,H,W,3), grey repeated to three channels; arr_1 labels); load_images reads both, and match_channels turns
    ADM's grey-as-RGB back into the grey images."""
    from onestep.cli.sample import NPZ_FORMATS as cli_formats
    from onestep.eval.evaluate import NPZ_FORMATS, load_images, match_channels, save_images

    assert cli_formats == NPZ_FORMATS
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (5, 1, 8, 6), dtype=torch.uint8, generator=g)
    rgb = torch.randint(0, 256, (4, 3, 8, 6), dtype=torch.uint8, generator=g)
    labels = torch.tensor([3, 1, 4, 1, 5])
    save_images(tmp_path / "adm.npz", grey, labels, "adm")
    with np.load(tmp_path / "adm.npz", allow_pickle=False) as f:
        assert sorted(f.keys()) == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (5, 8, 6, 3)
        assert (f["arr_0"] == grey.permute(0, 2, 3, 1).numpy()).all() and list(f["arr_1"]) == [3, 1, 4, 1, 5]
    images, read = load_images(tmp_path / "adm.npz")
    assert images.shape == (5, 3, 8, 6) and torch.equal(read, labels)
    assert torch.equal(match_channels(images, 1, "the images"), grey)
    save_images(tmp_path / "rgb.npz", rgb, None, "adm")
    images, read = load_images(tmp_path / "rgb.npz")
    assert torch.equal(images, rgb) and read is None
    with pytest.raises(ValueError, match="colour images"):
        match_channels(images, 1, "the images")
    save_images(tmp_path / "own.npz", grey, labels, "onestep", tokens=np.zeros((5, 4)), seed=7)
    with np.load(tmp_path / "own.npz") as f:
        assert {"images", "labels", "tokens", "seed"} == set(f.keys()) and int(f["seed"]) == 7
    images, read = load_images(tmp_path / "own.npz")
    assert torch.equal(images, grey) and torch.equal(read, labels)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="must be uint8 images"):
        load_images(tmp_path / "float.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="no 'images' or 'arr_0'"):
        load_images(tmp_path / "other.npz")


def test_reference_npz_is_checked(tmp_path):
    """--ref-stats files: ADM-style mu (2048,) / sigma (2048, 2048) come back as float64; anything else is a
    ValueError naming the file and what is wrong."""
    from onestep.eval.evaluate import read_reference_npz

    mu, sigma = np.linspace(0, 1, 2048, dtype=np.float32), np.eye(2048, dtype=np.float32)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    ref = read_reference_npz(tmp_path / "ref.npz")
    assert set(ref) == {"mu", "sigma"} and ref["mu"].dtype == np.float64 and np.array_equal(ref["mu"], mu)
    (tmp_path / "text.npz").write_text("not an archive")
    np.save(tmp_path / "one.npy", mu)
    bad = {"missing.npz": None, "text.npz": None, "one.npy": None,
           "keys.npz": {"mean": mu, "cov": sigma},
           "shape.npz": {"mu": mu[:10], "sigma": sigma[:10, :10]},
           "ints.npz": {"mu": mu.astype(np.int64), "sigma": sigma.astype(np.int64)},
           "nan.npz": {"mu": np.full(2048, np.nan), "sigma": sigma},
           "floatimages.npz": {"arr_0": np.zeros((3, 4, 4, 3), np.float32)},
           "oneimage.npz": {"arr_0": np.zeros((1, 4, 4, 3), np.uint8)},
           "pickled.npz": {"mu": np.array([{"a": 1}], dtype=object), "sigma": sigma}}
    messages = {"missing.npz": "does not exist", "text.npz": "is not an .npz", "one.npy": "single array",
                "keys.npz": "neither 'mu' and 'sigma' nor 'arr_0'", "shape.npz": r"expected \(2048,\)",
                "ints.npz": "floating point", "nan.npz": "non-finite", "floatimages.npz": "must be uint8 images",
                "oneimage.npz": "at least 2", "pickled.npz": "without pickle"}
    for name, arrays in bad.items():
        if arrays is not None:
            np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=messages[name]) as e:
            read_reference_npz(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value), name


def test_reference_stats_of_adm_images_are_the_inception_statistics(tmp_path, capsys):
    """An ADM reference batch (arr_0, grey images stored as RGB) gives the statistics of the Inception features of
    the same images read the usual way (N, C, H, W), so the Inception FID against it is the usual one; the Inception
    pass shows a labelled progress bar."""
    from onestep.eval.evaluate import read_reference_npz, reference_stats, save_images
    from onestep.eval.inception import inception_features

    imgs = torch.randint(0, 256, (3, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    save_images(tmp_path / "ref.npz", imgs, None, "adm")
    got = reference_stats(read_reference_npz(tmp_path / "ref.npz"),
                          lambda x: inception_features(x, progress=True, desc="reference statistics: Inception"))
    assert "reference statistics: Inception" in capsys.readouterr().err
    mu, sigma = metrics.feature_stats(inception_features(imgs))
    np.testing.assert_allclose(got["mu"], mu, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got["sigma"], sigma, rtol=1e-6, atol=1e-8)


def test_report_reads_eval_json_and_refuses_inputs_without_rows(tmp_path):
    """onestep report takes the JSON of onestep eval --out (one row each: its method, steps, params, grid and data
    floor), run directories and metrics.json files; a row whose grid file is missing gets a warning, an input
    without rows is refused before anything is written, and the headers label the classifier's metrics."""
    grid = save_grid(torch.zeros((2, 1, 8, 8), dtype=torch.uint8), tmp_path / "ev" / "dd2.png", nrow=2)
    ev = {"n": 64, "fid_classifier": 3.5, "inception_score": 7.0, "precision": 0.8, "recall": 0.6,
          "fid_inception": 40.0, "n_inception": 16, "method": "dd2-1step", "steps": 1, "params": 1234,
          "grid": grid.name, "data_floor": {"n": 64, "fid_classifier": 1.0, "inception_score": 9.0}}
    (tmp_path / "ev" / "dd2.json").write_text(json.dumps(ev))
    imgs = {"n": 64, "fid_classifier": 5.0, "images": str(tmp_path / "gen.npz"), "grid": "gone.png"}
    (tmp_path / "ev" / "images.json").write_text(json.dumps(imgs))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"rows": [{"method": "teacher", "steps": 49,
                                                                         "fid_classifier": 2.0}]}))
    warnings = []
    md = write_report([tmp_path / "ev" / "dd2.json", tmp_path / "ev" / "images.json", tmp_path / "run"],
                      tmp_path / "out", warn=warnings.append)
    text = md.read_text()
    assert "| dd2-1step | 1 | 1234 | 3.5 | 40 |" in text and "| gen.npz | - |" in text and "| teacher | 49 |" in text
    for header in ("FID (classifier)", "FID (Inception)", "IS (classifier)", "precision (classifier)",
                   "recall (classifier)"):
        assert header in text and header in (tmp_path / "out" / "report.html").read_text()
    assert "inception_score" not in text and '"fid_classifier": 1.0' in text  # eval's data floor
    assert "../ev/dd2.png" in text
    assert len(warnings) == 2 and "gone.png not found" in warnings[0] and "teacher has no sample grid" in warnings[1]
    (tmp_path / "empty.json").write_text(json.dumps({"rows": []}))
    (tmp_path / "other.json").write_text(json.dumps({"fid": 1}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "norun").mkdir()
    for bad, msg in (("empty.json", "holds no evaluation rows"), ("other.json", "holds no evaluation rows"),
                     ("broken.json", "is not a JSON file"), ("norun", "no metrics.json"), ("nothing", "does not exist")):
        with pytest.raises(ValueError, match=msg):
            write_report([tmp_path / "run", tmp_path / bad], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
