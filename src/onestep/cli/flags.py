"""The flag groups that several commands share, and :func:`override`, which lays the flags a command was given over
a preset.

Every ``--device`` and ``--seed`` of the command line is declared here (:func:`add_device`, :func:`add_common`);
the seed's default is the command's (0, or None where the command's preset sets the seed).

Building the parser imports no torch (``onestep --help`` stays fast): the preset names the ``--preset`` flags offer
are listed here (:data:`PRESETS`; tests/test_cli.py checks them against the library's preset tables), and the
commands import the library when they run.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from onestep.argtypes import (conti_from, device, nonneg_float, nonneg_int, positive_float, positive_int, seed_int,
                               unit_interval)

# run_method imports the library (and torch with it) when a command calls it: building the parser imports
# none, so that ``onestep --help`` answers at once

__all__ = ["add_device", "add_common", "add_data", "add_run_dir", "add_preset", "add_method", "run_method",
           "add_sampling", "override", "given", "DATA_SETS", "PRESETS", "DEFAULT_CFG_SCALE", "RULE_FLAGS"]

DATA_SETS = ["fashion-mnist", "mnist", "crawl-tiles", "folder"]

# the presets each command offers (the keys of the library's tables: VQ_TRAIN_PRESETS, TEACHER_TRAIN_PRESETS,
# DD1_PRESETS, ADAPT_PRESETS, TUNE_PRESETS, TRAIN_PRESETS, MAPKD_PRESETS, PIPELINE_PRESETS)
PRESETS = {
    "train-tokenizer": ("tiny", "small", "default", "ds2", "var-tiny", "var-small"),
    "train-teacher": ("tiny", "small"),
    "dd1": ("tiny", "small"),
    "dd2 adapt": ("tiny", "small"),
    "dd2 tune": ("tiny", "small"),
    "dd2 train": ("tiny", "small", "paper"),
    "mapkd train": ("tiny", "small"),
    "pipeline": ("quick", "full", "tiny"),
}


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device`` (default cpu)."""
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")


def add_common(p: argparse.ArgumentParser, seed: int | None = 0) -> None:
    """``--device`` and ``--seed``. ``seed``: the default seed (None: the preset's, as the dd2 stages have it)."""
    add_device(p)
    default = "the preset's" if seed is None else seed
    p.add_argument("--seed", type=seed_int, default=seed, help=f"random seed, 0..2**63-1 (default: {default})")


def add_data(p: argparse.ArgumentParser, recorded: str | None = None) -> None:
    """``--data`` and ``--data-root``. With ``recorded`` (which run's record, in words) they default to the data set
    and data root recorded upstream (the command resolves them), else to Fashion-MNIST."""
    default = recorded or "fashion-mnist, from Debian's dataset-fashion-mnist"
    p.add_argument("--data", default=None if recorded else "fashion-mnist",
                   choices=DATA_SETS, help=f"data set (default: {default})")
    p.add_argument("--data-root", default=None, help="override the data location (required for --data folder)")


def add_run_dir(p: argparse.ArgumentParser, default: str) -> None:
    """``--run-dir``: the run directory a training command writes and resumes; ``--extend``: let a larger ``--steps``
    continue the run in it."""
    p.add_argument("--run-dir", default=default,
                   help="the run directory to write (re-running the same command resumes it)")
    p.add_argument("--extend", action="store_true",
                   help="with a larger --steps than the run in --run-dir was made with: continue that run to the new "
                        "count and replace its final/ (without it a larger --steps is refused)")
    p.set_defaults(resumable=True)


def add_preset(p: argparse.ArgumentParser, names, default: str, what: str) -> None:
    """``--preset`` with ``names`` (a tuple of :data:`PRESETS`) as its choices."""
    p.add_argument("--preset", default=default, choices=list(names), help=f"{what} preset (default: {default})")


def add_method(p: argparse.ArgumentParser) -> None:
    """Which sampler a run directory gives (``onestep sample`` and ``onestep eval``). ``--sampling-steps`` is stored
    as ``args.steps`` (what :func:`onestep.methods.build_sampler` reads); ``--steps`` is a training command's."""
    p.add_argument("--method", default=None, choices=["teacher", "teacher-nocache", "dd1", "dd2", "mapkd"],
                   help="teacher (KV cache), teacher-nocache, dd1, dd2 (the paper's recipe) or mapkd (the own method) "
                        "(default: the run's recorded kind)")
    p.add_argument("--sampling-steps", dest="steps", type=positive_int, default=1, metavar="K",
                   help="sequential network calls: 1 = one step; K > 1 = one step, then K - 1 teacher calls of the "
                        "--multistep sampler (default: 1)")
    p.add_argument("--multistep", choices=["alg4", "jacobi", "dd1"], default=None,
                   help="the multi-step sampler: alg4 (DD2 paper's Algorithm 4: the teacher re-samples the last K - 1 "
                        "AR steps), jacobi (K - 1 parallel teacher passes re-mapping the same noise by DD1's map), dd1 "
                        "(DD1's own: K = 2 two-step, K >= 3 teacher-involved); default: the method's (dd1: dd1, dd2: "
                        "alg4, mapkd: jacobi)")
    p.add_argument("--continuous", action="store_true",
                   help="dd2: decode the generator's continuous vectors instead of quantising to the nearest code "
                        "(default: off)")
    p.add_argument("--conti-from", type=conti_from, default=None, metavar="S",
                   help="dd1, released generators (onestep import-dd1): their output rule, the argmax codes before "
                        "position S and the continuous head's tokens from S on, decoded as vectors (default: the "
                        "run's recorded rule, 80 for an imported LlamaGen-DD; trained runs: argmax codes everywhere; "
                        "-1 = argmax codes everywhere)")


def run_method(args: argparse.Namespace) -> str:
    """``--method``, or the method the run's recorded kind samples with (``onestep.methods.run_kind``)."""
    from onestep.methods import run_kind

    return args.method or run_kind(args.run)


DEFAULT_CFG_SCALE = 2.0  # --cfg-scale's default on every command that takes the sampling rule
RULE_FLAGS = ("cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p")  # the sampling rule's flags (dests)


def add_sampling(p: argparse.ArgumentParser, cfg_scale: float = DEFAULT_CFG_SCALE, recorded: bool = False) -> None:
    """The teacher's sampling rule. ``recorded`` (``sample``, ``eval``): the flags default to None, which the command
    resolves (:func:`onestep.api.sampling_rule`): a teacher run's defaults, or the rule a DD1 / DD2 run records (a
    different value given for one is refused)."""
    g = p.add_argument_group("teacher sampling rule (also defines p for DD1's map and DD2's teacher score)")
    run = "; a DD1 / DD2 run: the rule it was distilled under, no other" if recorded else ""
    g.add_argument("--cfg-scale", type=nonneg_float, default=None if recorded else cfg_scale,
                   help=f"classifier-free guidance (default {cfg_scale}{run}; 1 = off)")
    g.add_argument("--cfg-schedule", choices=["constant", "linear"], default=None if recorded else "constant",
                   help="guidance over AR steps: constant (LlamaGen), or linear from 1 at the first step to the scale "
                        "at the last (VAR's ramp; VAR's cfg c is --cfg-scale 1+c)"
                        + (f" (default: constant{run})" if recorded else ""))
    g.add_argument("--temperature", type=positive_float, default=None if recorded else 1.0,
                   help="softmax temperature of the teacher's logits" + (f" (default: 1{run})" if recorded else ""))
    g.add_argument("--top-k", type=nonneg_int, default=None if recorded else 0,
                   help="keep the k most likely codes (0 = all)" + (f" (default: 0{run})" if recorded else ""))
    g.add_argument("--top-p", type=unit_interval, default=None if recorded else 1.0,
                   help="nucleus mass (1 = off)" + (f" (default: 1{run})" if recorded else ""))


def given(args: argparse.Namespace, *names: str) -> dict:
    """The flags ``names`` of ``args`` (None where a command has no such flag), for :func:`override`."""
    return {n: getattr(args, n, None) for n in names}


def override(cfg, **kw):
    """``cfg`` (a dataclass, e.g. a preset) with the fields of ``kw`` replaced; None leaves a field as it is."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
