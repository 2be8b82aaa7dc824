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
import math
import os
import pickle
import random
import re
import shlex
import shutil
import socket
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
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


class RunLockedError(CheckpointError):
    """Another process is writing the run directory (it holds ``RUN/.lock``)."""


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


# ---- one writer per run directory ---------------------------------------------------------------------
_LOCKS: dict[str, int] = {}  # run directory (resolved) -> the open RUN/.lock this process holds


def lock_run_dir(run_dir: str | os.PathLike) -> None:
    """Make this process the one writer of ``run_dir``: an exclusive ``fcntl.flock`` on ``RUN/.lock``, taken without
    waiting, with this process's pid, host and command written into the file. A directory another process holds is
    refused with :class:`RunLockedError` naming that process. The OS drops the lock when its holder ends, however it
    ends (SIGKILL included), so a file left behind holds nothing. Held until :func:`release_run_locks` (the command
    line calls it when a command ends) or the process exits; taking it again in the same process changes nothing."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _LOCKS:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(run_dir / ".lock")) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _lock_holder(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise RunLockedError(f"{run_dir} is being written by another process ({holder}); wait for it to end or stop "
                             f"it, or use another directory") from None
    os.ftruncate(fd, 0)
    argv = ["onestep", *sys.argv[1:]] if "onestep" in Path(sys.argv[0] if sys.argv else "").parts else sys.argv
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "argv": argv}).encode())
    _LOCKS[key] = fd


def _lock_holder(fd: int) -> str:
    """"pid P on HOST: COMMAND" from a lock file (what its holder wrote), as far as it can be read."""
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        command = shlex.join(str(a) for a in info.get("argv", []))
        return f"pid {info['pid']} on {info['host']}: {command[:300]}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "its pid is not recorded yet"


def release_run_locks() -> None:
    """Drop every run-directory lock this process holds (:func:`lock_run_dir`)."""
    while _LOCKS:
        os.close(_LOCKS.popitem()[1])


# ---- atomic file writing ----------------------------------------------------------------------------
def umask() -> int:
    """The process's umask, read without changing it where the system says it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path`` (same directory, so atomic). The file
    gets the mode of an ordinary new file (0666 less the umask: 0644 under the usual 0022), not the temporary file's
    0600. A failed write leaves ``path`` as it was and no temporary file; an I/O failure (a full device, a read-only or
    forbidden directory) is raised as an ``OSError`` with its errno and ``path`` as the file name
    (:func:`write_error`)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
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
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({_first_line(e)})") from None


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


def check_shapes(own: dict[str, tuple], saved: dict[str, tuple], source: str = "") -> None:
    """Raise :class:`CheckpointMismatchError` listing every key of the model (``own``: key -> shape) missing from the
    saved ones, every saved key the model lacks, and every shape that differs."""
    missing = {k: s for k, s in own.items() if k not in saved}
    unexpected = {k: s for k, s in saved.items() if k not in own}
    mismatched = {k: (saved[k], s) for k, s in own.items() if k in saved and saved[k] != s}
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, source)


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "") -> None:
    """Load with every key and shape checked; raise :class:`CheckpointMismatchError` listing all problems."""
    check_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()},
                 {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    module.load_state_dict(state_dict, strict=True)


# the bytes per element of safetensors' dtypes
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a safetensors file, read from its header alone (no tensor is read or allocated). The header is
    checked against the file: every tensor's bytes lie inside it and fit its dtype and shape; a truncated or foreign
    file raises :class:`CorruptCheckpointError` with one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    size = path.stat().st_size

    def bad(why: str):
        return CorruptCheckpointError(f"cannot read {path} (truncated or not a safetensors file): {why}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, 100 << 20):
            raise bad(f"a header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:
            raise bad(f"its header is not JSON ({_first_line(e)})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data, out = size - 8 - n, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (a, b) = tuple(entry["shape"]), entry["data_offsets"]
            ok = (all(type(s) is int and s >= 0 for s in shape) and type(a) is int and type(b) is int
                  and 0 <= a <= b <= data and b - a == math.prod(shape) * _DTYPE_BYTES[entry["dtype"]])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {name!r} does not fit the file ({json.dumps(entry)[:200]}, {data} bytes of data)")
        out[name] = shape
    return out


# the keys of a model config (``config["model"]``, at any depth) that count modules, and those that size tensors: each
# an integer in 1..bound, checked before a model is built
COUNT_KEYS = frozenset({"n_layer", "depth", "n_head", "num_heads", "num_res_blocks", "decoder_res_blocks", "num_phi",
                        "n_steps", "prefix_ode_steps"})
SIZE_KEYS = frozenset({"dim", "multiple_of", "num_classes", "vocab_size", "grid_h", "grid_w", "code_dim", "image_size",
                       "in_channels", "base_channels", "norm_groups", "z_channels", "codebook_size", "embed_dim", "ch",
                       "width", "time_dim", "feature_dim", "channel_mult", "ch_mult", "patch_nums"})
MAX_COUNT, MAX_SIZE = 1024, 1 << 20


def check_model_config(config: Any, where: str | os.PathLike) -> dict:
    """``config`` (a model directory's ``config.json``), refused with one line unless it is a JSON object whose model
    section gives every count (``COUNT_KEYS``) and size (``SIZE_KEYS``, lists of them included) as an integer in
    1..``MAX_COUNT`` / 1..``MAX_SIZE`` (a count may be null where the model has a default)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} is not a JSON object (it holds a {type(config).__name__})")

    def walk(v, key: str, at: str):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, k, f"{at}.{k}")
        elif key in SIZE_KEYS and isinstance(v, list) and len(v) <= MAX_COUNT:
            for i, x in enumerate(v):
                walk(x, key, f"{at}[{i}]")
        elif key in COUNT_KEYS or key in SIZE_KEYS:
            bound = MAX_COUNT if key in COUNT_KEYS else MAX_SIZE
            if not (v is None and key in COUNT_KEYS) and (type(v) is not int or not 1 <= v <= bound):
                raise CheckpointError(f"{where}: {at} must be an integer in 1..{bound}, got {json.dumps(v)[:50]}")

    walk(config.get("model"), "model", "model")
    return config


def read_config(directory: str | os.PathLike) -> dict:
    """``DIR/config.json`` of a model directory, checked by :func:`check_model_config`."""
    path = Path(directory) / "config.json"
    return check_model_config(read_json(path), path)


def memory_available() -> int | None:
    """Bytes of memory this process can still take (``MemAvailable`` of ``/proc/meminfo``), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(need: int, what: str) -> None:
    """ValueError with one line when ``need`` bytes exceed the memory available (nothing is checked where unknown)."""
    have = memory_available()
    if have is not None and need > have:
        raise ValueError(f"{what} needs {need / 2 ** 30:.3g} GiB of memory, more than the {have / 2 ** 30:.3g} GiB "
                         f"available")


def load_model(directory: str | os.PathLike, build: Callable[[], nn.Module], config: dict | None = None) -> nn.Module:
    """The module ``build()`` makes, with the weights of ``directory`` loaded (:func:`load_model_weights`), checked
    before any of its tensors is allocated: the config's sizes (:func:`check_model_config`; ``config``: the directory's
    config.json as already read), then the module built on the meta device against the weight file's header (every
    key and shape, :func:`read_header`) and the memory it takes against the memory available. ``build`` reads the
    config; it is called twice (on the meta device, then for real)."""
    directory = Path(directory)
    check_model_config(read_json(directory / "config.json") if config is None else config, directory / "config.json")
    saved = read_header(directory / "model.safetensors")
    try:
        with torch.device("meta"):
            skeleton = build()
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{directory / 'config.json'} does not describe a model this version builds: "
                              f"{_first_line(e)}") from None
    upgrade = getattr(skeleton, "upgrade_state_dict", None)
    check_shapes({k: tuple(v.shape) for k, v in skeleton.state_dict().items()},
                 upgrade(saved) if upgrade is not None else saved, str(directory))
    check_memory(sum(t.numel() * t.element_size() for t in [*skeleton.parameters(), *skeleton.buffers()]),
                 f"the model in {directory}")
    del skeleton
    module = build()
    load_model_weights(directory, module)
    return module


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
    renamed its keys provides ``upgrade_state_dict(sd) -> sd``, an explicit rename of the old names (then strict).
    Weights holding a NaN (or a parameter an infinity, :func:`nonfinite_tensors`) are refused with
    :class:`NonFiniteError`: such a model would only sample garbage."""
    directory = Path(directory)
    config = read_json(directory / "config.json")
    sd = load_tensors(directory / "model.safetensors")
    upgrade = getattr(module, "upgrade_state_dict", None)
    load_state_dict_strict(module, upgrade(sd) if upgrade is not None else sd, source=str(directory))
    bad = nonfinite_tensors({directory.name: module})
    if bad:
        raise NonFiniteError(f"refusing {directory / 'model.safetensors'}: non-finite values in "
                             f"{describe_nonfinite(bad)}")
    return config


# ---- resumable training state ----------------------------------------------------------------------
def rng_state() -> dict:
    """The global torch / python / numpy (/ CUDA) RNG states as tensors and plain values (a ``weights_only`` load
    reads them back): numpy's MT19937 key array is stored as an int64 tensor."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s states (numpy's keys as a tensor, or as the array that older checkpoints hold)."""
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
