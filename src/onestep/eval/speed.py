"""Speed harness: any samplers side by side in one process (latency at batch 1, throughput at batch 64).

Protocol: ``warmup`` untimed calls per sampler and batch size, then ``repeats`` timed rounds in which the
samplers run round-robin (so drift in machine load hits all of them alike); latency = median seconds
per call, throughput = batch / median seconds. Speed-ups are ratios against the ``reference`` sampler
from the same run. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the process's
peak resident set size (``ru_maxrss``, a high-water mark over the whole process, so only the first
sampler's figure is specific). Records torch's thread count and the machine.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time
from typing import Any, Callable

import torch

from onestep.paths import checkout


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def git_commit() -> str:
    """HEAD of the repository holding this package, with ``-dirty`` when tracked files are modified."""
    repo = checkout()
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        return run("rev-parse", "--short", "HEAD") + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except Exception:
        return "unknown"


def _sync(device: str | None):
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def measure(samplers: dict[str, Callable[[int], Any]], batch_sizes: tuple[int, ...] = (1, 64), warmup: int = 2,
            repeats: int = 5, reference: str | None = None, device: str | None = None) -> dict:
    """Time ``fn(batch_size)`` for each sampler. Returns {"rows": [...], "machine": ..., protocol fields}."""
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in samplers for b in batch_sizes}
    mem: dict[str, float] = {}
    for b in batch_sizes:
        for name, fn in samplers.items():
            if device and device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warmup):
                fn(b)
            _sync(device)
            if device and device.startswith("cuda"):
                mem[name] = max(mem.get(name, 0.0), torch.cuda.max_memory_allocated() / 2 ** 20)
            else:
                mem[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for _ in range(repeats):
            for name, fn in samplers.items():
                _sync(device)
                t0 = time.perf_counter()
                fn(b)
                _sync(device)
                times[(name, b)].append(time.perf_counter() - t0)
    rows = []
    for name in samplers:
        row: dict = {"method": name}
        for b in batch_sizes:
            med = statistics.median(times[(name, b)])
            row[f"latency_b{b}_s"] = med
            row[f"throughput_b{b}"] = b / med
        row["peak_memory_mb"] = mem[name]
        rows.append(row)
    if reference is not None:
        ref = next(r for r in rows if r["method"] == reference)
        for r in rows:
            for b in batch_sizes:
                r[f"speedup_b{b}"] = ref[f"latency_b{b}_s"] / r[f"latency_b{b}_s"]
    return {"rows": rows, "reference": reference, "warmup": warmup, "repeats": repeats,
            "batch_sizes": list(batch_sizes), "timing": "median wall seconds per call, round-robin repeats",
            "peak_memory": "cuda max_memory_allocated" if device and device.startswith("cuda") else "process ru_maxrss (MiB)",
            "machine": machine_info()}
