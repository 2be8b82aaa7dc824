"""The shared training loop: exact resume after SIGKILL, DDP ranks in lock-step, NaN guard."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from onestep.trainer import BatchSchedule, guarded_step
from onestep.distributed import DistInfo

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(run_dir, steps, every, sleep=0.0):
    return subprocess.run([sys.executable, str(SCRIPT), str(run_dir), str(steps), str(every), str(sleep)],
                          env=ENV, capture_output=True, text=True, timeout=300)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    steps, every = 24, 4
    ref = _run(tmp_path / "ref", steps, every)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(SCRIPT), str(run), str(steps), str(every), "0.15"], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_00000008"):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    killed_at = latest.read_text().strip()
    assert killed_at < f"step_{steps:08d}", "the run finished before it could be killed"
    resumed = _run(run, steps, every)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = _weights(tmp_path / "ref" / "final_rank0.pt"), _weights(run / "final_rank0.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from {killed_at}"


def _free_port() -> int:
    """A port the OS just handed out (a fixed port collides with other jobs on a shared machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo_keep_weights_identical(tmp_path):
    r = _torchrun(tmp_path / "ddp", 6, 3)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = _weights(tmp_path / "ddp" / "final_rank0.pt"), _weights(tmp_path / "ddp" / "final_rank1.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    logs = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len(logs) == 6  # rank 0 only logs


def _torchrun(run_dir, steps, every, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(SCRIPT), str(run_dir), str(steps), str(every), *map(str, extra)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def _draws(run_dir, rank):
    """step -> this rank's (loop generator, global torch RNG) draws. A step trained again after a resume (it ran after
    the last checkpoint) must draw what it drew the first time."""
    out = {}
    for step, *draws in (line.split() for line in (run_dir / f"draws_rank{rank}.txt").read_text().splitlines()):
        assert out.setdefault(int(step), tuple(draws)) == tuple(draws), (rank, step)
    return out


def test_ddp_resume_restores_every_ranks_random_streams(tmp_path):
    """An interrupted 2-rank run resumes with each rank's own RNG streams: every rank draws, step for step, what it
    drew in an uninterrupted run (the ranks draw different numbers), and the final weights are identical."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _torchrun(ref, 6, 3).returncode == 0
    assert _torchrun(run, 6, 3, 0.0, 4).returncode != 0  # stopped when step 4 began; the checkpoint is at step 3
    assert sorted(_draws(run, 0)) == list(range(4))
    r = _torchrun(run, 6, 3)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        got, want = _draws(run, rank), _draws(ref, rank)
        assert sorted(got) == list(range(6)) and got == want, rank
    assert all(_draws(ref, 0)[s] != _draws(ref, 1)[s] for s in range(6))
    w, w_ref = _weights(run / "final_rank1.pt"), _weights(ref / "final_rank1.pt")
    assert all(torch.equal(w[k], w_ref[k]) for k in w)


def test_batch_schedule_shards_ranks_disjointly():
    a = BatchSchedule(100, 8, 0, DistInfo(rank=0, world_size=2))
    b = BatchSchedule(100, 8, 0, DistInfo(rank=1, world_size=2))
    full = BatchSchedule(100, 8, 0)
    for s in range(30):
        ia, ib = a.indices(s), b.indices(s)
        assert len(set(ia.tolist()) & set(ib.tolist())) == 0
        assert torch.equal(torch.cat([ia, ib]), full.indices(s))


def test_guarded_step_skips_nonfinite():
    lin = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    before = lin.weight.detach().clone()
    loss = lin(torch.tensor([[float("nan"), 1.0]])).sum()
    assert guarded_step(loss, opt, lin.parameters()) is False
    assert torch.equal(lin.weight, before)
    assert guarded_step(lin(torch.ones(1, 2)).sum(), opt, lin.parameters()) is True
    assert not torch.equal(lin.weight, before)


def test_resuming_with_a_different_config_names_every_changed_leaf(tmp_path):
    import pytest

    from onestep import checkpoint as ckpt
    from onestep.trainer import prepare_run_dir

    run = tmp_path / "run"
    prepare_run_dir(run, {"csd": {"steps": 250, "lr": 1e-3}, "seed": 0, "command": "a"})
    prepare_run_dir(run, {"csd": {"steps": 1000, "lr": 1e-3}, "seed": 0, "command": "b"})  # no checkpoint yet: allowed
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "checkpoints" / "step_00000001" / "trainer_state.pt").write_bytes(b"")
    ckpt.write_json(run / "config.json", {"csd": {"steps": 250, "lr": 1e-3}, "seed": 0, "command": "a"})
    (run / "checkpoints" / "latest").write_text("step_00000001\n")
    assert ckpt.latest_checkpoint(run) is not None
    with pytest.raises(ValueError) as e:
        prepare_run_dir(run, {"csd": {"steps": 1000, "lr": 1e-3, "new_knob": True}, "seed": 0, "command": "c"})
    msg = str(e.value).split("different config (", 1)[1].rsplit("); use a new", 1)[0]  # the list of changes
    assert "csd.steps: 250 -> 1000" in msg and "csd.new_knob: absent -> true" in msg
    assert "lr" not in msg and "command" not in msg and "seed" not in msg
    prepare_run_dir(run, {"csd": {"steps": 250, "lr": 1e-3}, "seed": 0, "command": "d"})  # only volatile keys differ


def test_a_run_older_than_a_config_field_resumes_when_the_field_keeps_its_default(tmp_path):
    """A field added to a config dataclass (with a default = the old behaviour) must not lock out older runs."""
    import dataclasses

    import pytest

    from onestep import checkpoint as ckpt
    from onestep.dd2.csd import CSDConfig
    from onestep.trainer import prepare_run_dir

    run = tmp_path / "run"
    cfg = CSDConfig(steps=10)
    old = {k: v for k, v in cfg.to_dict().items() if k != "condition_on_codes"}  # saved before the field existed
    ckpt.write_json(run / "config.json", {"csd": old, "seed": 0})
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "checkpoints" / "step_00000001" / "trainer_state.pt").write_bytes(b"")
    (run / "checkpoints" / "latest").write_text("step_00000001\n")
    with pytest.raises(ValueError, match="csd.condition_on_codes: absent -> true"):  # not the default: a change
        prepare_run_dir(run, {"csd": dataclasses.replace(cfg, condition_on_codes=True), "seed": 0})
    assert "condition_on_codes" not in ckpt.read_json(run / "config.json")["csd"]  # a refused resume writes nothing
    with pytest.raises(ValueError, match="csd.condition_on_codes: absent -> false"):  # a plain dict has no defaults
        prepare_run_dir(run, {"csd": cfg.to_dict(), "seed": 0})
    config = {"csd": cfg, "seed": 0}
    prepare_run_dir(run, config)  # the dataclass brings its defaults: the same run
    assert config["csd"] == cfg.to_dict()  # the section is now its dict, as written
    assert ckpt.read_json(run / "config.json")["csd"]["condition_on_codes"] is False  # now recorded
    with pytest.raises(ValueError, match=r"csd.lr: 2e-05 -> 0.001"):  # a real change is still refused
        prepare_run_dir(run, {"csd": dataclasses.replace(cfg, lr=1e-3), "seed": 0})


def test_only_a_grown_step_count_passes_the_resume_check(tmp_path):
    import pytest

    from onestep import checkpoint as ckpt
    from onestep.trainer import GROWABLE_STEPS, extending, prepare_run_dir

    run = tmp_path / "run"
    ckpt.write_json(run / "config.json", {"train": {"steps": 10, "lr": 1e-3}, "seed": 0})
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "step_00000010" / "trainer_state.pt").write_bytes(b"")
    (run / "checkpoints" / "latest").write_text("step_00000010\n")
    with pytest.raises(ValueError, match=r"run of 10 steps \(train.steps\); a run grows but does not shrink"):
        prepare_run_dir(run, {"train": {"steps": 5, "lr": 1e-3}, "seed": 0})
    with pytest.raises(ValueError, match=r"different config \(train.lr: 0.001 -> 0.01; train.steps: 10 -> 20\)"):
        prepare_run_dir(run, {"train": {"steps": 20, "lr": 1e-2}, "seed": 0})
    ckpt.write_json(run / "config.json", {"train": {"steps": 10, "lr": 1e-3}, "model": {"steps": 3}, "seed": 0})
    with pytest.raises(ValueError, match=r"different config \(model.steps: 3 -> 4\)"):  # not a training section's
        prepare_run_dir(run, {"train": {"steps": 10, "lr": 1e-3}, "model": {"steps": 4}, "seed": 0})
    with pytest.raises(ValueError, match=r"run of 10 steps \(train.steps\); continuing it to 20 steps replaces its "
                                         r"final/: pass --extend"):
        prepare_run_dir(run, {"train": {"steps": 20, "lr": 1e-3}, "model": {"steps": 3}, "seed": 0})
    with extending():
        prepare_run_dir(run, {"train": {"steps": 20, "lr": 1e-3}, "model": {"steps": 3}, "seed": 0})
    assert ckpt.read_json(run / "config.json")["train"]["steps"] == 20
    assert set(GROWABLE_STEPS) == {"train.steps", "adapt.steps", "tune.steps", "csd.steps", "map_fit.steps",
                                   "mapkd.steps"}


def test_rng_draws_are_torch_draws_on_the_generators_device():
    from onestep import rng

    for fn, ref in ((rng.randn, torch.randn), (rng.rand, torch.rand)):
        a = fn((3, 4), torch.Generator().manual_seed(5), "cpu")
        b = ref((3, 4), generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and a.device.type == "cpu"
        assert fn((2,), torch.Generator().manual_seed(5)).shape == (2,)  # device defaults to the generator's
    assert rng.randn((2,), None, "meta").device.type == "meta"  # moved to the requested device


def test_no_source_draws_with_a_generator_onto_a_given_device():
    """torch.rand*(..., generator=g, device=d) fails on CUDA when g is the training loop's CPU generator; every such
    draw must go through onestep.rng (which draws on g's device and moves the result)."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "onestep"
    bad = []
    for path in src.rglob("*.py"):
        if path.name == "rng.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "torch" and \
                    node.func.attr in ("randn", "rand", "randint", "randperm", "randn_like", "rand_like"):
                kw = {k.arg for k in node.keywords}
                if {"generator", "device"} <= kw:
                    bad.append(f"{path.relative_to(src)}:{node.lineno}")
    assert not bad, bad


def test_resume_refuses_optimizer_state_saved_for_another_parameter_order(tmp_path):
    """PyTorch matches optimizer state to parameters by position: a checkpoint written before a module registered its
    parameters in another order must fail with a clear error, not load moments onto the wrong parameters."""
    import pytest

    from onestep import checkpoint as ckpt
    from onestep.trainer import LoopConfig, TrainLoop

    class Net(torch.nn.Module):
        def __init__(self, swapped: bool = False):
            super().__init__()
            if swapped:
                self.b = torch.nn.Linear(3, 2)
            self.a = torch.nn.Linear(2, 3)
            if not swapped:
                self.b = torch.nn.Linear(3, 2)

    def loop(net):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        return TrainLoop(tmp_path / "run", LoopConfig(steps=2, batch_size=1, seed=0, log_every=1, ckpt_every=1),
                         {"net": net}, {"net": opt}, {"net": {}}, desc="t"), opt

    def step(net, opt):
        def fn(i):
            opt.zero_grad()
            net.b(net.a(torch.randn(4, 2))).pow(2).mean().backward()
            opt.step()
            return {}
        return fn

    (tmp_path / "run").mkdir()
    net = Net()
    lp, opt = loop(net)
    lp.run(step(net, opt))
    lp2, opt2 = loop(Net())
    assert lp2.resume() and lp2.step == 2  # the same order resumes
    lp3, _ = loop(Net(swapped=True))
    with pytest.raises(ckpt.CheckpointError, match="optimizer state does not fit"):
        lp3.resume()


def test_amp_on_the_cpu_warns_that_it_is_ignored(tmp_path):
    import pytest

    from onestep.trainer import LoopConfig, TrainLoop

    net = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="CUDA-only"):
        TrainLoop(tmp_path, LoopConfig(steps=1, batch_size=1, amp=True), {"net": net},
                  {"net": torch.optim.SGD(net.parameters(), lr=0.1)}, {"net": {}})


def test_checkpoint_without_per_rank_streams_reseeds_the_other_ranks(tmp_path, capsys):
    """A checkpoint written before every rank's RNG state was saved (only rank 0's) must not give rank 1 rank 0's
    streams: rank 0 gets the saved ones, rank 1 a reseed from (seed, rank, step), with a message."""
    from onestep.trainer import LoopConfig, TrainLoop

    saved = TrainLoop(tmp_path, LoopConfig(4, 2), {}, {}, {}, DistInfo(rank=0, world_size=2))
    old_state = {"step": 3, **saved._rank_rng()}
    want = torch.rand(4, generator=torch.Generator().set_state(old_state["generator"]))
    draws = []
    for rank in (0, 1):
        loop = TrainLoop(tmp_path, LoopConfig(4, 2), {}, {}, {}, DistInfo(rank=rank, world_size=2))
        loop._restore_rng(old_state, "old checkpoint")
        draws.append(torch.rand(4, generator=loop.generator))
    assert torch.equal(draws[0], want) and not torch.equal(draws[1], want)
    assert "holds no RNG state for this rank" in capsys.readouterr().out


def _sgd_loop(run, steps, ckpt_every, max_nonfinite=20, poison_at=None, report_nonfinite=False):
    """A Linear trained by SGD through TrainLoop; the update of step ``poison_at`` writes a NaN into its weight."""
    from onestep.trainer import LoopConfig, TrainLoop

    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loop = TrainLoop(run, LoopConfig(steps=steps, batch_size=1, log_every=1, ckpt_every=ckpt_every,
                                     max_nonfinite=max_nonfinite), {"net": net}, {"net": opt}, {"net": {}}, desc="t")

    def step_fn(step):
        opt.zero_grad()
        loss = net(torch.randn(4, 3, generator=loop.generator)).pow(2).mean()
        loss.backward()
        opt.step()
        if step == poison_at:
            with torch.no_grad():
                net.weight[0, 1] = float("nan")
        return {"loss": loss.item(), "nonfinite": report_nonfinite and not torch.isfinite(loss).item()}
    return loop, step_fn


def test_a_nonfinite_weight_is_never_checkpointed_and_latest_keeps_the_last_finite_one(tmp_path):
    import pytest

    from onestep import checkpoint as ckpt

    run = tmp_path / "run"
    loop, step_fn = _sgd_loop(run, steps=10, ckpt_every=2, poison_at=4)  # steps 0-3 are clean: checkpoints 2 and 4
    with pytest.raises(ckpt.CheckpointError) as e:
        loop.run(step_fn)
    msg = str(e.value)
    assert "net: weight (parameter, " in msg and "NaN" in msg and "step_00000004" in msg and "\n" not in msg
    assert ckpt.latest_checkpoint(run).name == "step_00000004"
    kept = sorted(d.name for d in (run / "checkpoints").iterdir() if d.is_dir())
    assert kept == ["step_00000002", "step_00000004"]  # nothing poisoned written, nothing clean rotated away
    assert all(torch.isfinite(t).all() for t in ckpt.load_tensors(run / "checkpoints/step_00000004/net/model.safetensors").values())


def test_nonfinite_steps_from_nonfinite_weights_stop_at_once_naming_the_tensor(tmp_path):
    """A step skipped for a non-finite loss cannot repair NaN weights: the run stops at the first such step and names
    the tensor, instead of advising a lower learning rate after max_nonfinite skipped steps."""
    import pytest

    from onestep import checkpoint as ckpt

    loop, step_fn = _sgd_loop(tmp_path / "run", steps=20, ckpt_every=100, max_nonfinite=3, poison_at=1,
                              report_nonfinite=True)
    with pytest.raises(ckpt.CheckpointError, match=r"after step 3: net: weight \(parameter, \d+ NaN"):
        loop.run(step_fn)  # step 1 poisons the weight; step 2's loss is NaN
    assert loop.nonfinite_total == 0 and ckpt.latest_checkpoint(tmp_path / "run") is None


# ---- environment faults while writing a checkpoint ---------------------------------------------------------------
def _fault(kind, run, monkeypatch):
    """Make every later write of a checkpoint under ``run`` fail the way ``kind`` says."""
    import errno

    import safetensors

    from onestep import checkpoint as ckpt

    def raising(exc, real=None):
        def fake(*a, **k):
            if real is not None and not str(k.get("dir", a[0] if a else "")).startswith(str(run)):
                return real(*a, **k)
            raise exc
        return fake

    if kind == "full device":
        monkeypatch.setattr(torch, "save", raising(OSError(errno.ENOSPC, "No space left on device")))
    elif kind == "full device, torch's zip writer":
        monkeypatch.setattr(torch, "save", raising(RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                                "unexpected pos 576 vs 534")))
    elif kind == "full device, safetensors":
        monkeypatch.setattr(ckpt, "save_file", raising(safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")))
    elif kind == "read-only file system":
        monkeypatch.setattr(ckpt.tempfile, "mkstemp", raising(OSError(errno.EROFS, "Read-only file system"),
                                                               ckpt.tempfile.mkstemp))
    elif kind == "read-only directory":
        (run / "checkpoints").chmod(0o555)
        if os.access(run / "checkpoints", os.W_OK):  # root writes into a 0o555 directory: refuse as the OS would
            monkeypatch.setattr(ckpt.tempfile, "mkstemp", raising(PermissionError(errno.EACCES, "Permission denied"),
                                                                   ckpt.tempfile.mkstemp))


_FAULTS = {"full device": "no space left on device while writing",
           "full device, torch's zip writer": "no space left on device while writing",
           "full device, safetensors": "no space left on device while writing",
           "read-only file system": "cannot write",
           "read-only directory": "permission denied"}


@pytest.mark.parametrize("kind", list(_FAULTS))
def test_a_failed_checkpoint_write_says_why_and_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch, kind):
    """A full device, a read-only file system or a forbidden directory while a checkpoint is written: one line naming
    the file, no partial checkpoint left, ``latest`` still at the previous complete checkpoint, and the run resumes
    from it, once the fault is gone, to exactly the weights of an uninterrupted run."""
    from onestep import checkpoint as ckpt

    ref, ref_step = _sgd_loop(tmp_path / "ref", steps=6, ckpt_every=2)
    ref.run(ref_step)
    run = tmp_path / "run"
    loop, step_fn = _sgd_loop(run, steps=6, ckpt_every=2)
    with pytest.raises(OSError) as e:
        loop.run(step_fn, on_checkpoint=lambda step: _fault(kind, run, monkeypatch) if step == 2 else None)
    (run / "checkpoints").chmod(0o755)
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000002").rglob("*")) == \
        ["config.json", "model.safetensors", "net", "trainer_state.pt"]
    assert "step_00000004" in e.value.filename
    msg = ckpt.describe_os_error(e.value)  # what the CLI prints
    assert msg.startswith(_FAULTS[kind]) and str(run / "checkpoints" / "step_00000004") in msg and "\n" not in msg
    resumed, step_fn = _sgd_loop(run, steps=6, ckpt_every=2)
    resumed.run(step_fn)
    assert resumed.steps_run == 4  # from step 2
    a, b = ref.modules["net"].state_dict(), resumed.modules["net"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- half-written states ---------------------------------------------------------------------------------------------
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_trainer_state_gives_way_to_the_previous_checkpoint(tmp_path, capsys):
    """latest's trainer_state.pt cut short (e.g. a partial copy of the run): the run warns, names the file, resumes
    from the previous kept checkpoint and ends with exactly the weights of an uninterrupted run."""
    ref, ref_step = _sgd_loop(tmp_path / "ref", steps=6, ckpt_every=2)
    ref.run(ref_step)
    run = tmp_path / "run"
    loop, step_fn = _sgd_loop(run, steps=6, ckpt_every=2)
    loop.run(step_fn)
    broken = run / "checkpoints" / "step_00000006" / "trainer_state.pt"
    _truncate(broken)
    capsys.readouterr()
    resumed, step_fn = _sgd_loop(run, steps=6, ckpt_every=2)
    resumed.run(step_fn)
    err = capsys.readouterr().err
    assert f"cannot read {broken}" in err and "resuming from the previous checkpoint" in err and "step_00000004" in err
    assert resumed.steps_run == 2  # steps 4 and 5 again
    a, b = ref.modules["net"].state_dict(), resumed.modules["net"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_truncated_trainer_state_without_an_earlier_checkpoint_is_a_one_line_error(tmp_path):
    from onestep import checkpoint as ckpt

    run = tmp_path / "run"
    loop, step_fn = _sgd_loop(run, steps=2, ckpt_every=2)
    loop.run(step_fn)
    broken = run / "checkpoints" / "step_00000002" / "trainer_state.pt"
    _truncate(broken)
    resumed, _ = _sgd_loop(run, steps=4, ckpt_every=2)
    with pytest.raises(ckpt.CheckpointError) as e:
        resumed.resume()
    assert f"cannot read {broken}" in str(e.value) and "\n" not in str(e.value)


def test_add_run_time_sums_invocations_and_phases(tmp_path):
    """The one writer of a stage's times: totals and per-phase times both accumulate over calls."""
    import time

    from onestep.trainer import add_run_time

    t, c = time.time(), time.process_time()
    m = add_run_time(tmp_path, t - 2.0, c - 1.0, phase="fit", note="x")
    assert m["fit_wall_time_s"] >= 2.0 and m["fit_cpu_time_s"] >= 1.0 and m["note"] == "x"
    m = add_run_time(tmp_path, time.time() - 3.0, time.process_time() - 0.5, phase="finetune")
    assert m["finetune_wall_time_s"] >= 3.0 and m["fit_wall_time_s"] >= 2.0
    assert m["wall_time_s"] == pytest.approx(m["fit_wall_time_s"] + m["finetune_wall_time_s"], abs=0.02)
    assert m["cpu_time_s"] == pytest.approx(m["fit_cpu_time_s"] + m["finetune_cpu_time_s"], abs=0.02)
    assert json.loads((tmp_path / "metrics.json").read_text()) == m


def test_run_clock_counts_a_stopped_invocation_up_to_its_last_checkpoint(tmp_path):
    """A stage's metrics.json gets its time at every checkpoint (RunClock): an invocation stopped after its second
    checkpoint has those steps' CPU time recorded; the resume adds only its own; a finished run re-run adds none."""
    from onestep.trainer import LoopConfig, RunClock, TrainLoop

    net = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def busy(step):  # about 20 ms of CPU per step
        c = time.process_time()
        while time.process_time() - c < 0.02:
            torch.randn(64, 64) @ torch.randn(64, 64)
        if step == 5:
            raise KeyboardInterrupt  # stopped during step 6, after the checkpoints at steps 2 and 4
        return {}

    def loop():
        return TrainLoop(tmp_path, LoopConfig(steps=8, batch_size=1, log_every=100, ckpt_every=2), {"net": net},
                         {"net": opt}, {"net": {}}, desc="clock")

    with pytest.raises(KeyboardInterrupt):
        loop().run(busy, clock=RunClock(tmp_path))
    first = json.loads((tmp_path / "metrics.json").read_text())
    assert first["cpu_time_s"] >= 4 * 0.02  # the four steps that made the kept checkpoints

    def finish(step):
        c = time.process_time()
        while time.process_time() - c < 0.02:
            torch.randn(64, 64) @ torch.randn(64, 64)
        return {}

    clock = RunClock(tmp_path)
    lp = loop()
    lp.run(finish, clock=clock)
    total = clock.add()
    assert lp.steps_run == 4  # steps 5-8 trained again
    assert total["cpu_time_s"] - first["cpu_time_s"] >= 4 * 0.02
    assert total["cpu_time_s"] < first["cpu_time_s"] + 4 * 0.02 + 1.0  # the stopped step is not counted twice
    clock = RunClock(tmp_path)  # the finished run re-run (a pipeline reusing it): nothing trained, nothing added
    again = loop()
    again.run(finish, clock=clock)
    assert again.steps_run == 0 and clock.add()["cpu_time_s"] == total["cpu_time_s"]
