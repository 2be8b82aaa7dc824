"""Runs that can be trusted: the same command gives the same weights, an interrupted run resumes to them, one process
writes a run directory, run files are readable, a moved run keeps resuming.

Every training command runs at tiny size on one thread, in this process, from upstream runs made once here on a folder
of 16x16 images (small enough that a run takes about a second).
"""
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onestep import trainer
from onestep.cli import main
from onestep.paths import assets_dir

TEACHER = assets_dir() / "fashion-mnist" / "teacher"
SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """Tiny tokenizer, teacher, DD1 pairs, stage-0 and stage-1 runs (two steps each) that the commands read, on a
    folder of 2 classes x 16 random 16x16 grey images."""
    import numpy as np
    from PIL import Image

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("upstream")
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 16), dtype=np.uint8)
    for k in range(2):
        (root / "images" / f"c{k}").mkdir(parents=True)
        for i in range(16):
            Image.fromarray(pixels[k, i]).save(root / "images" / f"c{k}" / f"{i}.png")
    main(["train-tokenizer", "--preset", "tiny", "--steps", "2", "--data", "folder", "--data-root",
          str(root / "images"), "--run-dir", str(root / "tok")])
    main(["train-teacher", "--preset", "tiny", "--tokenizer", str(root / "tok"), "--steps", "2", "--run-dir",
          str(root / "teacher")])
    main(["dd1", "pairs", "--preset", "tiny", "--teacher", str(root / "teacher"), "--out", str(root / "pairs")])
    main(["dd2", "adapt", "--preset", "tiny", "--teacher", str(root / "teacher"), "--run-dir", str(root / "adapt"),
          "--steps", "2", "--fit-steps", "3"])
    main(["dd2", "tune", "--preset", "tiny", "--teacher", str(root / "adapt"), "--run-dir", str(root / "tune"),
          "--steps", "2"])
    torch.set_num_threads(n)
    return root


# every training command at tiny size, three steps ({run}: the run directory; the other names: upstream runs)
COMMANDS = {
    "train-tokenizer": ["train-tokenizer", "--preset", "tiny", "--data", "folder", "--data-root", "{images}"],
    "train-teacher": ["train-teacher", "--preset", "tiny", "--tokenizer", "{tok}"],
    "dd1 train": ["dd1", "train", "--preset", "tiny", "--pairs", "{pairs}", "--teacher", "{teacher}"],
    "dd2 adapt": ["dd2", "adapt", "--preset", "tiny", "--teacher", "{teacher}", "--fit-steps", "3"],
    "dd2 tune": ["dd2", "tune", "--preset", "tiny", "--teacher", "{adapt}"],
    "dd2 train --tune (CSD)": ["dd2", "train", "--preset", "tiny", "--tune", "{tune}"],
    "mapkd train": ["mapkd", "train", "--preset", "tiny", "--teacher", "{teacher}"],
}


def _argv(command: str, root: Path, run: Path) -> list[str]:
    names = {"tok": root / "tok", "teacher": root / "teacher", "pairs": root / "pairs", "adapt": root / "adapt",
             "tune": root / "tune", "images": root / "images"}
    return [a.format(**{k: str(v) for k, v in names.items()}) for a in COMMANDS[command]] + [
        "--steps", "3", "--seed", "11", "--run-dir", str(run)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's final model directories (final/, and raw/ where the run has one)."""
    return {f"{d.name}/{k}": v for d in (run / "final", run / "raw") if d.is_dir()
            for k, v in load_file(d / "model.safetensors").items()}


@pytest.fixture
def checkpoint_every_step(monkeypatch):
    """Every run of the test checkpoints at every step (a checkpoint draws nothing: the weights do not change)."""
    init = trainer.TrainLoop.__init__

    def init_every_step(self, run_dir, cfg, *a, **k):
        init(self, run_dir, dataclasses.replace(cfg, ckpt_every=1), *a, **k)

    monkeypatch.setattr(trainer.TrainLoop, "__init__", init_every_step)


def _interrupted_after_first_checkpoint(argv, monkeypatch):
    """Run ``argv`` and stop it (KeyboardInterrupt, as Ctrl-C) right after its first checkpoint is written."""
    save = trainer.TrainLoop.save

    def save_then_stop(self):
        save(self)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(trainer.TrainLoop, "save", save_then_stop)
        with pytest.raises(SystemExit) as e:
            main(argv)
    assert e.value.code == 130


@pytest.mark.parametrize("command", list(COMMANDS))
def test_same_command_same_seed_same_weights_and_an_interrupted_run_resumes_to_them(
        command, upstream, tmp_path, monkeypatch, capsys, one_thread, checkpoint_every_step):
    """Each training command run twice with one seed writes bit-identical final weights (the layers it creates start
    from the seed: ``rng.seed_everything``), and a run stopped after its step-1 checkpoint and re-run with the same
    command resumes to the same weights."""
    runs = {name: tmp_path / name for name in ("a", "b", "stopped")}
    main(_argv(command, upstream, runs["a"]))
    main(_argv(command, upstream, runs["b"]))
    _interrupted_after_first_checkpoint(_argv(command, upstream, runs["stopped"]), monkeypatch)
    assert (runs["stopped"] / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (runs["stopped"] / "final").exists()
    capsys.readouterr()
    main(_argv(command, upstream, runs["stopped"]))
    assert "resumed from" in capsys.readouterr().out
    a, b, resumed = (_weights(r) for r in runs.values())
    assert a.keys() == b.keys() == resumed.keys() and a
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], "two runs of one command differ"
    assert [k for k in a if not torch.equal(a[k], resumed[k])] == [], "the resumed run differs"


def test_a_seed_up_to_2_63_minus_1_trains(tmp_path, one_thread):
    """The largest seed a command takes works: the streams derived from it (seed * 1000 + rank, ...) wrap modulo
    2**64 instead of overflowing the generator."""
    main(["mapkd", "train", "--preset", "tiny", "--teacher", str(TEACHER), "--steps", "1", "--seed", str(2 ** 63 - 1),
          "--run-dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


# ---- one writer per run directory -------------------------------------------------------------------------------
def test_a_second_process_on_a_live_run_directory_is_refused_naming_the_holder(tmp_path):
    """A process holding RUN/.lock (here: one that took it and sleeps) makes a second `onestep` on RUN stop with one
    line naming the holder's pid, host and command, writing nothing; once the holder is killed (SIGKILL: the OS drops
    its lock), the same command runs."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nsys.argv = ['onestep', 'dd2', 'flow', '--run-dir', sys.argv[1]]\n"
         "from onestep import checkpoint\ncheckpoint.lock_run_dir(sys.argv[-1])\nprint('held', flush=True)\n"
         "time.sleep(120)", str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = [sys.executable, "-m", "onestep", "mapkd", "train", "--preset", "tiny", "--teacher", str(TEACHER),
                "--steps", "1", "--run-dir", str(run)]
        r = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "is being written by another process" in lines[0], lines
        assert f"pid {holder.pid} on " in lines[0] and "onestep dd2 flow --run-dir" in lines[0], lines[0]
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (run / "final" / "model.safetensors").exists()


# ---- run files --------------------------------------------------------------------------------------------------
def test_run_files_are_readable_by_group_and_others_under_umask_022(tmp_path, one_thread):
    """The atomic writes' temporary files are private (0600); the files they become have an ordinary file's mode."""
    old = os.umask(0o022)
    try:
        main(["mapkd", "train", "--preset", "tiny", "--teacher", str(TEACHER), "--steps", "1", "--run-dir",
              str(tmp_path / "run")])
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    names = {p.relative_to(tmp_path / "run").as_posix() for p in files}
    assert {"config.json", "final/model.safetensors", "final/config.json", "metrics.json", "checkpoints/latest",
            "checkpoints/step_00000001/trainer_state.pt"} <= names
    assert {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files
            if p.stat().st_mode & 0o777 != 0o644} == {}


def test_a_run_moved_one_directory_deeper_keeps_resuming_and_sampling(upstream, tmp_path, monkeypatch, capsys,
                                                                     one_thread, checkpoint_every_step):
    """`mv runs/x runs/sub/x` with the teacher still in runs/: the same command on the new place resumes the run (its
    references lead to the same teacher), and a finished run moved so samples (its teacher found from where the run
    was made)."""
    runs = tmp_path / "runs"
    (runs / "sub").mkdir(parents=True)
    teacher = runs / "teacher"
    main(["train-teacher", "--preset", "tiny", "--tokenizer", str(upstream / "tok"), "--steps", "2", "--run-dir",
          str(teacher)])
    argv = ["mapkd", "train", "--preset", "tiny", "--teacher", str(teacher), "--steps", "2", "--seed", "3"]
    _interrupted_after_first_checkpoint(argv + ["--run-dir", str(runs / "flow")], monkeypatch)
    (runs / "flow").rename(runs / "sub" / "flow")
    capsys.readouterr()
    main(argv + ["--run-dir", str(runs / "sub" / "flow")])
    assert "resumed from" in capsys.readouterr().out
    main(argv + ["--run-dir", str(runs / "ref")])
    got, want = _weights(runs / "sub" / "flow"), _weights(runs / "ref")
    assert all(torch.equal(got[k], want[k]) for k in want)
    (runs / "ref").rename(runs / "sub" / "ref")  # a finished run moved: its teacher_dir "../teacher" is not beside it
    main(["sample", "--run", str(runs / "sub" / "ref"), "-n", "2", "--out", str(tmp_path / "samples")])
    assert (tmp_path / "samples" / "mapkd-1step.npz").exists()


def test_a_larger_steps_on_a_finished_run_needs_extend(tmp_path, capsys, one_thread):
    """A larger --steps does not silently continue a finished run and replace its final/: without --extend it is one
    line naming the flag, before anything is written; with it the run continues from its last checkpoint."""
    run = tmp_path / "run"
    base = ["mapkd", "train", "--preset", "tiny", "--teacher", str(TEACHER), "--run-dir", str(run)]
    main(base + ["--steps", "2"])
    files = lambda: {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}  # noqa
    before = files()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(base + ["--steps", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "pass --extend" in err[0], err
    assert files() == before
    main(base + ["--steps", "4", "--extend"])
    assert "mapkd.steps grows from 2 to 4" in capsys.readouterr().out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
