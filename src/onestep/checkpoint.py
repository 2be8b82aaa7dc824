"""Checkpoints: safetensors weights with a JSON config beside them, written atomically; strict loading.

Layout of a model directory::

    DIR/model.safetensors   weights (state_dict, contiguous CPU tensors)
    DIR/config.json         {"kind": ..., "config": {...}, ...}: enough to rebuild the module

A training run keeps its resumable checkpoints under ``RUN/checkpoints/step_XXXXXXXX/`` (one model
directory per module plus ``trainer_state.pt`` with optimizers, step and RNG states) and a ``latest``
pointer file, written last, so a run killed at any moment resumes from the last complete checkpoint.
``trainer_state.pt`` holds only tensors and plain Python values and is read with ``weights_only=True``: a planted
file that pickles code is refused unread.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated or unreadable (an earlier checkpoint of the run may still be good)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled file holds objects other than tensors and plain values; it is refused without being unpickled."""


class NonFiniteError(CheckpointError):
    """A module to be saved holds NaN (or, in a parameter, an infinity): nothing of it is written."""


class CheckpointMismatchError(CheckpointError):
    """Raised by :func:`load_state_dict_strict`; the message lists every mismatched key with shapes."""

    def __init__(self, missing: dict, unexpected: dict, mismatched: dict, source: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"checkpoint{(' ' + source) if source else ''} does not fit the model:"]
        for title, d in (("missing keys (in model, not in checkpoint)", missing),
                         ("unexpected keys (in checkpoint, not in model)", unexpected)):
            if d:
                lines.append(f"  {title}: {len(d)}")
                lines += [f"    {k}: {list(s)}" for k, s in list(d.items())[:50]]
                if len(d) > 50:
                    lines.append(f"    ... and {len(d) - 50} more")
        if mismatched:
            lines.append(f"  shape mismatches: {len(mismatched)}")
            lines += [f"    {k}: checkpoint {list(a)} vs model {list(b)}" for k, (a, b) in list(mismatched.items())[:50]]
        super().__init__("\n".join(lines))


# ---- atomic file writing ----------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path`` (same directory, so atomic). A failed write
    leaves ``path`` as it was and no temporary file; an I/O failure (a full device, a read-only or forbidden
    directory) is raised as an ``OSError`` with its errno and ``path`` as the file name (:func:`write_error`)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        err = write_error(e, path)
        if err is None:
            raise
        raise err from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # how safetensors' I/O errors end: "... (os error 28)"


def write_error(e: BaseException, path: str | os.PathLike) -> OSError | None:
    """The ``OSError(errno, strerror, path)`` behind a failed write of ``path``: from an OSError, from a safetensors
    I/O error ("... (os error 28)"), or from torch.save's short write ("unexpected pos" / "file write failed": its zip
    writer drops the errno, and a short write to a regular file means a full device). None for any other error."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (m := _OS_ERROR_CODE.search(str(e))):
        code = int(m.group(1))
    if code is None and isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "file write failed" in str(e)):
        code = errno.ENOSPC
    if code is None:
        return None
    return OSError(code, os.strerror(code), str(path))


def describe_os_error(e: OSError) -> str:
    """One line saying what went wrong with which file: "no space left on device while writing RUN/...",
    "cannot write RUN/...: read-only file system", "permission denied: RUN/..."."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{what} while writing{where}; free some space and re-run the same command (a training run resumes " \
               f"from its last complete checkpoint)"
    if e.errno == errno.EROFS:
        return f"cannot write{where}: read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied:{where} (check the owner and permissions of the directory)"
    text = (e.strerror or str(e)).rstrip(".")
    return f"{text[:1].lower()}{text[1:]}{':' + where if where else ''}"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
            f.write("\n")
    return atomic_write(path, w)


def _json_default(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


# ---- tensors ------------------------------------------------------------------------------------------
def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CorruptCheckpointError(f"cannot read {path}: {e}") from None


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "") -> None:
    """Load with every key and shape checked; raise :class:`CheckpointMismatchError` listing all problems."""
    own = module.state_dict()
    missing = {k: tuple(v.shape) for k, v in own.items() if k not in state_dict}
    unexpected = {k: tuple(v.shape) for k, v in state_dict.items() if k not in own}
    mismatched = {k: (tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)}
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, source)
    module.load_state_dict(state_dict, strict=True)


def nonfinite_tensors(modules: dict[str, nn.Module]) -> list[str]:
    """Every saved tensor of ``modules`` that is not finite, as "MODULE: NAME (parameter, 3 NaN of 64 values)": a NaN
    anywhere, or an infinity in a parameter (a buffer may hold infinities on purpose, e.g. an attention mask's
    -inf). Empty when every tensor is finite."""
    out = []
    for mod_name, module in modules.items():
        params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        for name, t in module.state_dict().items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                continue
            is_param = name in params
            if bool((~torch.isfinite(t) if is_param else torch.isnan(t)).any()):
                counts = [f"{n} {what}" for n, what in ((int(torch.isnan(t).sum()), "NaN"),
                                                        (int(torch.isinf(t).sum()) if is_param else 0, "inf")) if n]
                out.append(f"{mod_name}: {name} ({'parameter' if is_param else 'buffer'}, "
                           f"{' and '.join(counts)} of {t.numel()} values)")
    return out


def describe_nonfinite(bad: list[str]) -> str:
    """The first entry of :func:`nonfinite_tensors`, and how many more there are."""
    return bad[0] + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")


# ---- model directories --------------------------------------------------------------------------------
def is_model_dir(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a finished model directory: ``model.safetensors`` and ``config.json`` both there.
    :func:`save_model` writes the config last, so a write cut short leaves a directory that is not one; every
    "is this stage finished / is this model there" check goes through here, and a stage whose ``final/`` is not a
    model directory writes it again."""
    directory = Path(directory)
    return (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()


def save_model(directory: str | os.PathLike, module: nn.Module, config: dict) -> Path:
    """Write ``model.safetensors`` then ``config.json`` into ``directory`` (an old ``config.json`` goes first, so that
    until the new one is written the directory is not a finished model directory, see :func:`is_model_dir`); a
    module holding non-finite values (:func:`nonfinite_tensors`) raises :class:`NonFiniteError` and nothing is
    written."""
    directory = Path(directory)
    bad = nonfinite_tensors({directory.name: module})
    if bad:
        raise NonFiniteError(f"not writing {directory}: non-finite values in {describe_nonfinite(bad)}")
    return _write_model(directory, module, config)


def _write_model(directory: Path, module: nn.Module, config: dict) -> Path:
    (directory / "config.json").unlink(missing_ok=True)
    save_tensors(directory / "model.safetensors", module.state_dict())
    write_json(directory / "config.json", config)
    return directory


def load_model_weights(directory: str | os.PathLike, module: nn.Module) -> dict:
    """Strictly load ``directory/model.safetensors`` into ``module``; returns the config dict. A module class that
    renamed its keys provides ``upgrade_state_dict(sd) -> sd``, an explicit rename of the old names (then strict)."""
    directory = Path(directory)
    config = read_json(directory / "config.json")
    sd = load_tensors(directory / "model.safetensors")
    upgrade = getattr(module, "upgrade_state_dict", None)
    load_state_dict_strict(module, upgrade(sd) if upgrade is not None else sd, source=str(directory))
    return config


# ---- resumable training state ----------------------------------------------------------------------
def rng_state() -> dict:
    """The global torch / python / numpy (/ CUDA) RNG states as tensors and plain values (a ``weights_only`` load
    reads them back): numpy's MT19937 key array is stored as an int64 tensor."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s states (numpy's keys as a tensor, or as the array that older checkpoints hold)."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_array_globals() -> list:
    """What unpickling a numpy array takes: older checkpoints hold numpy's RNG keys as an array. An array holds data
    only; its elements of any other type are unpickled under the same allow-list."""
    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array rebuilder, wherever this version keeps it
    dtypes = {type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)}
    return [reconstruct, np.ndarray, np.dtype, *dtypes]


def load_trainer_state(path: str | os.PathLike) -> dict:
    """``trainer_state.pt`` read with ``weights_only=True`` (tensors, plain values and numpy arrays; nothing that runs
    code). A file that pickles anything else raises :class:`UnsafeCheckpointError`, a truncated or corrupt one
    :class:`CorruptCheckpointError`; both messages are one line naming the file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it pickles {', '.join(unsafe[:5])} (not tensors or plain values: unpickling "
                f"could run code); delete the file if this program did not write it") from None
        raise CorruptCheckpointError(f"cannot read {path}: {_first_line(e)}") from None
    except PermissionError:
        raise
    except Exception as e:  # a truncated zip: RuntimeError from PytorchStreamReader; EOFError; ...
        raise CorruptCheckpointError(f"cannot read {path} (truncated or corrupt): {_first_line(e)}") from None


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a torch file pickles beyond the weights-only allow-list, read without unpickling (``[]`` when the
    file cannot be read that far)."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def save_training_checkpoint(run_dir: str | os.PathLike, step: int, modules: dict[str, nn.Module],
                             configs: dict[str, dict], state: dict, keep: int = 2) -> Path:
    """Write ``checkpoints/step_N/`` (one model dir per module + trainer_state.pt), then the ``latest`` pointer, then
    delete all but the newest ``keep`` checkpoints up to step N (and any after it). Every module is checked first: a
    non-finite tensor raises :class:`NonFiniteError` and nothing is written (``latest`` and the kept checkpoints
    stay)."""
    bad = nonfinite_tensors(modules)
    if bad:
        raise NonFiniteError(f"no checkpoint written at step {step}: non-finite values in {describe_nonfinite(bad)}")
    ckdir = Path(run_dir) / "checkpoints"
    final = ckdir / f"step_{step:08d}"
    tmp = ckdir / f".tmp_step_{step:08d}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        for name, m in modules.items():
            _write_model(tmp / name, m, configs.get(name, {}))
        atomic_write(tmp / "trainer_state.pt", lambda p: torch.save(state, p))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(ckdir / "latest", lambda p: Path(p).write_text(final.name + "\n"))
    except OSError as e:  # e.g. a full device: the partial checkpoint goes, latest and the kept checkpoints stay
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno is None:
            raise
        name = str(e.filename or ckdir).replace(str(tmp), str(final))
        raise OSError(e.errno, e.strerror, name) from e
    others = sorted(d for d in ckdir.glob("step_*") if d.is_dir() and d != final)
    older = [d for d in others if d.name < final.name]
    later = [d for d in others if d.name > final.name]  # left by a run resumed from an earlier checkpoint: never used
    for d in older[: max(0, len(older) - (keep - 1))] + later:
        shutil.rmtree(d, ignore_errors=True)
    return final


def previous_checkpoint(ckpt: Path) -> Path | None:
    """The newest complete checkpoint of the run older than ``ckpt`` (the one the keep-2 rotation keeps), or None."""
    older = [d for d in ckpt.parent.glob("step_*") if d.is_dir() and d.name < ckpt.name
             and (d / "trainer_state.pt").exists()]
    return max(older, key=lambda d: d.name) if older else None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ptr = Path(run_dir) / "checkpoints" / "latest"
    if not ptr.exists():
        return None
    d = ptr.parent / ptr.read_text().strip()
    if not (d / "trainer_state.pt").exists():
        raise CheckpointError(f"{ptr} points at {d}, which is incomplete; delete it to restart")
    return d


def branch_run(parent_run: str | os.PathLike, step: int, child_run: str | os.PathLike, prefix_wall_s: float) -> Path:
    """Start ``child_run`` from ``parent_run``'s checkpoint at ``step`` (a run whose config is identical up to that
    step, e.g. the same CSD run with performance alignment after it): copies the checkpoint (atomically), points
    ``latest`` at it and records ``branched_from.json`` ({"run", "checkpoint", "prefix_wall_s"}: the parent's wall
    seconds up to the branch, so the child's cost can include the shared prefix). The child resumes from it."""
    src = Path(parent_run) / "checkpoints" / f"step_{step:08d}"
    if not (src / "trainer_state.pt").exists():
        raise CheckpointError(f"no complete checkpoint at step {step} in {parent_run}")
    ckdir = Path(child_run) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    dst, tmp = ckdir / src.name, ckdir / f".tmp_{src.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    atomic_write(ckdir / "latest", lambda p: Path(p).write_text(dst.name + "\n"))
    rel = os.path.relpath(Path(parent_run), Path(child_run))
    write_json(Path(child_run) / "branched_from.json",
               {"run": rel, "checkpoint": src.name, "prefix_wall_s": round(prefix_wall_s, 2)})
    return dst


def load_training_checkpoint(ckpt: Path, modules: dict[str, nn.Module]) -> dict:
    for name, m in modules.items():
        load_model_weights(ckpt / name, m)
    return load_trainer_state(ckpt / "trainer_state.pt")
