"""Checkpoints: strict loading with a readable diff, atomic writes, clear errors for bad files."""
import pytest
import torch

from onestep import checkpoint as ckpt
from onestep.teacher.llamagen import GPT, model_args


def test_save_load_roundtrip(tmp_path, tiny_gpt):
    ckpt.save_model(tmp_path / "m", tiny_gpt, {"kind": "teacher", "model": tiny_gpt.args.to_dict()})
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "config.json").exists()
    other = GPT(model_args("tiny"))
    cfg = ckpt.load_model_weights(tmp_path / "m", other)
    assert cfg["kind"] == "teacher"
    for k, v in tiny_gpt.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])


def test_wrong_shape_lists_missing_unexpected_and_mismatched(tmp_path, tiny_gpt):
    sd = dict(tiny_gpt.state_dict())
    sd["output.weight"] = torch.zeros(3, 3)
    del sd["norm.weight"]
    sd["extra.bias"] = torch.zeros(2)
    ckpt.save_tensors(tmp_path / "model.safetensors", sd)
    ckpt.write_json(tmp_path / "config.json", {})
    with pytest.raises(ckpt.CheckpointMismatchError) as e:
        ckpt.load_model_weights(tmp_path, GPT(model_args("tiny")))
    msg = str(e.value)
    assert "norm.weight: [32]" in msg                       # missing, with shape
    assert "extra.bias: [2]" in msg                         # unexpected, with shape
    assert "output.weight: checkpoint [3, 3] vs model [16, 32]" in msg


def test_bigger_preset_into_smaller_model_is_refused(tmp_path):
    ckpt.save_model(tmp_path, GPT(model_args("tiny", n_layer=3)), {})
    with pytest.raises(ckpt.CheckpointMismatchError, match="layers.2.attention.wqkv.weight"):
        ckpt.load_model_weights(tmp_path, GPT(model_args("tiny")))


def test_corrupt_or_missing_files_give_clear_errors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    ckpt.write_json(tmp_path / "config.json", {})
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_model_weights(tmp_path, GPT(model_args("tiny")))
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_model_weights(tmp_path / "nowhere", GPT(model_args("tiny")))


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    ckpt.write_json(p, {"a": 1})

    def boom(tmp):
        open(tmp, "w").write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(p, boom)
    assert ckpt.read_json(p) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_run_references_resolve_from_final_raw_and_checkpoint_dirs(tmp_path):
    from onestep.runs import ref_to, resolve_ref

    teacher, run = tmp_path / "teacher", tmp_path / "runs" / "dd2"
    teacher.mkdir()
    ref = ref_to(teacher, run)  # recorded relative to the run directory
    for model_dir in (run / "final", run / "raw", run / "checkpoints" / "step_00000050" / "generator"):
        model_dir.mkdir(parents=True)
        assert resolve_ref(ref, model_dir).resolve() == teacher.resolve()
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        resolve_ref("../nowhere", run / "final")


# ---- resumable training state: read without running code -------------------------------------------------------
def _tiny_loop(run, steps=2, every=1):
    from onestep.trainer import LoopConfig, TrainLoop

    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    loop = TrainLoop(run, LoopConfig(steps=steps, batch_size=1, log_every=1, ckpt_every=every), {"net": net},
                     {"net": opt}, {"net": {}}, desc="t")

    def step_fn(step):
        opt.zero_grad()
        net(torch.randn(4, 3, generator=loop.generator)).pow(2).mean().backward()
        opt.step()
        return {}
    return loop, step_fn


class _Payload:
    """Pickles as a call to open(marker, "w"): unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_trainer_state_is_refused_unread(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "payload-ran"
    loop, step_fn = _tiny_loop(run)
    loop.run(step_fn)
    planted = ckpt.latest_checkpoint(run) / "trainer_state.pt"
    torch.save({"step": 2, "optimizers": {}, "payload": _Payload(marker)}, planted)
    resumed, _ = _tiny_loop(run)
    with pytest.raises(Exception) as e:
        resumed.resume()
    assert not marker.exists(), "unpickling the planted file ran its code"
    assert isinstance(e.value, ckpt.CheckpointError)  # the CLI prints it as one line
    msg = str(e.value)
    assert str(planted) in msg and "refusing to load" in msg and "\n" not in msg


def test_a_trainer_state_with_numpy_rng_arrays_still_resumes(tmp_path):
    """Checkpoints written before the RNG states became tensors hold numpy's key array; they still load (weights only)
    and restore numpy's stream."""
    import numpy as np

    run = tmp_path / "run"
    loop, step_fn = _tiny_loop(run)
    loop.run(step_fn)
    path = ckpt.latest_checkpoint(run) / "trainer_state.pt"
    state = ckpt.load_trainer_state(path)
    np.random.seed(7)
    state["rng"]["numpy"] = np.random.get_state()  # the older layout: (name, uint32 array, pos, has_gauss, gauss)
    want = np.random.rand(3)
    torch.save(state, path)
    resumed, _ = _tiny_loop(run)
    assert resumed.resume() and resumed.step == 2
    assert np.array_equal(np.random.rand(3), want)


def test_every_torch_load_is_weights_only():
    """A torch.load that is not weights-only unpickles arbitrary code: every call in the project passes
    weights_only=True."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad, seen = [], 0
    for top in ("src", "tests", "scripts", "benchmarks", "examples"):
        for path in (root / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    seen += 1
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                        bad.append(f"{path.relative_to(root)}:{node.lineno}")
    assert seen and not bad, bad


def test_nonfinite_weights_are_never_written_but_a_mask_buffer_may_hold_minus_inf(tmp_path):
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("mask", torch.tensor([0.0, float("-inf")]))  # e.g. an attention bias

    m = Masked()
    ckpt.save_model(tmp_path / "ok", m, {})  # an infinite buffer entry is a value, not a divergence
    with torch.no_grad():
        m.lin.bias[1] = float("inf")
    with pytest.raises(ckpt.NonFiniteError, match=r"lin.bias \(parameter, 1 inf of 2 values\)"):
        ckpt.save_model(tmp_path / "bad", m, {})
    with torch.no_grad():
        m.lin.bias[1] = 0.0
        m.mask[0] = float("nan")
    with pytest.raises(ckpt.NonFiniteError, match=r"mask \(buffer, 1 NaN of 2 values\)"):
        ckpt.save_training_checkpoint(tmp_path / "run", 1, {"m": m}, {}, {"step": 1})
    assert not (tmp_path / "bad").exists() and not (tmp_path / "run" / "checkpoints").exists()


# ---- finished model directories: weights and config both there ------------------------------------------------------
def test_a_model_dir_is_finished_only_with_its_weights_and_its_config(tmp_path, tiny_gpt, monkeypatch):
    from onestep.runs import final_dir

    run = tmp_path / "teacher"
    final = run / "final"
    ckpt.save_model(final, tiny_gpt, {"kind": "teacher", "model": tiny_gpt.args.to_dict()})
    assert ckpt.is_model_dir(final) and final_dir(run) == final
    (final / "config.json").unlink()  # the weights were written, the config never was
    assert not ckpt.is_model_dir(final)
    with pytest.raises(ckpt.CheckpointError, match="half-written .* re-run the command that trained it"):
        final_dir(run)

    ckpt.save_model(final, tiny_gpt, {"kind": "teacher", "model": tiny_gpt.args.to_dict()})

    def full_device(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_device)  # a rewrite cut short: never new weights beside an old config
    with pytest.raises(OSError):
        ckpt.save_model(final, tiny_gpt, {"kind": "teacher", "model": tiny_gpt.args.to_dict(), "rewritten": True})
    assert not ckpt.is_model_dir(final)


def test_the_pipeline_runs_a_stage_again_when_its_model_dir_is_half_written(tmp_path, tiny_gpt):
    from onestep.pipeline import Pipeline, PipelineConfig

    p = Pipeline(tmp_path / "root", PipelineConfig("t"))
    final = tmp_path / "stage" / "final"
    ckpt.save_model(final, tiny_gpt, {})
    (final / "config.json").unlink()
    ran = []
    assert p._stage("stage", final, lambda: ran.append(1) or final) == final and ran == [1]
    ckpt.write_json(final / "config.json", {})
    assert p._stage("stage", final, lambda: ran.append(2) or final) == final and ran == [1]  # finished: reused


def test_rotation_keeps_the_checkpoint_before_latest(tmp_path):
    """After a resume from an earlier checkpoint (latest was unreadable), the next checkpoint keeps the one before it
    (what a later fallback needs) and drops the abandoned later one."""
    m = torch.nn.Linear(2, 2)
    for step in (2, 4, 6):
        ckpt.save_training_checkpoint(tmp_path, step, {"m": m}, {}, {"step": step})
    ckpt.save_training_checkpoint(tmp_path, 5, {"m": m}, {}, {"step": 5})  # resumed from step 4
    assert sorted(d.name for d in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000005"]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000005" and ckpt.previous_checkpoint(latest).name == "step_00000004"


# ---- weights checked before use ---------------------------------------------------------------------------------
def _shipped_teacher_copy(tmp_path):
    """A copy of the shipped teacher run and its tokenizer (tmp/teacher, tmp/tokenizer), or a skip."""
    import shutil

    from onestep.paths import assets_dir

    src = assets_dir() / "fashion-mnist"
    if not (src / "teacher" / "final" / "config.json").exists():
        pytest.skip("the shipped teacher is not there")
    for name in ("teacher", "tokenizer"):
        shutil.copytree(src / name / "final", tmp_path / name / "final")
    return tmp_path / "teacher"


@pytest.mark.parametrize("field, value, message", [
    ("dim", -8, "model.dim must be an integer in 1..1048576, got -8"),
    ("n_layer", "2", 'model.n_layer must be an integer in 1..1024, got "2"'),
    ("dim", 1e9, "model.dim must be an integer in 1..1048576, got 1000000000.0"),
    ("n_layer", 10 ** 9, "model.n_layer must be an integer in 1..1024, got 1000000000"),
    ("dim", 98304, "does not fit the model"),  # a real build: ~3 TB of weights; the header says otherwise
    ("n_layer", 3, "does not fit the model"),
    (None, [1, 2], "is not a JSON object (it holds a list)"),
], ids=["dim -8", "n_layer str", "dim float", "n_layer 1e9", "dim 98304", "n_layer 3", "a list"])
def test_a_configs_sizes_are_checked_before_any_tensor_is_allocated(tmp_path, monkeypatch, field, value, message):
    """config.json's sizes are integers in bounds, and the model they describe, built on the meta device, has the
    keys and shapes of the weight file's header: a config that does not describe its weights is refused without
    building the model for real (today's raw TypeError / AttributeError / unbounded allocation)."""
    import json

    from onestep.teacher.load import load_teacher
    from onestep.teacher import llamagen

    teacher = _shipped_teacher_copy(tmp_path)
    cfg_path = teacher / "final" / "config.json"
    config = json.loads(cfg_path.read_text())
    if field is None:
        config = value
    else:
        config["model"][field] = value
    cfg_path.write_text(json.dumps(config))
    built, init = [], llamagen.GPT.__init__

    def spy(self, *a, **k):
        built.append(torch.empty(0).device.type)
        init(self, *a, **k)

    monkeypatch.setattr(llamagen.GPT, "__init__", spy)
    with pytest.raises(ckpt.CheckpointError) as e:
        load_teacher(teacher)
    assert message in str(e.value)
    assert "cpu" not in built  # never built for real (the meta device allocates nothing)
    if "does not fit" not in message:  # (a mismatch lists every key, one per line)
        assert "\n" not in str(e.value)


def test_a_truncated_weight_file_is_refused_from_its_header(tmp_path):
    teacher = _shipped_teacher_copy(tmp_path)
    weights = teacher / "final" / "model.safetensors"
    assert ckpt.read_header(weights)["tok_embeddings.weight"] == (512, 192)
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"\(truncated or not a safetensors file\): tensor .tok_"):
        ckpt.read_header(weights)


def test_a_nan_in_a_teachers_weights_is_a_one_line_error_of_sample(tmp_path, capsys):
    """A NaN in final/model.safetensors is refused when the weights load, with one line (not a traceback from the
    sampler's multinomial)."""
    from safetensors.torch import load_file, save_file

    from onestep.cli import main

    teacher = _shipped_teacher_copy(tmp_path)
    sd = load_file(teacher / "final" / "model.safetensors")
    sd["layers.0.attention.wqkv.weight"][3, 4] = float("nan")
    save_file(sd, teacher / "final" / "model.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["sample", "--run", str(teacher), "-n", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "non-finite values in final: layers.0.attention.wqkv.weight (parameter, 1 NaN of" in err[0]
    assert not (tmp_path / "out").exists()
