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
