"""The Python API: load any run (teacher, DD1, DD2, MapKD) and sample images from it.

    import onestep
    gen = onestep.load("runs/mapkd", device="cpu")      # the method follows the run's recorded kind
    images = gen.sample([0, 1, 2], steps=1, seed=0)     # uint8 (N, C, H, W)

Sampling goes through the same samplers and per-batch seeds as ``onestep sample``, so the same run, labels, seed,
settings and batch size give the same images from the API and from the command line.
"""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import torch

from onestep import checkpoint as ckpt
from onestep.eval import report
from onestep.methods import METHODS, build_sampler, run_kind
from onestep.rng import SEED_MAX
from onestep.runs import final_dir, tokenizer_image_shape
from onestep.samplers import generate
from onestep.spec import RULE_FIELDS, TEACHER_DEFAULTS, SampleSpec
from onestep.teacher.sampling import SamplingConfig

__all__ = ["load", "Generator", "SampleSpec", "sampling_rule", "run_kind", "to_pil", "save_grid", "TEACHER_DEFAULTS",
           "RULE_FIELDS"]


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _recorded_rule(run_dir: str | Path) -> dict:
    return dict(ckpt.read_json(final_dir(run_dir) / "config.json")["sampling"])


def sampling_rule(method: str, run_dir: str | Path, given: dict, rule: dict | None = None) -> dict:
    """The teacher's sampling rule (``RULE_FIELDS``) ``method`` samples ``run_dir`` under, from ``given`` (None: not
    given): for the teacher, ``TEACHER_DEFAULTS`` with the given values; for a DD1 / DD2 run, the rule it was
    distilled under (``rule``, by default read from the run), where another given value is refused with one line
    (a ValueError). An invalid rule is refused too."""
    base = TEACHER_DEFAULTS if method.startswith("teacher") else (rule or _recorded_rule(run_dir))
    filled = {k: base[k] if given.get(k) is None else given[k] for k in RULE_FIELDS}
    if not method.startswith("teacher"):
        for k in RULE_FIELDS:
            if filled[k] != base[k]:
                _fail(f"this {method} run samples under the rule it was distilled with ({k}={base[k]!r}), "
                      f"not {k}={filled[k]!r}")
    SamplingConfig(**filled)  # ValueError for an invalid rule
    return filled


class Generator:
    """A loaded run that samples images: ``sample(labels, steps=None, seed=0, **settings)``.

    Attributes: ``method``, ``num_classes``, ``device``, ``image_shape`` (C, H, W), ``spec`` (the default
    :class:`SampleSpec`, its rule fields filled in), ``run_dir``.
    """

    def __init__(self, run_dir: str | Path, device="cpu", method: str | None = None, **settings):
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        kind = run_kind(run_dir)
        method = method or kind
        if method not in METHODS:
            _fail(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if (method.startswith("teacher") and kind != "teacher") or (not method.startswith("teacher") and method != kind):
            _fail(f"{run_dir} is a {kind} run; method {method!r} does not apply to it")
        self.method = method
        self._rule = _recorded_rule(run_dir) if kind in ("dd1", "dd2", "mapkd") else dict(TEACHER_DEFAULTS)
        self._samplers: dict = {}
        self.spec = self._resolve(SampleSpec(method=method), settings)
        sampler = self._sampler(self.spec)
        self.num_classes = int(sampler.info["num_classes"])
        self.image_shape = tokenizer_image_shape(sampler.tokenizer)

    def __repr__(self) -> str:
        return f"Generator(run_dir={str(self.run_dir)!r}, method={self.method!r}, device={str(self.device)!r})"

    def _resolve(self, spec: SampleSpec, settings: dict) -> SampleSpec:
        """``spec`` with ``settings`` applied, validated, its None rule fields filled in."""
        names = {f.name for f in fields(SampleSpec)} - {"method"}
        unknown = sorted(set(settings) - names)
        if unknown:
            _fail(f"unknown sampling setting {unknown[0]!r}; choose from {', '.join(sorted(names))}")
        spec = replace(spec, **settings)
        if isinstance(spec.steps, bool) or not isinstance(spec.steps, int) or spec.steps < 1:
            _fail(f"steps must be an integer >= 1, got {spec.steps!r}")
        filled = sampling_rule(self.method, self.run_dir, {k: getattr(spec, k) for k in RULE_FIELDS}, self._rule)
        return replace(spec, **filled)

    def _sampler(self, spec: SampleSpec):
        """The :class:`~onestep.samplers.Sampler` for a resolved spec (built once per spec)."""
        if spec not in self._samplers:
            try:
                self._samplers[spec] = build_sampler(spec.method, str(self.run_dir), device=self.device, args=spec)
            except ckpt.CheckpointError as e:
                raise ValueError(str(e)) from None
        return self._samplers[spec]

    def sampler(self, **settings):
        """The :class:`~onestep.samplers.Sampler` behind :meth:`sample` for the default spec with ``settings`` (any
        :class:`SampleSpec` field but ``method``) applied: its ``steps`` (sequential network calls), ``params`` and
        ``images(labels, generator)``, for timing and evaluation harnesses."""
        return self._sampler(self._resolve(self.spec, settings))

    def labels_tensor(self, labels):
        """``labels`` (a list of ints or an integer tensor) as a 1-D LongTensor on the device; ValueError when one is
        not a class of the run."""
        t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(list(labels))
        if t.ndim != 1 or t.numel() == 0:
            _fail(f"labels must be a non-empty 1-D list or tensor of class ids, got shape {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            _fail(f"labels must be integers, got dtype {t.dtype}")
        bad = t[(t < 0) | (t >= self.num_classes)]
        if bad.numel():
            _fail(f"label {int(bad[0])} is not a class of this run (it has {self.num_classes} classes: "
                  f"0..{self.num_classes - 1})")
        return t.long().to(self.device)

    def sample(self, labels, steps: int | None = None, seed: int = 0, batch_size: int = 100, **settings):
        """uint8 images (N, C, H, W) on the CPU, one per label.

        ``steps`` (None: the generator's default, 1) and ``settings`` (any :class:`SampleSpec` field but ``method``:
        ``continuous``, ``cfg_scale``, ``cfg_schedule``, ``temperature``, ``top_k``, ``top_p``) override the default
        spec for this call. Batch b of ``batch_size`` labels draws its noise from a stream of ``seed`` (as
        ``onestep sample``), so the same seed and batch size give the same images.
        """
        if steps is not None:
            settings["steps"] = steps
        spec = self._resolve(self.spec, settings)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            _fail(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(seed, bool) or not hasattr(seed, "__index__") or not 0 <= seed.__index__() <= SEED_MAX:
            _fail(f"seed must be an integer in 0..2**63-1, got {seed!r}")
        t = self.labels_tensor(labels)
        out = generate(self._sampler(spec), t, int(seed), batch_size=batch_size, progress=False, keep_tokens=False)
        return out["images"]


def load(run_dir: str | Path, device="cpu", method: str | None = None, **settings) -> Generator:
    """A :class:`Generator` for a run directory: a teacher run ("teacher"), a DD1 run ("dd1"), a DD2 run (``dd2
    train``: "dd2") or a MapKD run (``mapkd train``: "mapkd"), the method read from the run's recorded kind unless ``method`` names
    it ("teacher-nocache": the teacher without its KV cache). ``settings`` (:class:`SampleSpec` fields) set the
    generator's default spec. ValueError with one line for a directory that holds no such run."""
    return Generator(run_dir, device=device, method=method, **settings)


def to_pil(images) -> list:
    """uint8 images (N, C, H, W) (what :meth:`Generator.sample` returns) as a list of ``PIL.Image`` (mode "L" for one
    channel, "RGB" for three)."""
    from PIL import Image  # Pillow, optional (it comes with matplotlib): imported when images are converted

    _check_images(images)
    arr = images.permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def save_grid(images, path: str | Path, nrow: int | None = None, labels=None, class_names=None) -> Path:
    """uint8 images (N, C, H, W) tiled into one PNG at ``path`` (``nrow`` per row; None: one column per class when
    ``labels`` are given, else a near-square grid); with ``labels`` and ``class_names`` the classes are captioned.
    Returns the path."""
    _check_images(images)
    return report.save_grid(images, path, nrow=nrow, labels=labels, class_names=class_names)


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or \
            images.shape[1] not in (1, 3):
        _fail("images must be a uint8 tensor (N, C, H, W) with C = 1 or 3 (what Generator.sample returns), got "
              f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}")
