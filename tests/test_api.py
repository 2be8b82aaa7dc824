"""The Python API (onestep.load / Generator.sample) on tiny teacher, DD1 and DD2 runs made through the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import train_tiny_tokenizer_and_teacher

import onestep
from onestep.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_data = pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and a busy machine slows them down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny tokenizer and teacher (two training steps each), a tiny DD1 run and a tiny DD2 run, all through the CLI."""
    if not FASHION.exists():
        pytest.skip("Fashion-MNIST not installed")
    root = train_tiny_tokenizer_and_teacher(tmp_path_factory.mktemp("api"))
    teacher = str(root / "teacher")
    main(["dd1", "pairs", "--teacher", teacher, "--out", str(root / "pairs"), "--preset", "tiny", "--seed", "3"])
    main(["dd1", "train", "--pairs", str(root / "pairs"), "--teacher", teacher, "--run-dir", str(root / "dd1"),
          "--preset", "tiny"])
    main(["dd2", "adapt", "--preset", "tiny", "--teacher", teacher, "--run-dir", str(root / "adapt"),
          "--steps", "2", "--fit-steps", "5"])
    main(["dd2", "tune", "--preset", "tiny", "--teacher", str(root / "adapt"), "--run-dir", str(root / "tune")])
    main(["dd2", "train", "--preset", "tiny", "--tune", str(root / "tune"), "--run-dir", str(root / "dd2")])
    return root


def test_import_is_cheap():
    code = "import sys, onestep; assert 'torch' not in sys.modules; onestep.SampleSpec; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_data
@pytest.mark.parametrize("run,method", [("teacher", "teacher"), ("dd1", "dd1"), ("dd2", "dd2"), ("adapt", "teacher")])
def test_load_infers_method_and_samples_uint8(runs, run, method):
    gen = onestep.load(runs / run, device="cpu")
    assert gen.method == method and gen.num_classes == 10 and gen.device == torch.device("cpu")
    assert gen.image_shape == (1, 28, 28)
    images = gen.sample([0, 1, 2], steps=1, seed=0)
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 28, 28)
    again = gen.sample(torch.tensor([0, 1, 2]), seed=0)
    assert torch.equal(images, again)  # a list and a LongTensor, same seed: the same images
    assert not torch.equal(images, gen.sample([0, 1, 2], seed=1))


@needs_data
def test_image_helpers_give_pil_images_and_a_grid(runs, tmp_path):
    from PIL import Image

    images = onestep.load(runs / "teacher").sample([0, 1, 2, 3], seed=0)
    pil = onestep.to_pil(images)
    assert len(pil) == 4 and pil[0].mode == "L" and pil[0].size == (28, 28)
    assert torch.equal(torch.from_numpy(__import__("numpy").array(pil[2]))[None], images[2])
    path = onestep.save_grid(images, tmp_path / "grid.png", nrow=2)
    assert Image.open(path).size[0] > 2 * 28
    with pytest.raises(ValueError, match="uint8"):
        onestep.to_pil(images.float())


@needs_data
def test_api_matches_onestep_sample(runs):
    out = runs / "cli-samples"
    main(["sample", "--run", str(runs / "teacher"), "-n", "4", "--labels", "3,7", "--seed", "5", "--out", str(out)])
    with np.load(out / "teacher.npz") as f:
        cli = torch.from_numpy(f["images"])
    assert torch.equal(onestep.load(runs / "teacher").sample([3, 7, 3, 7], seed=5), cli)


@needs_data
@pytest.mark.parametrize("run", ["dd1", "dd2"])
def test_multi_step(runs, run):
    gen = onestep.load(runs / run)
    two = gen.sample([4, 5], steps=2, seed=0)
    assert two.dtype == torch.uint8 and two.shape == (2, 1, 28, 28)
    assert torch.equal(two, gen.sample([4, 5], steps=2, seed=0))
    three = gen.sample([4, 5], steps=3, seed=0)
    assert three.shape == (2, 1, 28, 28)


@needs_data
def test_teacher_sampling_settings_reach_the_sampler(runs):
    gen = onestep.load(runs / "teacher")
    labels = list(range(10)) * 2
    a = gen.sample(labels, seed=0, cfg_scale=1.0)
    assert not torch.equal(a, gen.sample(labels, seed=0, cfg_scale=100.0))  # (a 2-step teacher's guidance is weak)
    gen.sample(labels[:1], seed=0, cfg_scale=3.0, top_k=5)
    assert {"cfg_scale": 3.0, "top_k": 5}.items() <= gen.sampler(cfg_scale=3.0, top_k=5).info["sampling"].items()
    assert gen.sampler().steps == gen.sampler(steps=3).steps == 49  # the teacher's 7 x 7 AR steps, whatever steps says
    assert torch.equal(a, gen.sample(labels, seed=0, cfg_scale=1.0))
    assert torch.equal(gen.sample(labels, seed=0), gen.sample(labels, seed=0, cfg_scale=2.0))  # the CLI's default
    nocache = onestep.load(runs / "teacher", method="teacher-nocache")
    assert torch.equal(nocache.sample(labels, seed=0, top_k=4), gen.sample(labels, seed=0, top_k=4))


@needs_data
def test_dd2_continuous_and_spec(runs):
    gen = onestep.load(runs / "dd2")
    rule = json.loads((runs / "dd2" / "final" / "config.json").read_text())["sampling"]
    assert gen.spec == onestep.SampleSpec(method="dd2", steps=1, continuous=False, **rule)
    cont = gen.sample([0, 1], continuous=True)
    assert cont.shape == (2, 1, 28, 28) and cont.dtype == torch.uint8
    assert torch.equal(gen.sample([0, 1], cfg_scale=rule["cfg_scale"]), gen.sample([0, 1]))  # the recorded rule


@needs_data
def test_errors_are_value_errors(runs, tmp_path):
    gen = onestep.load(runs / "dd1")
    cases = [
        (lambda: gen.sample([0, 10]), "label 10 is not a class of this run"),
        (lambda: gen.sample(torch.tensor([-1])), "label -1 is not a class"),
        (lambda: gen.sample([0.5]), "labels must be integers"),
        (lambda: gen.sample([0], steps=0), "steps must be an integer >= 1"),
        (lambda: gen.sample([0], cfg_scale=7.0), "samples under the rule it was distilled with"),
        (lambda: gen.sample([0], guidance=2.0), "unknown sampling setting 'guidance'"),
        (lambda: onestep.load(tmp_path), "holds no finished model"),
        (lambda: onestep.load(tmp_path / "missing"), "does not exist"),
        (lambda: onestep.load(runs / "tok"), "'tokenizer' run"),
        (lambda: onestep.load(runs / "tune"), "stage-1"),
        (lambda: onestep.load(runs / "dd1", method="dd2"), "does not apply"),
        (lambda: onestep.load(runs / "teacher", method="nope"), "unknown method"),
    ]
    for call, text in cases:
        with pytest.raises(ValueError, match=text) as e:
            call()
        assert "\n" not in str(e.value)


def test_a_finished_dd2_run_continues_to_twice_its_steps(runs, capsys):
    """dd2 train --steps 4 --extend on a finished 2-step run trains steps 3-4 from its last checkpoint (CSD's loop end
    follows the step count); a changed learning rate is still refused."""
    run = runs / "dd2-grow"
    base = ["dd2", "train", "--preset", "tiny", "--tune", str(runs / "tune"), "--run-dir", str(run)]
    main(base)
    capsys.readouterr()
    main(base + ["--steps", "4", "--extend"])
    assert "csd.steps grows from 2 to 4" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert json.loads((run / "final" / "config.json").read_text())["csd"]["steps"] == 4
    onestep.load(run).sample([0], seed=0)
    with pytest.raises(SystemExit):
        main(base + ["--steps", "6", "--lr", "1e-3", "--extend"])
    assert "different config (csd.lr: " in capsys.readouterr().err


def test_export_loads_anywhere_and_samples_the_same_images(runs, tmp_path, capsys):
    """`onestep export` of a teacher, a DD1 and a DD2 run: the folders, moved elsewhere with the original runs
    deleted, load with onestep.load and give bit-identical images for the same seed; only final weights and configs
    that stay inside the folder."""
    import shutil

    from onestep.integrity import outside_references

    src = tmp_path / "src"
    shutil.copytree(runs, src, ignore=shutil.ignore_patterns("dd2-grow"))
    cases = {"teacher": [1], "dd1": [1, 2], "dd2": [1, 2]}
    labels = [0, 3, 1, 2]
    want = {(r, k): onestep.load(src / r).sample(labels, steps=k, seed=5) for r, ks in cases.items() for k in ks}
    for r in cases:
        main(["export", str(src / r), str(tmp_path / "exports" / r)])
        assert f"to {tmp_path / 'exports' / r}" in capsys.readouterr().out
    moved = tmp_path / "elsewhere" / "deeper"
    moved.parent.mkdir()
    shutil.move(tmp_path / "exports", moved)
    shutil.rmtree(src)
    for r, ks in cases.items():
        out = moved / r
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        comps = ["final", "tokenizer/final"] + ([] if r == "teacher" else ["teacher/final"])
        assert files == sorted(["README.md", "export.json"] + [f"{c}/{f}" for c in comps
                                                                for f in ("config.json", "model.safetensors")])
        assert outside_references(out) == []
        gen = onestep.load(out)
        assert gen.method == r
        for k in ks:
            assert torch.equal(gen.sample(labels, steps=k, seed=5), want[(r, k)]), (r, k)
        card = json.loads((out / "export.json").read_text())
        assert card["method"] == r and set(card["components"]) == {c.split("/")[0] for c in comps} | {"final"}
        readme = (out / "README.md").read_text()
        assert "onestep.load(" in readme and "## Recipe" in readme and "## Measured" in readme
    dd2_card = json.loads((moved / "dd2" / "export.json").read_text())
    assert "wall_time_s" in dd2_card["metrics"] and dd2_card["recipe"]["final"]["section"] == "csd"
    assert dd2_card["recipe"]["stage 1 (not exported)"]["section"] == "tune"  # read from the run it came from
    gen_cfg = json.loads((moved / "dd2" / "final" / "config.json").read_text())
    assert gen_cfg["teacher_dir"] == "teacher" and "tune_dir" not in gen_cfg
    assert json.loads((moved / "dd2" / "teacher" / "final" / "config.json").read_text())["tokenizer_dir"] == \
        str(Path("..") / "tokenizer")


def test_export_half_stores_float16_weights_that_load_as_the_rounded_originals(runs, tmp_path):
    """`onestep export --half`: every float32 tensor is stored as float16, and the loaded generator's weights are
    exactly the original float32 weights rounded to float16 (the modules run in float32 as before)."""
    from onestep.checkpoint import load_tensors

    out = tmp_path / "dd1-half"
    main(["export", str(runs / "dd1"), str(out), "--half"])
    stored = load_tensors(out / "final" / "model.safetensors")
    original = load_tensors(runs / "dd1" / "final" / "model.safetensors")
    assert set(stored) == set(original)
    for k, v in original.items():
        want = v.half() if v.dtype == torch.float32 else v
        assert stored[k].dtype == want.dtype and torch.equal(stored[k], want), k
    assert json.loads((out / "final" / "config.json").read_text())["weights_dtype"] == "float16"
    gen = onestep.load(out)
    assert gen.sample([0, 1], seed=0).shape[0] == 2


def test_export_refuses_a_nonempty_folder_and_a_stage_one_run_with_one_line(runs, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    for run, out, what in ((runs / "dd1", taken, "already exists and is not empty"),
                           (runs / "tune", tmp_path / "t1", "stage-1"),
                           (tmp_path / "nothing", tmp_path / "t2", "does not exist")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["export", str(run), str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and what in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no output and no temporary folder left
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    main(["export", str(runs / "dd1"), str(tmp_path / "empty")])
    assert onestep.load(tmp_path / "empty").method == "dd1"  # an empty folder is filled


def _shipped_export(tmp_path, name="dd1"):
    """A copy of a shipped export folder (assets/fashion-mnist/NAME), or a skip."""
    import shutil

    from onestep.paths import assets_dir

    src = assets_dir() / "fashion-mnist" / name
    if not (src / "export.json").exists():
        pytest.skip(f"the shipped {name} export is not there")
    shutil.copytree(src, tmp_path / name)
    return tmp_path / name


def test_an_export_is_verified_before_it_loads(tmp_path, capsys):
    """onestep.load and onestep sample check an export first: weights whose SHA-256 is not the one export.json
    records, a config that points outside the folder, and (an export made of them) non-finite weights are each
    refused with one line."""
    import hashlib

    from safetensors.torch import load_file, save_file

    import os

    from onestep.paths import assets_dir

    out = _shipped_export(tmp_path)
    assert onestep.load(out).sample([0], seed=0).shape == (1, 1, 28, 28)
    weights = out / "final" / "model.safetensors"
    original = weights.read_bytes()
    changed = bytearray(original)
    changed[-3] ^= 0x40  # one bit of the last weight
    weights.write_bytes(bytes(changed))
    with pytest.raises(ValueError, match="does not match the SHA-256 that .*export.json records") as e:
        onestep.load(out)
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--run", str(out), "-n", "2", "--out", str(tmp_path / "samples")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "SHA-256" in err[0], err
    weights.write_bytes(original)
    cfg_path = out / "final" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    elsewhere = os.path.relpath(assets_dir() / "fashion-mnist" / "teacher", out)  # a teacher run outside the folder
    cfg_path.write_text(json.dumps({**cfg, "teacher_dir": elsewhere}))
    with pytest.raises(ValueError, match="configs reach outside it") as e:
        onestep.load(out)
    cfg_path.write_text(json.dumps(cfg))
    sd = load_file(weights)
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, weights)
    card = json.loads((out / "export.json").read_text())
    card["components"]["final"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (out / "export.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=f"non-finite values in final: {key} ") as e:
        onestep.load(out)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "samples").exists()


def test_seeds_outside_0_to_2_63_minus_1_are_refused(tmp_path):
    gen = onestep.load(_shipped_export(tmp_path))
    for seed in (-1, 2 ** 70, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer in 0..2"):
            gen.sample([0], seed=seed)
    assert gen.sample([0], seed=2 ** 63 - 1).shape == (1, 1, 28, 28)
