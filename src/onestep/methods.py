"""Every way of sampling a run, in one registry: the run kinds, the method each kind samples with, and each method's
sampler builder and multi-step samplers.

=================  ===================================  ========================  ==========================
method             run kind (``final/config.json``)     one step                  multi-step samplers
=================  ===================================  ========================  ==========================
teacher            teacher                              -                         (all AR steps, KV cache)
teacher-nocache    teacher                              -                         (all AR steps, no cache)
dd1                dd1                                  DD1's generator           dd1 (default), alg4, jacobi
dd2                dd2-generator                        DD2's generator (CSD)     alg4 (default), jacobi
mapkd              mapkd                                MapKD's generator         jacobi (default), alg4
=================  ===================================  ========================  ==========================

``alg4`` and ``jacobi`` are :mod:`onestep.multistep`'s; ``dd1`` is DD1's own (:mod:`onestep.dd1.sampling`). A
builder is ``build(method, run_dir, device, spec) -> Sampler`` where ``spec`` is an :class:`onestep.spec.SampleSpec`,
the parsed command line of ``onestep sample`` / ``eval`` (the same attribute names), or None for the defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from onestep import checkpoint as ckpt
from onestep.dd1 import sampling as dd1_sampling
from onestep.dd2 import sampling as dd2_sampling
from onestep.integrity import verify_export
from onestep.mapkd import sampling as mapkd_sampling
from onestep.runs import final_dir
from onestep.samplers import Sampler, build_teacher_sampler

__all__ = ["Method", "METHODS", "method_of_config", "run_kind", "build_sampler"]


@dataclass(frozen=True)
class Method:
    name: str
    label: str                                  # the row label of tables
    build: Callable[..., Sampler]
    multistep: tuple[str, ...] = ()             # named multi-step samplers, the default first
    distilled: bool = True                      # samples under the rule it was distilled with (a run's recorded rule)


METHODS = {m.name: m for m in (
    Method("teacher", "teacher", build_teacher_sampler, distilled=False),
    Method("teacher-nocache", "teacher (no KV cache)", build_teacher_sampler, distilled=False),
    Method("dd1", "DD1", dd1_sampling.build_sampler, ("dd1", "alg4", "jacobi")),
    Method("dd2", "DD2 (paper recipe, CSD)", dd2_sampling.build_sampler, ("alg4", "jacobi")),
    Method("mapkd", "MapKD (own method)", mapkd_sampling.build_sampler, ("jacobi", "alg4")),
)}


def method_of_config(config: dict) -> str | None:
    """The method a finished run's config samples with; None for a kind that is not sampled (tokenizer, stage 1)."""
    if mapkd_sampling.is_mapkd_config(config):  # also a MapKD run written under its older name
        return "mapkd"
    return {"teacher": "teacher", "dd1": "dd1", "dd2-generator": "dd2"}.get(config.get("kind"))


def run_kind(run_dir: str | Path) -> str:
    """The method a run directory samples with ("teacher", "dd1", "dd2" or "mapkd"), read from its recorded kind;
    ValueError for a directory that holds no finished run or a run that is not sampled."""
    try:
        config = ckpt.read_config(final_dir(run_dir))
    except ckpt.CheckpointError as e:
        raise ValueError(str(e)) from None
    method = method_of_config(config)
    if method is not None:
        return method
    if config.get("kind") == "dd2-ardiffusion":
        raise ValueError(f"{run_dir} is a DD2 stage-1 (dd2 tune) run: load a `dd2 train` run")
    raise ValueError(f"{run_dir} is a {config.get('kind')!r} run: load a teacher, DD1, DD2 or MapKD run")


def build_sampler(method: str, run_dir: str | Path, device="cpu", args=None) -> Sampler:
    """A :class:`~onestep.samplers.Sampler` by method name from a run directory (``args``: see the module docstring);
    the sampler's ``info["num_classes"]`` is set."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    m = METHODS[method]
    rule = getattr(args, "multistep", None)
    if rule is not None and rule not in m.multistep:
        raise ValueError(f"--multistep {rule} does not apply to --method {method}"
                         + (f" (it takes {', '.join(m.multistep)})" if m.multistep else ""))
    if getattr(args, "conti_from", None) is not None and method != "dd1":
        raise ValueError(f"--conti-from selects DD1's released output rule; it does not apply to --method {method}")
    if getattr(args, "continuous", False) and method != "dd2":
        raise ValueError(f"--continuous decodes DD2's continuous vectors; it does not apply to --method {method} "
                         "(for a released DD1 generator's continuous head see --conti-from)")
    verify_export(run_dir)  # an export's weights match its recorded SHA-256 and its configs stay inside it
    return m.build(method, str(run_dir), device, args)
