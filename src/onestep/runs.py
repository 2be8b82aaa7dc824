"""Run directories: where each stage's outputs live and how runs refer to each other.

Every command writes into a run directory holding ``config.json`` (the full config, seeds included),
``log.jsonl``, ``checkpoints/`` (resumable state) and, once finished, ``final/`` (``model.safetensors``
+ ``config.json``). Downstream stages refer to upstream runs by directory:

    tokenizer run  ->  teacher run (config["tokenizer_dir"])  ->  DD1 / DD2 runs (config["teacher_dir"])

Each stage loads its own runs back (a tokenizer or teacher run: :mod:`onestep.teacher.load`); this module knows
directories and references only, so every stage may use it.
"""
from __future__ import annotations

import os
from pathlib import Path

from onestep import checkpoint as ckpt

# the config keys that name other runs (paths relative to the run directory)
REF_KEYS = ("teacher_dir", "tokenizer_dir", "tune_dir", "pairs_dir", "pairs_manifest", "generator_init")


def final_dir(run_dir: str | Path) -> Path:
    """``RUN/final`` (or RUN itself if it is a model directory); a clear error if the run never finished, or if its
    model directory is half-written (weights without a config: re-running the training command writes it again)."""
    run_dir = Path(run_dir)
    for d in (run_dir, run_dir / "final"):
        if ckpt.is_model_dir(d):
            return d
    for d in (run_dir, run_dir / "final"):
        if (d / "model.safetensors").exists():
            raise ckpt.CheckpointError(f"{d} is half-written (model.safetensors without config.json): re-run the "
                                       f"command that trained it to write it again")
    if not run_dir.exists():
        raise ckpt.CheckpointError(f"run directory {run_dir} does not exist")
    hint = " (it has checkpoints: re-run the same command to resume it)" if (run_dir / "checkpoints").exists() else ""
    raise ckpt.CheckpointError(f"{run_dir} holds no finished model (no final/model.safetensors and config.json){hint}")


def ref_to(target: str | Path, run_dir: str | Path) -> str:
    """How a run records another run: a path relative to its own directory, so run trees can move."""
    return os.path.relpath(Path(target).resolve(), Path(run_dir).resolve())


def resolve_ref(path: str, model_dir: Path) -> Path:
    """Inverse of :func:`ref_to` for a model directory of a run: ``RUN/final``, ``RUN/raw`` or a training
    checkpoint's ``RUN/checkpoints/step_N/<module>`` (also accepts absolute paths). A run moved away from the runs it
    refers to still finds them from where it was made (the ``location`` its config records)."""
    p = Path(path)
    model_dir = Path(model_dir)
    if model_dir.name in ("final", "raw"):
        run_dir = model_dir.parent
    elif model_dir.parent.parent.name == "checkpoints":
        run_dir = model_dir.parent.parent.parent
    else:
        run_dir = model_dir
    for cand in (run_dir / p, p):
        if cand.exists():
            return cand
    try:
        location = ckpt.read_json(model_dir / "config.json").get("location")
    except (ckpt.CheckpointError, AttributeError):
        location = None
    there = Path(os.path.normpath(Path(location) / p)) if isinstance(location, str) else None  # (location may be gone)
    if there is not None and there.exists():
        return there
    raise ckpt.CheckpointError(f"referenced run {path} not found (looked next to {run_dir})")


def recorded_data(run_dir: str | Path) -> tuple[str | None, str | None]:
    """(data set, data root) a run was trained on: recorded in its model's config.json or, when it records none, in
    the runs it was made from (``teacher_dir``, ``tune_dir``, ``tokenizer_dir``, followed upstream). ``(None, None)``
    when no run on the way records a data set (imported weights)."""
    d = final_dir(run_dir)
    name, seen = None, set()
    while d.resolve() not in seen:
        seen.add(d.resolve())
        config = ckpt.read_json(d / "config.json")
        if config.get("data") is not None:
            if "data_root" in config:
                return config["data"], config["data_root"]
            name = name or config["data"]  # a run that records the name only: its root is upstream
        ref = next((config[k] for k in ("teacher_dir", "tune_dir", "tokenizer_dir") if config.get(k)), None)
        if ref is None:
            break
        d = final_dir(resolve_ref(ref, d))
    return name, None


def class_names(run_dir: str | Path) -> list[str] | None:
    """The class names a run's data set has, as its tokenizer run records them (``class_names``, followed upstream
    through ``teacher_dir`` / ``tune_dir`` / ``tokenizer_dir``); None when no run on the way records them."""
    d = final_dir(run_dir)
    seen = set()
    while d.resolve() not in seen:
        seen.add(d.resolve())
        config = ckpt.read_json(d / "config.json")
        if config.get("class_names"):
            return list(config["class_names"])
        ref = next((config[k] for k in ("tokenizer_dir", "teacher_dir", "tune_dir") if config.get(k)), None)
        if ref is None:
            return None
        d = final_dir(resolve_ref(ref, d))
    return None


def stage_data(data: str | None, data_root: str | None, recorded: tuple[str | None, str | None],
               fallback: str | None = "fashion-mnist") -> tuple[str | None, str | None]:
    """The (data set, data root) a stage uses: the given ones, by default the ``recorded`` upstream ones (see
    :func:`recorded_data`), else ``fallback``. A recorded root goes with its own data set only."""
    rec_data, rec_root = recorded
    name = data or rec_data or fallback
    root = data_root if data_root is not None else (rec_root if name == rec_data else None)
    return name, root


def tokenizer_image_shape(tokenizer) -> tuple[int, int, int]:
    """(C, H, W) of the images a tokenizer (VQModel or multi-scale VQVAE) encodes and decodes."""
    c = tokenizer.config
    return int(c.in_channels), int(c.image_size), int(c.image_size)
