"""Speed at the published models' shapes: the teacher, every one-step generator and the one-forward bound, side by side.

Two published configurations are built with random weights in their official layouts (nothing is downloaded; the
state_dicts of the teacher, the tokenizer and DD1's generator are checked key for key against the layout fixtures in
tests/fixtures/checkpoints):

- LlamaGen-B 256px: GPT-B (111M parameters, 256 tokens, 16,384 codes of dim 8) and LlamaGen's VQ-16 decoder;
- VAR-d16 256px: VAR-d16 (310M, 10 scales, 680 tokens, 4,096 codes of dim 32) and VAR's VQVAE (ch 160) decoder.

Rows, each from class labels to tokens (or DD1's code vectors) in ONE process, interleaved (round-robin repeats,
medians):

- teacher: ancestral sampling with CFG and the KV cache, all AR steps (LlamaGen-B: 256; VAR-d16: 10 scales), under
  the upstream sampling defaults (LlamaGen's sample_c2i.py: CFG 4.0, top-k 2000; VAR's evaluation: CFG 1.5 ramped
  over the scales, top-k 900, top-p 0.96);
- one-forward bound: one parallel teacher-forcing pass of the teacher (backbone + logits head, argmax), no CFG;
- DD1, one step: the released generators' layout (LlamaGen-DD: linear input + continuous head, the release's output
  rule with continuous tokens from position 80; VAR-DD: argmax codes), one forward;
- MapKD, one step (MapKD, ``onestep.mapkd``): the teacher's backbone reading the noise, logits, then DD1's
  closed-form ODE map of every position (16 AB2 steps in log s, the default) over the generator's top-k codes, k the
  teacher's rule's (a generator trained under that rule samples under it: ``MapKDGenerator.top_k``);
- DD2, one step (``onestep.dd2.model.ARDiffusion``): backbone + MLP head (the project's default head, width 256,
  depth 3), one Euler step from t = 1, then the nearest code (DD2's default one-step sampler);
- decoder: token ids -> uint8 images (256x256), timed as its own row, identical for every row above (DD1's
  continuous vectors go through the same convolutions); totals "with decoder" add its median.

Each row is timed part by part (``--device cuda`` synchronises around every part), so the per-part breakdown sums to
the row. The ratios to the bound are given for the networks alone and with the decoder added to both sides. Peak
memory: the weights the row uses plus the peak of the tensors allocated during one call above what was allocated
before it (CPU: torch.profiler's allocation events, profile_memory=True, on the first, untimed call; CUDA:
torch.cuda.max_memory_allocated); the process's ru_maxrss is reported too. On the CPU the same profiled call gives
the operators where each part's time goes.

    python benchmarks/published_shapes.py --threads 1                  # CPU, both shapes, batch 1 and 8
    python benchmarks/published_shapes.py --device cuda --bf16 --repeats 20 10 --teacher-repeats 5 5

Writes benchmarks/results/published-shapes.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance  # noqa: E402

from onestep.data import to_uint8  # noqa: E402
from onestep.dd1.sampling import one_step as dd1_one_step  # noqa: E402
from onestep.mapkd.generator import MapKDGenerator, default_ode  # noqa: E402
from onestep.dd2.model import ARDiffusion, MLPHead  # noqa: E402
from onestep.paths import results_dir  # noqa: E402
from onestep.teacher.base import nearest_code  # noqa: E402
from onestep.teacher.sampling import SamplingConfig, sample_tokens  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "checkpoints"
LLAMAGEN_DD_CONTI_FROM = 80  # the LlamaGen-DD release's --split_t (onestep.importers)


@dataclass(frozen=True)
class Shape:
    """One published configuration: the tokenizer and teacher presets, the teacher's sampling rule, the layout
    fixtures its modules must match, and the DD2 MLP head (width, depth, time embedding)."""

    title: str
    family: str                      # "llamagen" or "var"
    tokenizer_preset: str            # onestep.tokenizer.vq.VQ_PRESETS / onestep.tokenizer.msvq.VQVAE_PRESETS
    teacher_preset: str              # GPT_PRESETS / VAR_PRESETS
    sampling: SamplingConfig
    fixtures: dict = field(default_factory=dict)  # module ("teacher", "tokenizer", "dd1") -> fixture name
    dd2_head: tuple[int, int, int] = (256, 3, 128)


PUBLISHED = {
    "llamagen-b": Shape("LlamaGen-B 256px (GPT-B, VQ-16)", "llamagen", "vq-16", "GPT-B",
                        SamplingConfig(cfg_scale=4.0, top_k=2000),
                        {"teacher": "llamagen-gpt-b-256", "tokenizer": "llamagen-vq-16", "dd1": "dd1-llamagen-b"}),
    "var-d16": Shape("VAR-d16 256px (VAR-d16, VQVAE ch160)", "var", "vae-ch160", "VAR-d16",
                     SamplingConfig(cfg_scale=2.5, cfg_schedule="linear", top_k=900, top_p=0.96),
                     {"teacher": "var-d16", "tokenizer": "var-vqvae-ch160-v4096-z32", "dd1": "dd1-var-d16"}),
}
# the same architectures at the unit tests' size (tests/test_published_shapes.py)
TINY = {
    "llamagen-tiny": Shape("LlamaGen tiny", "llamagen", "vq-16-tiny", "tiny", SamplingConfig(cfg_scale=4.0, top_k=8),
                           dd2_head=(16, 1, 16)),
    "var-tiny": Shape("VAR tiny", "var", "var-tiny", "tiny",
                      SamplingConfig(cfg_scale=2.5, cfg_schedule="linear", top_k=8, top_p=0.96), dd2_head=(16, 1, 16)),
}

ROWS = ("teacher", "bound", "dd1", "own", "dd2", "decoder")
ROW_TITLES = {"teacher": "teacher (CFG, KV cache, all AR steps)", "bound": "one-forward bound",
              "dd1": "DD1, one step", "own": "MapKD, one step (logits + closed-form map)",
              "dd2": "DD2 (CSD), one step (ARDiffusion)", "decoder": "decoder (ids -> uint8 images)"}
ONE_STEP = ("dd1", "own", "dd2")


# ---- models ---------------------------------------------------------------------------------------------------------
@dataclass
class Models:
    tokenizer: nn.Module
    teacher: nn.Module
    dd1: nn.Module
    own: MapKDGenerator
    dd2: ARDiffusion
    conti_from: int | None
    layout: dict


def layout_check(module: nn.Module, fixture: str) -> dict:
    """The module's state_dict against a published layout fixture: key order, shapes and dtypes."""
    path = FIXTURES / f"{fixture}.json"
    ref = json.loads(path.read_text())["state_dict"]
    sd = module.state_dict()
    bad = [k for k in sd if k not in ref or list(sd[k].shape) != ref[k]["shape"]
           or str(sd[k].dtype).replace("torch.", "") != ref[k]["dtype"]]
    ok = list(sd) == list(ref) and not bad
    return {"fixture": f"tests/fixtures/checkpoints/{fixture}.json", "keys": len(sd), "matches": ok,
            **({} if ok else {"mismatched": bad[:10], "missing": [k for k in ref if k not in sd][:10]})}


def _randomise_zero_params(*modules: nn.Module, std: float = 0.02) -> None:
    """Parameters that an initialiser leaves at zero (LlamaGen's logits head, the MLP head's output and gates) get
    small random values, as trained weights have: otherwise a row would time multiplications by zero matrices whose
    outputs (constant logits, v = 0) do not exercise the sampling path. The layout is unchanged."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if p.dim() >= 2 and not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def build(shape: Shape, device: str = "cpu") -> Models:
    """The tokenizer, teacher and the three one-step generators of ``shape``, random weights, eval mode."""
    torch.manual_seed(0)
    if shape.family == "llamagen":
        from onestep.dd1.model import DD1Generator
        from onestep.teacher.llamagen import GPT, continuous_copy, model_args
        from onestep.tokenizer.vq import VQModel, vq_config

        tok = VQModel(vq_config(shape.tokenizer_preset))
        h, w = tok.grid
        teacher = GPT(model_args(shape.teacher_preset, vocab_size=tok.vocab_size, code_dim=tok.code_dim,
                                 grid_h=h, grid_w=w), codebook=tok.codebook_vectors().detach())
        _randomise_zero_params(teacher)
        dd1 = DD1Generator.from_teacher(teacher, input_mode="linear", conti_head=True)  # LlamaGen-DD's layout
        conti_from = LLAMAGEN_DD_CONTI_FROM if teacher.seq_len > LLAMAGEN_DD_CONTI_FROM else None
        backbone = continuous_copy(teacher)  # DD2's stage 0: an MLP on code vectors in place of the token table
    elif shape.family == "var":
        from onestep.dd1.var_model import VARDD1Generator
        from onestep.teacher.var import VAR, var_args
        from onestep.tokenizer.msvq import VQVAE, vqvae_config

        tok = VQVAE(vqvae_config(shape.tokenizer_preset))
        c = tok.config
        teacher = VAR(var_args(shape.teacher_preset, vocab_size=c.codebook_size, code_dim=c.code_dim,
                               patch_nums=c.patch_nums, num_phi=c.num_phi, phi_index=c.phi_index,
                               quant_resi=c.quant_resi), quantizer=tok.quantize)
        dd1 = VARDD1Generator.from_teacher(teacher, conti_head=True)  # VAR-DD's layout
        conti_from = None  # VAR-DD's release samples argmax codes unless told a split
        backbone = copy.deepcopy(teacher)  # VAR reads code vectors: no stage 0
    else:
        raise ValueError(f"unknown family {shape.family!r}")
    own = MapKDGenerator.from_teacher(teacher, default_ode(teacher.codebook()), shape.family,
                                      top_k=shape.sampling.top_k)  # trained under the teacher's rule
    width, depth, time_dim = shape.dd2_head
    head = MLPHead(teacher.code_dim, teacher.feature_dim, width, depth, time_dim)
    _randomise_zero_params(head)
    dd2 = ARDiffusion(backbone, head)
    layout = {name: layout_check(mod, shape.fixtures[name])
              for name, mod in (("teacher", teacher), ("tokenizer", tok), ("dd1", dd1)) if name in shape.fixtures}
    mods = [m.to(device).eval().requires_grad_(False) for m in (tok, teacher, dd1, own, dd2)]
    return Models(*mods, conti_from=conti_from, layout=layout)


def num_params(*modules: nn.Module) -> int:
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def tensor_bytes(*modules: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the parameters and buffers (each tensor once), names starting with ``skip`` left out."""
    seen = {}
    for m in modules:
        for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
            if not name.startswith(skip):
                seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


# ---- the rows, part by part -----------------------------------------------------------------------------------------
Part = tuple[str, Callable[[dict], dict]]


def rows_of(m: Models, shape: Shape, device: str, bf16: bool) -> dict[str, list[Part]]:
    """Each row as a list of (part name, fn(state) -> state); the state starts as {"labels", "g"}. Networks run under
    bf16 autocast with ``bf16``; the closed-form map, the nearest-code search and the argmax stay in float32."""
    dev_type = torch.device(device).type
    amp = (lambda: torch.autocast(dev_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    exact = (lambda: torch.autocast(dev_type, enabled=False)) if bf16 else contextlib.nullcontext
    teacher, tok, cb = m.teacher, m.tokenizer, m.teacher.codebook()
    n, C, V = teacher.seq_len, teacher.code_dim, cb.shape[0]

    def noise(st: dict) -> torch.Tensor:
        return torch.randn((st["labels"].shape[0], n, C), generator=st["g"], device=device)

    def teacher_sample(st):
        with amp():
            return {**st, "out": sample_tokens(teacher, st["labels"], shape.sampling, st["g"])}

    def bound(st):
        ids = torch.randint(0, V, (st["labels"].shape[0], n), generator=st["g"], device=device)
        with amp():
            logits = teacher(ids, st["labels"])
        with exact():
            return {**st, "out": logits.argmax(-1)}

    def dd1(st):
        with amp():
            return {**st, "out": dd1_one_step(m.dd1, noise(st), st["labels"], m.conti_from)}

    def own_backbone(st):
        eps = noise(st)
        with amp():
            return {**st, "eps": eps, "h": m.own.net.features(eps, st["labels"])}

    def own_head(st):
        with amp():
            logits = m.own.net.head(st["h"])
        return {**st, "log_q": torch.log_softmax(logits.float(), dim=-1)}

    def own_map(st):
        with exact():
            return {**st, "out": m.own.draw(st["eps"], st["log_q"])}

    def dd2_backbone(st):
        eps = noise(st)
        with amp():
            return {**st, "eps": eps, "f": m.dd2.features(eps, st["labels"])}

    def dd2_head(st):
        s = m.dd2.generator_t
        with amp():
            return {**st, "x": m.dd2.denoise(st["eps"] * s, s, st["f"])}

    def dd2_nearest(st):
        with exact():
            return {**st, "out": nearest_code(st["x"].float(), cb)}

    def decode(st):
        ids = torch.randint(0, V, (st["labels"].shape[0], n), generator=st["g"], device=device)
        with amp():
            imgs = tok.decode_ids(ids)
        return {**st, "out": to_uint8(imgs.float().cpu())}

    k = len(teacher.ar_steps())
    return {"teacher": [(f"AR sampling, {k} steps", teacher_sample)],
            "bound": [("forward (backbone + logits head) + argmax", bound)],
            "dd1": [("forward + output rule" + (f" (continuous tokens from position {m.conti_from})"
                                                if m.conti_from is not None else " (argmax)"), dd1)],
            "own": [("backbone", own_backbone), ("logits head + log-softmax", own_head),
                    (f"closed-form map ({m.own.ode.n_steps} {m.own.ode.solver} steps over "
                     + (f"the top {m.own.top_k} of {V} codes)" if m.own.top_k else f"{V} codes)"), own_map)],
            "dd2": [("backbone", dd2_backbone), ("MLP head (one Euler step)", dd2_head),
                    (f"nearest code ({V} codes)", dd2_nearest)],
            "decoder": [("decoder", decode)]}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_parts(parts: list[Part], labels: torch.Tensor, g: torch.Generator, device: str) -> tuple[list[float], dict]:
    """One call of a row: seconds per part (synchronised around each part) and the final state."""
    st, times = {"labels": labels, "g": g}, []
    for name, fn in parts:
        _sync(device)
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"part:{name}"):
            st = fn(st)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, st


def profiled_call(parts: list[Part], labels, g, device: str, top: int = 6, ops: bool = True) -> dict:
    """One untimed call that measures the peak of the tensors allocated during it (above those allocated before it)
    and, on the CPU with ``ops``, the operators with the most self time in each part."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _, st = run_parts(parts, labels, g, device)
        return {"peak_alloc_mib": (torch.cuda.max_memory_allocated() - base) / 2 ** 20,
                "peak_memory": "torch.cuda.max_memory_allocated above the allocation before the call", "state": st}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _, st = run_parts(parts, labels, g, device)
    mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    peak = max(itertools.accumulate(b for _, b in mem), default=0)
    table: dict[str, dict[str, float]] = {}
    for e in (prof.events() if ops else ()):
        if e.name.startswith("part:") or e.name == "[memory]":
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith("part:"):
            p = p.cpu_parent
        if p is not None:
            d = table.setdefault(p.name[5:], {})
            d[e.name] = d.get(e.name, 0.0) + e.self_cpu_time_total / 1e3
    table = {k: dict(sorted(v.items(), key=lambda kv: -kv[1])[:top]) for k, v in table.items()}
    return {"peak_alloc_mib": max(peak, 0) / 2 ** 20, "ops_self_ms": table, "state": st,
            "peak_memory": "torch.profiler allocation events (profile_memory=True): running sum of the bytes "
                           "allocated minus freed during the call, its maximum"}


@torch.inference_mode()
def measure_shape(shape: Shape, batch_sizes=(1, 8), repeats=(5, 3), teacher_repeats=(3, 2), warmup: int = 1,
                  device: str = "cpu", bf16: bool = False, profile: bool = True, keep_outputs: bool = False,
                  log=print) -> dict:
    """Every row of ``shape`` at each batch size, interleaved: per batch size, ``warmup`` untimed calls per row (the
    first one profiled when ``profile``), then rounds over the rows until each has its repeats (the teacher's from
    ``teacher_repeats``)."""
    t0 = time.perf_counter()
    m = build(shape, device)
    build_s = time.perf_counter() - t0
    rows = rows_of(m, shape, device, bf16)
    modules = {"teacher": (m.teacher,), "bound": (m.teacher,), "dd1": (m.dd1,), "own": (m.own,), "dd2": (m.dd2,),
               "decoder": (m.tokenizer,)}
    skip = {"decoder": ("encoder.", "quant_conv.")}  # the decoder row uses the tokenizer minus its encoder
    out = {"shape": shape.title, "family": shape.family, "tokenizer_preset": shape.tokenizer_preset,
           "teacher_preset": shape.teacher_preset, "seq_len": m.teacher.seq_len,
           "ar_steps": len(m.teacher.ar_steps()), "vocab_size": m.teacher.codebook().shape[0],
           "code_dim": m.teacher.code_dim, "sampling": shape.sampling.to_dict(), "dd1_conti_from": m.conti_from,
           "own_ode": m.own.ode.to_dict(), "dd2_head": dict(zip(("width", "depth", "time_dim"), shape.dd2_head)),
           "layout": m.layout, "build_s": build_s,
           "params": {r: num_params(*modules[r]) for r in ROWS if r != "decoder"} |
                     {"decoder": sum(p.numel() for k, p in m.tokenizer.named_parameters()
                                     if not k.startswith(skip["decoder"]))},
           "weights_mib": {r: tensor_bytes(*modules[r], skip=skip.get(r, ())) / 2 ** 20 for r in ROWS},
           "batches": {}}
    outputs = {}
    for bi, b in enumerate(batch_sizes):
        labels = torch.arange(b, device=device) % m.teacher.num_classes
        gens = {r: torch.Generator(device=device).manual_seed(i) for i, r in enumerate(ROWS)}
        reps = {r: (teacher_repeats if r == "teacher" else repeats)[bi] for r in ROWS}
        times = {r: [] for r in ROWS}
        prof = {}
        for r in ROWS:
            for w in range(warmup):
                tw = time.perf_counter()
                if w == 0 and profile:
                    # the teacher's thousands of small operators: its allocations only (the operator table of its
                    # AR steps would hold the profiler's events of every step in memory)
                    prof[r] = profiled_call(rows[r], labels, gens[r], device, ops=r != "teacher")
                    st = prof[r].pop("state")
                else:
                    _, st = run_parts(rows[r], labels, gens[r], device)
                if keep_outputs:
                    outputs.setdefault(b, {})[r] = st["out"]
                log(f"[{shape.title} b={b}] warm-up {r}: {time.perf_counter() - tw:.2f} s")
        for k in range(max(reps.values())):
            for r in ROWS:
                if k < reps[r]:
                    t, _ = run_parts(rows[r], labels, gens[r], device)
                    times[r].append(t)
            log(f"[{shape.title} b={b}] round {k + 1}: " +
                ", ".join(f"{r} {sum(times[r][-1]):.2f} s" for r in ROWS if k < reps[r]))
        res = {}
        for r in ROWS:
            names = [p for p, _ in rows[r]]
            res[r] = {"title": ROW_TITLES[r], "repeats": len(times[r]),
                      "median_s": statistics.median(sum(t) for t in times[r]),
                      "parts_median_s": {p: statistics.median(t[i] for t in times[r]) for i, p in enumerate(names)},
                      "all_s": [sum(t) for t in times[r]]}
            if r in prof:
                res[r]["peak_alloc_mib"] = prof[r]["peak_alloc_mib"]
                res[r]["peak_mib"] = prof[r]["peak_alloc_mib"] + out["weights_mib"][r]
                if "ops_self_ms" in prof[r]:
                    res[r]["ops_self_ms"] = prof[r]["ops_self_ms"]
                out["peak_memory"] = prof[r]["peak_memory"]
        dec = res["decoder"]["median_s"]
        bnd = res["bound"]["median_s"]
        for r in ROWS:
            if r == "decoder":
                continue
            g_s = res[r]["median_s"]
            res[r]["with_decoder_s"] = g_s + dec
            res[r]["x_bound"] = g_s / bnd
            res[r]["x_bound_with_decoder"] = (g_s + dec) / (bnd + dec)
            res[r]["teacher_speedup"] = res["teacher"]["median_s"] / g_s
            res[r]["teacher_speedup_with_decoder"] = (res["teacher"]["median_s"] + dec) / (g_s + dec)
        own = res["own"]
        map_s = next(v for p, v in own["parts_median_s"].items() if p.startswith("closed-form map"))
        res["own"]["map_share"] = map_s / own["median_s"]
        res["own"]["map_share_with_decoder"] = map_s / (own["median_s"] + dec)
        out["batches"][str(b)] = res
    if keep_outputs:
        out["outputs"] = outputs
    del m
    return out


# ---- report ---------------------------------------------------------------------------------------------------------
def _ms(s: float) -> str:
    return f"{s * 1e3:,.0f}" if s >= 1 else f"{s * 1e3:.1f}"


def _spread(row: dict) -> str:
    return f"{_ms(row['median_s'])} ({_ms(min(row['all_s']))}-{_ms(max(row['all_s']))})"


def markdown(res: dict) -> str:
    lines = ["# Speed at the published models' shapes (random weights, official layouts)", "",
             f"- command: `{res['command']}`", f"- commit: `{res['commit']}`",
             f"- machine: {json.dumps(res['machine'])}",
             f"- device: {res['device']}, bf16 autocast: {res['bf16']}, torch threads: {res['threads']}; "
             f"timing: {res['timing']}",
             f"- peak memory: {res['peak_memory']}; process peak RSS (ru_maxrss) at the end: "
             f"{res['process_max_rss_mib']:,.0f} MiB",
             f"- wall time of the whole script: {res['wall_s'] / 60:.1f} min", ""]
    for key, sh in res["shapes"].items():
        lines += [f"## {sh['shape']}", "",
                  f"{sh['seq_len']} tokens in {sh['ar_steps']} AR steps, {sh['vocab_size']:,} codes of dim "
                  f"{sh['code_dim']}; teacher sampling rule {sh['sampling']}; MapKD's map "
                  f"{sh['own_ode']['n_steps']} {sh['own_ode']['solver']} steps, s in "
                  f"[{sh['own_ode']['s_min']:.3g}, {sh['own_ode']['s_max']:.3g}]; DD2 head {sh['dd2_head']}; "
                  f"built in {sh['build_s']:.0f} s.", "",
                  "Layouts: " + ("; ".join(f"{k} {'matches' if v['matches'] else 'DIFFERS FROM'} `{v['fixture']}` "
                                           f"({v['keys']} keys)" for k, v in sh["layout"].items())
                                 or "not checked (no published fixture at this size)"), "",
                  "| batch | row | params | repeats | generator (ms): median (min-max) | + decoder (ms) | x bound | x bound with decoder "
                  "| teacher speed-up (networks / with decoder) | peak memory (MiB): weights + activations |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for b, rows in sh["batches"].items():
            for r in ROWS:
                x = rows[r]
                mem = (f"{sh['weights_mib'][r]:,.0f} + {x['peak_alloc_mib']:,.0f} = {x['peak_mib']:,.0f}"
                       if "peak_mib" in x else "-")
                if r == "decoder":
                    lines.append(f"| {b} | {x['title']} | {sh['params'][r] / 1e6:.1f}M | {x['repeats']} | "
                                 f"{_spread(x)} | - | - | - | - | {mem} |")
                    continue
                lines.append(f"| {b} | {x['title']} | {sh['params'][r] / 1e6:.1f}M | {x['repeats']} | "
                             f"{_spread(x)} | {_ms(x['with_decoder_s'])} | {x['x_bound']:.2f} | "
                             f"{x['x_bound_with_decoder']:.2f} | {x['teacher_speedup']:.1f}x / "
                             f"{x['teacher_speedup_with_decoder']:.1f}x | {mem} |")
        lines += ["", "Parts (median ms; share of the row's generator time):", "",
                  "| batch | row | part | ms | share |", "|---|---|---|---|---|"]
        for b, rows in sh["batches"].items():
            for r in ("bound",) + ONE_STEP:
                for p, v in rows[r]["parts_median_s"].items():
                    lines.append(f"| {b} | {r} | {p} | {_ms(v)} | {v / rows[r]['median_s']:.0%} |")
        ops = {b: rows["own"].get("ops_self_ms", {}) for b, rows in sh["batches"].items()}
        if any(ops.values()):
            lines += ["", "Where the closed-form map's time goes (operators by self CPU time in the profiled call):",
                      ""]
            for b, parts in ops.items():
                for p, d in parts.items():
                    if p.startswith("closed-form map"):
                        lines.append(f"- batch {b}: " + ", ".join(f"{o} {v:,.1f} ms" for o, v in d.items()))
        lines += [""]
    lines += ["## Goals", "", "| shape | batch | goal | measured | met |", "|---|---|---|---|---|"]
    for g in res["goals"]:
        lines.append(f"| {g['shape']} | {g['batch']} | {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def goals(shapes: dict) -> list[dict]:
    out = []
    for sh in shapes.values():
        for b, rows in sh["batches"].items():
            for r in ONE_STEP:
                for key, what in (("x_bound_with_decoder", "with the decoder"), ("x_bound", "networks alone")):
                    v = rows[r][key]
                    out.append({"shape": sh["shape"], "batch": int(b),
                                "goal": f"{ROW_TITLES[r]} within 1.25x of the bound ({what})",
                                "measured": f"{v:.2f}x", "met": v <= 1.25})
            v = rows["own"]["map_share"]
            out.append({"shape": sh["shape"], "batch": int(b),
                        "goal": f"closed-form map under 10% of MapKD's one step ({sh['vocab_size']:,} codes)",
                        "measured": f"{v:.1%} ({rows['own']['map_share_with_decoder']:.1%} with the decoder)",
                        "met": v < 0.10})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED) + list(TINY))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, nargs="+", default=[5, 3],
                    help="timed calls per row at each batch size (one value per --batch-sizes entry)")
    ap.add_argument("--teacher-repeats", type=int, nargs="+", default=[3, 2],
                    help="timed calls of the teacher row at each batch size (it is the slow one)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per row and batch size (the first profiled)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the networks")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled call (no memory figures)")
    ap.add_argument("--out", default=str(results_dir() / "published-shapes"), help="output path without extension")
    a = ap.parse_args(argv)
    for name in ("repeats", "teacher_repeats"):
        v = getattr(a, name)
        if len(v) == 1:
            setattr(a, name, v * len(a.batch_sizes))
        elif len(v) != len(a.batch_sizes):
            ap.error(f"--{name.replace('_', '-')} takes one value or one per batch size")
    if a.warmup < 1 and not a.no_profile:
        ap.error("the profiled call is the first warm-up call: --warmup must be >= 1 (or pass --no-profile)")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    table = {**PUBLISHED, **TINY}
    shapes = {k: measure_shape(table[k], tuple(a.batch_sizes), tuple(a.repeats), tuple(a.teacher_repeats), a.warmup,
                               a.device, a.bf16, not a.no_profile) for k in a.shapes}
    res = {**provenance(), "device": a.device, "bf16": a.bf16, "threads": torch.get_num_threads(),
           "timing": "interleaved rounds over the rows, median wall seconds per call; each part synchronised",
           "peak_memory": next((sh["peak_memory"] for sh in shapes.values() if "peak_memory" in sh), "not measured"),
           "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "wall_s": time.perf_counter() - t0, "shapes": shapes}
    res["goals"] = goals(shapes)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
