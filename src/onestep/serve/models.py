"""The models behind ``onestep serve``: the teacher streamed step by step, the one-step generators, latent walks,
the side-by-side throughput timing and the bench's FIDs.

Every network call runs under one lock (:attr:`Models.lock`), so the latency measured for a method is its own
compute time on this machine, not time spent sharing the CPU with another request; concurrent requests queue for
the lock (their end-to-end latency includes the wait, which ``benchmarks/serve_load.py`` reports separately).
"""
from __future__ import annotations

import base64
import json
import math
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import onestep
from onestep import checkpoint as ckpt
from onestep import rng
from onestep.api import TEACHER_DEFAULTS
from onestep.data import FASHION_MNIST_CLASSES, MNIST_CLASSES, to_uint8
from onestep.dd1 import sampling as dd1_sampling
from onestep.dd1.load import load_dd1
from onestep.dd2.sampling import dd2_sampler, load_dd2
from onestep.eval.speed import machine_info, measure
from onestep.mapkd.sampling import load_mapkd, mapkd_sampler
from onestep.methods import METHODS, run_kind
from onestep.paths import assets_dir, checkout, results_dir
from onestep.runs import final_dir
from onestep.samplers import generate
from onestep.teacher.base import nearest_code
from onestep.teacher.load import load_teacher
from onestep.teacher.sampling import SamplingConfig, sample_tokens

KINDS = ("teacher", "dd1", "mapkd", "dd2")
ONE_STEP = ("dd1", "mapkd", "dd2")  # the one-step methods, in the order of the page
# the methods whose k-step panel the page shows (the first served), each under its default multi-step sampler
# (onestep.methods.METHODS), with the panel's label
MULTI = {"mapkd": "MapKD, 1 step + {k} Jacobi teacher pass{es}", "dd2": "DD2, 1 step + {k} teacher step{s} (Alg. 4)"}
LABELS = {"dd1": "DD1, 1 step", "mapkd": "MapKD, 1 step", "dd2": "DD2 (paper recipe), 1 step"}
SEED_MAX = 2 ** 31 - 1
THROUGHPUT_BATCHES = (1, 64)
UNFILLED = 48  # gray level of the token cells the teacher has not generated yet in a partial decode


def default_runs() -> dict[str, Path | None]:
    """The shipped runs of the default preset: {"teacher", "dd1", "mapkd", "dd2"} -> run directory under
    ``assets/fashion-mnist/`` (``ONESTEP_ASSETS`` overrides the assets folder), or None where it is not shipped."""
    root = assets_dir() / "fashion-mnist"
    out: dict[str, Path | None] = {}
    for kind in KINDS:
        d = root / kind
        out[kind] = d if (d / "final" / "config.json").exists() or (d / "config.json").exists() else None
    return out


def resolve_runs(runs: list[str] | None, defaults: dict[str, Path | None] | None = None) -> dict[str, Path | None]:
    """The runs to serve: each ``--run`` directory under its recorded kind (teacher, dd1, mapkd or dd2); a kind no
    ``--run`` gives comes from :func:`default_runs`. ValueError (one line) for two runs of one kind or a directory
    that holds no sampled run."""
    out = dict(default_runs() if defaults is None else defaults)
    given: dict[str, str] = {}
    for r in runs or []:
        kind = run_kind(r)
        if kind in given:
            raise ValueError(f"--run {given[kind]} and --run {r} are both {kind} runs; give one run of each kind")
        given[kind] = r
        out[kind] = Path(r)
    return out


def png_bytes(img: torch.Tensor) -> bytes:
    """A uint8 image (C, H, W), C = 1 or 3, as PNG (8-bit gray or RGB, no filter): small enough to write by hand,
    so the server needs no imaging library."""
    img = img.detach().to("cpu", torch.uint8)
    c, h, w = img.shape
    if c not in (1, 3):
        raise ValueError(f"PNG of {c} channels: expected 1 or 3")
    rows = img.permute(1, 2, 0).reshape(h, w * c).numpy()
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def data_url(img: torch.Tensor) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode("ascii")


def class_names(data: str | None, num_classes: int) -> list[str]:
    """Display names of the classes: Fashion-MNIST's and MNIST's by name, "class i" otherwise."""
    names = {"fashion-mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES}.get(data or "")
    if names is not None and len(names) == num_classes:
        return list(names)
    return [f"class {i}" for i in range(num_classes)]


def bench_fids(path: Path | None = None) -> dict:
    """The bench's FIDs of the served methods' rows (``benchmarks/results/paper-table.json``: teacher, dd1-1step,
    mapkd-*, dd2-*): {"source", "commit", "rows": [{method, steps, fid_classifier, fid_classifier_10000,
    fid_inception}]}; no rows when the file is absent."""
    path = path or results_dir() / "paper-table.json"
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {"source": str(path), "commit": None, "rows": []}
    keep = lambda m: m in ("teacher", "dd1-1step") or (m.startswith(("dd2-", "mapkd-")) and m.endswith("step"))  # noqa: E731
    rows = [{k: r.get(k) for k in ("method", "steps", "fid_classifier", "fid_classifier_10000", "fid_inception")}
            for r in table.get("rows", []) if keep(str(r.get("method")))]

    try:
        source = str(Path(path).resolve().relative_to(checkout()))
    except ValueError:
        source = str(path)
    return {"source": source, "commit": table.get("commit"), "rows": rows}


@dataclass
class Served:
    """One served panel: ``key`` ("teacher", "dd1", "mapkd", "dd2", or "<method>-k" for the k-step panel), its method
    and step count."""

    key: str
    method: str
    steps: int
    label: str
    run: str


@dataclass
class _OneStep:
    """A one-step generator opened at the noise level (for the latent walk): ``fn(eps, labels)`` -> ids or code
    vectors, ``shape`` the noise of one sample (n, C), ``ar_steps`` the AR steps of the teacher it distils,
    ``parts`` what its loader returned."""

    fn: Callable
    shape: tuple[int, int]
    decode: Callable
    ar_steps: int
    parts: tuple


class Models:
    """The served runs (see :func:`resolve_runs`), loaded once on ``device``.

    ``gens``: kind -> :class:`onestep.api.Generator` of the served runs; ``missing`` names the
    kinds that are absent. The teacher's default sampling rule is the one ``onestep sample`` uses
    (``onestep.api.TEACHER_DEFAULTS``), so its images equal ``onestep.load(teacher).sample(...)``'s.
    """

    def __init__(self, runs: dict[str, Path | None], device="cpu"):
        self.device = torch.device(device)
        self.runs = {k: (None if v is None else str(v)) for k, v in runs.items()}
        self.missing = [k for k in KINDS if self.runs.get(k) is None]
        if len(self.missing) == len(KINDS):
            raise ValueError("nothing to serve: no teacher, DD1, MapKD or DD2 run was given and none is shipped in "
                             "assets/fashion-mnist")
        self.lock = threading.Lock()
        self.gens: dict[str, onestep.Generator] = {}
        for kind in KINDS:
            if self.runs.get(kind):
                self.gens[kind] = onestep.load(self.runs[kind], device=self.device)
        first = next(iter(self.gens.values()))
        self.num_classes = first.num_classes
        self.image_shape = first.image_shape
        for k, g in self.gens.items():
            if g.num_classes != self.num_classes or g.image_shape != self.image_shape:
                raise ValueError(f"the {k} run ({g.run_dir}) makes {g.num_classes} classes of {g.image_shape} images, "
                                 f"the {next(iter(self.gens))} run {self.num_classes} of {self.image_shape}: serve "
                                 "runs of one data set")
        self.teacher = self.tokenizer = None
        self.teacher_steps = 0
        data = None
        if "teacher" in self.gens:
            self.teacher, tconfig, self.tokenizer = load_teacher(self.runs["teacher"], self.device)
            self.teacher_cfg = SamplingConfig(**TEACHER_DEFAULTS)
            self.teacher_steps = len(self.teacher.ar_steps())
            data = tconfig.get("data")
        self._walkers: dict[str, _OneStep] = {}
        self._samplers: dict = {}
        self.multi = next((k for k in MULTI if k in self.gens), None)  # the method of the k-step panel
        self.multi_ar_steps = self._walker(self.multi).ar_steps if self.multi else 0
        if data is None:
            data = ckpt.read_json(final_dir(first.run_dir) / "config.json").get("data")
        self.classes = class_names(data, self.num_classes)
        self.fids = bench_fids()

    # ---- what is served --------------------------------------------------------------------------------
    @property
    def one_step_keys(self) -> list[str]:
        return [k for k in ONE_STEP if k in self.gens]

    @property
    def k_max(self) -> int:
        """The largest k of the k-step panel (1 step + k teacher calls): at most K - 1 for a teacher of K AR steps
        (Alg. 4 with k = K would discard the generator's sample)."""
        return max(0, self.multi_ar_steps - 1)

    def panels(self, k: int) -> list[Served]:
        out = []
        if "teacher" in self.gens:
            out.append(Served("teacher", "teacher", self.teacher_steps, f"teacher, {self.teacher_steps} AR steps",
                              self.runs["teacher"]))
        if "dd1" in self.gens:
            out.append(Served("dd1", "dd1", 1, "DD1, 1 step", self.runs["dd1"]))
        for m in ("mapkd", "dd2"):
            if m in self.gens:
                out.append(Served(m, m, 1, LABELS[m], self.runs[m]))
                if k >= 1 and m == self.multi:
                    label = MULTI[m].format(k=k, s="s" if k > 1 else "", es="es" if k > 1 else "")
                    out.append(Served(f"{m}-k", m, 1 + k, label, self.runs[m]))
        return out

    def info(self) -> dict:
        return {"classes": self.classes, "num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "runs": self.runs, "missing": self.missing, "one_step": self.one_step_keys, "labels": LABELS,
                "multi": self.multi, "multi_row": f"{self.multi}-{METHODS[self.multi].multistep[0]}-" if self.multi else None,
                "teacher_steps": self.teacher_steps, "k_max": self.k_max, "k_default": min(3, self.k_max),
                "seed_max": SEED_MAX, "fids": self.fids, "machine": machine_info(),
                "panels": [p.__dict__ for p in self.panels(min(3, self.k_max))]}

    # ---- sampling ------------------------------------------------------------------------------------
    def _labels(self, label: int) -> torch.Tensor:
        return torch.tensor([label], device=self.device)

    def _sampler(self, panel: Served):
        """The sampler of a MapKD or DD2 panel at its step count: built once per (method, count) from the run loaded
        at start (the sampler ``onestep.load(run)`` builds, with the method's default multi-step sampler, without
        reading the run again)."""
        key = (panel.method, panel.steps)
        if key not in self._samplers:
            w = self._walker(panel.method)
            build = mapkd_sampler if panel.method == "mapkd" else dd2_sampler
            self._samplers[key] = build(*w.parts, steps=panel.steps)
        return self._samplers[key]

    def sample(self, panel: Served, labels: list[int], seed: int, batch_size: int = 1) -> torch.Tensor:
        """uint8 images (N, C, H, W) of ``panel`` for ``labels``: the images ``onestep.load(run).sample(labels,
        steps=panel.steps, seed=seed, batch_size=batch_size)`` gives."""
        if panel.method in MULTI:
            lab = self.gens[panel.method].labels_tensor(labels)
            return generate(self._sampler(panel), lab, seed, batch_size=batch_size, progress=False,
                            keep_tokens=False)["images"]
        return self.gens[panel.method].sample(labels, steps=panel.steps if panel.method != "teacher" else None,
                                              seed=seed, batch_size=batch_size)

    @torch.inference_mode()
    def one_step(self, panel: Served, label: int, seed: int) -> tuple[torch.Tensor, float]:
        """(uint8 image (C, H, W), seconds) of a one-step panel, timed under the lock."""
        if panel.method in MULTI:
            self._sampler(panel)  # built outside the timing
        with self.lock:
            t0 = time.perf_counter()
            img = self.sample(panel, [label], seed)
            dt = time.perf_counter() - t0
        return img[0], dt

    def _partial(self, ids: torch.Tensor, step: int) -> torch.Tensor:
        """The image of the teacher's grid after AR step ``step``: the tokenizer decodes the grid (positions not yet
        sampled hold code 0) and, for a raster-order teacher, the cells of those positions are grayed out. A
        multi-scale (VAR) teacher's partial grids are decoded as they are."""
        img = to_uint8(self.tokenizer.decode_ids(ids).float().cpu())[0]
        a, b = self.teacher.ar_steps()[step]
        n = self.teacher.seq_len
        g = math.isqrt(n)
        C, H, W = img.shape
        if g * g == n and H % g == 0 and W % g == 0 and all(y - x == 1 for x, y in self.teacher.ar_steps()):
            mask = torch.zeros(n, dtype=torch.bool)
            mask[b:] = True
            cell = mask.reshape(g, g).repeat_interleave(H // g, 0).repeat_interleave(W // g, 1)
            img = img.clone()
            img[:, cell] = UNFILLED
        return img

    @torch.inference_mode()
    def teacher_stream(self, label: int, seed: int, emit: Callable[[int, torch.Tensor], None]) -> tuple[torch.Tensor, float]:
        """Sample the teacher's image for (label, seed) step by step: ``emit(k, partial image)`` after AR step k
        (the last call carries the final image). Returns (final uint8 image, seconds of sampling and final decode,
        the partial decodes and ``emit`` not counted). The image equals ``onestep.load(teacher).sample([label],
        seed=seed)``'s: the same stream seed, and the hook draws nothing."""
        spent = [0.0]

        def on_step(k: int, ids: torch.Tensor) -> None:
            t = time.perf_counter()
            if k < self.teacher_steps - 1:
                emit(k, self._partial(ids, k))
            spent[0] += time.perf_counter() - t

        labels = self._labels(label)
        with self.lock:
            t0 = time.perf_counter()
            g = torch.Generator(device=self.device).manual_seed(rng.stream_seed(seed, 0))
            ids = sample_tokens(self.teacher, labels, self.teacher_cfg, g, on_step=on_step)

            img = to_uint8(self.tokenizer.decode_ids(ids).float().cpu())[0]
            dt = time.perf_counter() - t0 - spent[0]
        emit(self.teacher_steps - 1, img)
        return img, dt

    # ---- latent walk ----------------------------------------------------------------------------------
    def _walker(self, key: str) -> _OneStep:
        """The one-step generator ``key`` opened at the noise level (loaded once, on first use)."""
        if key not in self._walkers:
            if key == "dd1":
                parts = model, config, teacher, tok = load_dd1(self.runs["dd1"], self.device)
                cf = dd1_sampling.conti_from_of(config)
                fn = lambda eps, lab: dd1_sampling.one_step(model, eps, lab, cf)  # noqa: E731
                shape = (model.seq_len, model.code_dim)
            elif key == "mapkd":
                parts = gen, teacher, tok, _ = load_mapkd(self.runs["mapkd"], self.device)
                fn = gen.sample_ids
                shape = gen.noise_shape
            else:
                parts = gen, teacher, tok, _ = load_dd2(self.runs["dd2"], self.device)
                cb = teacher.codebook()
                fn = lambda eps, lab: nearest_code(gen.generate(eps, lab), cb)  # noqa: E731
                shape = gen.noise_shape

            def decode(out, tok=tok):
                imgs = tok.decode_codes(out) if out.is_floating_point() else tok.decode_ids(out)
                return to_uint8(imgs.float().cpu())

            self._walkers[key] = _OneStep(fn, shape, decode, len(teacher.ar_steps()), parts)
        return self._walkers[key]

    def noise(self, key: str, seed: int) -> torch.Tensor:
        """The noise (1, n, C) that ``gen.sample([c], seed=seed)`` feeds the one-step generator ``key``: the first
        draw of batch 0's stream."""
        g = torch.Generator(device=self.device).manual_seed(rng.stream_seed(seed, 0))
        return rng.randn((1, *self._walker(key).shape), g, self.device)

    @torch.inference_mode()
    def walk(self, key: str, label: int, seed_a: int, seed_b: int, t: float) -> tuple[torch.Tensor, float]:
        """The one-step image of noise cos(t pi/2) eps_a + sin(t pi/2) eps_b (uint8 (C, H, W), seconds).

        The weights' squares sum to 1, so for independent Gaussian eps_a, eps_b every point of the walk is again
        N(0, I) noise, the distribution the generator was trained on (a straight line would shrink the noise's norm
        towards t = 1/2); t = 0 and t = 1 give the images of ``seed_a`` and ``seed_b`` exactly."""
        w = self._walker(key)
        eps = math.cos(t * math.pi / 2) * self.noise(key, seed_a) + math.sin(t * math.pi / 2) * self.noise(key, seed_b)
        with self.lock:
            t0 = time.perf_counter()
            img = w.decode(w.fn(eps, self._labels(label)))[0]
            dt = time.perf_counter() - t0
        return img, dt

    # ---- throughput ---------------------------------------------------------------------------------
    def throughput(self, k: int, batch_sizes: tuple[int, ...] = THROUGHPUT_BATCHES, repeats: int = 3) -> dict:
        """Images per second of every panel at each batch size, side by side in this process
        (:func:`onestep.eval.speed.measure`: one warm-up call, then ``repeats`` round-robin rounds, the median),
        under the lock: the machine's other requests wait."""
        fns = {}
        labels = list(range(self.num_classes))
        for p in self.panels(k):
            if p.method in MULTI:
                self._sampler(p)

            def fn(b, p=p):
                return self.sample(p, (labels * (b // len(labels) + 1))[:b], seed=0, batch_size=b)

            fns[p.key] = fn
        ref = "teacher" if "teacher" in fns else None
        with self.lock, torch.inference_mode():
            t0 = time.perf_counter()
            res = measure(fns, batch_sizes=tuple(batch_sizes), warmup=1, repeats=repeats, reference=ref)
            res["wall_s"] = time.perf_counter() - t0
        labels = {p.key: p for p in self.panels(k)}
        for r in res["rows"]:
            p = labels[r["method"]]
            r.update(key=p.key, label=p.label, steps=p.steps, method=p.method)
        return res

    def warm_up(self) -> None:
        """One untimed sample per panel, so the first request's latencies are not those of a cold start."""
        k = min(1, self.k_max)
        for p in self.panels(k):
            if p.key == "teacher":
                self.teacher_stream(0, 0, lambda *a: None)
            else:
                self.one_step(p, 0, 0)
        for key in self.one_step_keys:
            self.walk(key, 0, 0, 1, 0.5)

