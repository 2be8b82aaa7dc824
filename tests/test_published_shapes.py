"""benchmarks/published_shapes.py at the unit tests' size: every row is timed, the one-step generators' outputs have
the right shapes and token ranges, and the rows' parts compute what the project's samplers compute."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "published_shapes.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("published_shapes", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["llamagen-tiny", "var-tiny"])
def test_rows_timed_and_outputs_in_range(bench, name, one_thread):
    shape = bench.TINY[name]
    res = bench.measure_shape(shape, batch_sizes=(1, 2), repeats=(2, 1), teacher_repeats=(1, 1), keep_outputs=True,
                              log=lambda *_: None)
    n, V, C = res["seq_len"], res["vocab_size"], res["code_dim"]
    for b in (1, 2):
        rows = res["batches"][str(b)]
        assert set(rows) == set(bench.ROWS)
        for r, x in rows.items():
            assert x["median_s"] > 0 and x["peak_mib"] >= x["peak_alloc_mib"] >= 0
            assert x["median_s"] == pytest.approx(sum(x["parts_median_s"].values()), rel=0.5)  # medians of parts
        assert 0 < rows["own"]["map_share"] < 1 and rows["bound"]["x_bound"] == 1.0
        out = res["outputs"][b]
        for r in ("teacher", "bound", "own", "dd2"):  # token ids
            assert out[r].shape == (b, n) and out[r].dtype == torch.long
            assert 0 <= int(out[r].min()) and int(out[r].max()) < V
        dd1 = out["dd1"]  # ids, or code vectors under the released output rule
        assert dd1.shape == ((b, n, C) if res["dd1_conti_from"] is not None else (b, n))
        assert out["decoder"].dtype == torch.uint8 and out["decoder"].shape[0] == b
    assert res["layout"] == {}  # no published fixture at the tiny size


def test_parts_equal_the_samplers(bench, one_thread):
    """MapKD's parts are MapKDGenerator.sample_ids; DD2's parts are ARDiffusion.generate + nearest code."""
    from onestep.teacher.base import nearest_code

    shape = bench.TINY["llamagen-tiny"]
    m = bench.build(shape)
    rows = bench.rows_of(m, shape, "cpu", bf16=False)
    labels = torch.tensor([0, 3])
    for r, gen in (("own", lambda eps: m.own.sample_ids(eps, labels)),
                   ("dd2", lambda eps: nearest_code(m.dd2.generate(eps, labels), m.teacher.codebook()))):
        with torch.inference_mode():
            _, st = bench.run_parts(rows[r], labels, torch.Generator().manual_seed(5), "cpu")
            assert torch.equal(st["out"], gen(st["eps"]))


def test_published_layouts_match_the_fixtures(bench):
    """The script's published models are built in the official layouts (checked on the meta device, no weights)."""
    from onestep.dd1.model import DD1Generator
    from onestep.teacher.llamagen import GPT, GPT_PRESETS

    shape = bench.PUBLISHED["llamagen-b"]
    with torch.device("meta"):
        gpt = GPT(GPT_PRESETS[shape.teacher_preset])
        dd1 = DD1Generator(GPT_PRESETS[shape.teacher_preset], input_mode="linear", conti_head=True)
    assert bench.layout_check(gpt, shape.fixtures["teacher"])["matches"]
    assert bench.layout_check(dd1, shape.fixtures["dd1"])["matches"]


def test_bf16_autocast_runs_on_the_cpu(bench, one_thread):
    res = bench.measure_shape(bench.TINY["var-tiny"], batch_sizes=(2,), repeats=(1,), teacher_repeats=(1,),
                              bf16=True, profile=False, keep_outputs=True, log=lambda *_: None)
    out = res["outputs"][2]
    assert out["own"].shape == (2, res["seq_len"]) and int(out["own"].max()) < res["vocab_size"]
