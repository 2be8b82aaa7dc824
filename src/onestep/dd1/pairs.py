"""DD1 training pairs (method.md section 2.1): noise eps (B, n, C) -> tokens of the deterministic flow map.

Layout of ``out_dir``::

    manifest.json          config (n, shard_size, seed, sampling, ODE solver, teacher, eps dtype),
                           and after :func:`finalize_manifest` the per-shard wall and CPU times and snap stats
    shard_00000.npz        eps (m, n, C) float16|float32, ids (m, n) int16|int32|int64, labels (m,),
    shard_00001.npz        index (m,) global sample indices, seeds (m,) = the shard's noise seed,
    ...                    wall_s, cpu_s (process CPU time), snap_moved, snap_max (scalars)

Shard i holds samples [i * shard_size, min(n, (i + 1) * shard_size)); its noise AND labels come from a
CPU ``torch.Generator`` seeded ``seed + i``, so any shard can be regenerated on its own and a resumed
run produces the same files as an uninterrupted one. Each shard is written to a temporary file and
moved into place with ``os.replace`` (atomic), so a shard file either is complete or does not exist;
existing shards are skipped. The noise is rounded to the storage dtype BEFORE mapping, so the stored
(eps, ids) pair is exactly consistent. Shards can be split over ranks (shard i is done by rank
i % world_size); the caller then runs :func:`finalize_manifest` once all ranks are done.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from onestep.checkpoint import CorruptCheckpointError, read_json
from onestep.flow_map import ODEConfig, map_noise_to_tokens
from onestep.rng import derived_seed
from onestep.teacher.base import ARTeacher
from onestep.teacher.sampling import SamplingConfig

__all__ = ["generate_pairs", "finalize_manifest", "shard_path", "read_manifest", "load_pairs", "PairShards",
           "iter_pair_batches"]

MANIFEST = "manifest.json"


def shard_path(out_dir: str | Path, i: int) -> Path:
    return Path(out_dir) / f"shard_{i:05d}.npz"


def read_manifest(out_dir: str | Path) -> dict:
    return read_json(Path(out_dir) / MANIFEST)


def read_shard(p: Path) -> dict[str, np.ndarray]:
    """Every array of a shard file (read with ``allow_pickle=False``); a truncated or unreadable shard raises
    :class:`~onestep.checkpoint.CorruptCheckpointError` with one line (``onestep dd1 pairs`` writes it again)."""
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile.BadZipFile, a short read (EOFError, ValueError), a CRC error, ...
        raise CorruptCheckpointError(f"cannot read the DD1 pairs shard {p} (truncated or corrupt: {e}); re-run "
                                     f"`onestep dd1 pairs` with the same arguments to write it again") from None


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _ids_dtype(vocab_size: int):
    return np.int16 if vocab_size <= 2 ** 15 else np.int32


def _shard_noise(i: int, m: int, seed: int, teacher: ARTeacher) -> tuple[Tensor, Tensor]:
    """(eps (m, n, C) float32, labels (m,)) of shard i, drawn on the CPU from seed + i."""
    g = torch.Generator().manual_seed(derived_seed(seed + i))
    eps = torch.randn(m, teacher.seq_len, teacher.code_dim, generator=g)
    labels = torch.randint(0, teacher.num_classes, (m,), generator=g)
    return eps, labels


def _config(teacher, n, shard_size, seed, sampling_cfg, ode, eps_dtype, meta=None) -> dict:
    return {**(meta or {}),
        "format": "onestep.dd1.pairs/1",
        "n": n, "shard_size": shard_size, "num_shards": (n + shard_size - 1) // shard_size, "seed": seed,
        "shard_seed_rule": "seed + shard_index (CPU torch.Generator: randn eps (m, n, C), then randint labels)",
        "sampling": sampling_cfg.to_dict(), "ode": ode.to_dict(), "eps_dtype": eps_dtype,
        "teacher": {"class": type(teacher).__name__, "seq_len": teacher.seq_len, "vocab_size": teacher.vocab_size,
                    "code_dim": teacher.code_dim, "num_classes": teacher.num_classes,
                    "ar_steps": len(teacher.ar_steps())},
    }


@torch.no_grad()
def generate_pairs(teacher: ARTeacher, n: int, out_dir: str | Path, shard_size: int = 1024, seed: int = 0,
                   sampling_cfg: SamplingConfig | None = None, ode: ODEConfig | None = None,
                   eps_dtype: str = "float16", map_batch: int = 256, device: str | torch.device | None = None,
                   rank: int = 0, world_size: int = 1, progress: bool = True, finalize: bool = True,
                   meta: dict | None = None) -> dict:
    """Write ``n`` (eps, ids, labels) pairs to ``out_dir`` in shards; resumable. Returns the manifest.

    ``map_batch`` sequences are mapped at once (memory: map_batch x V x C per ODE evaluation). ``meta``:
    extra manifest entries that must also match on resume (e.g. the teacher's path).
    Resuming with another ``n`` (same everything else) extends or shrinks the set: a shard whose stored
    size differs from the new one (the old last, partial shard) is regenerated, the others are kept
    (shard i depends only on seed + i and its size); shards past the new end are ignored.
    Raises if ``out_dir`` already holds a manifest with any other difference in configuration.
    """
    sampling_cfg = sampling_cfg or SamplingConfig()
    ode = ode or ODEConfig()
    if eps_dtype not in ("float16", "float32"):
        raise ValueError("eps_dtype must be 'float16' or 'float32'")
    device = torch.device(device) if device is not None else next(
        (b.device for b in list(teacher.parameters()) + list(teacher.buffers())), torch.device("cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cfg = _config(teacher, n, shard_size, seed, sampling_cfg, ode, eps_dtype, meta)
    mpath = out / MANIFEST
    if mpath.exists():
        old = read_manifest(out)
        sized = ("n", "num_shards")
        old_cfg = {k: old.get(k) for k in cfg if k not in sized}
        new_cfg = {k: v for k, v in json.loads(json.dumps(cfg)).items() if k not in sized}
        if old_cfg != new_cfg:
            diff = sorted(k for k in new_cfg if old_cfg.get(k) != new_cfg[k])
            raise ValueError(f"{out} holds pairs made with another configuration (differences in {diff}): "
                             f"{ {k: old_cfg.get(k) for k in diff} } vs { {k: new_cfg[k] for k in diff} }; "
                             f"use another output directory")
        if old.get("n") != n and rank == 0:  # resized: the new config (without the old completion record)
            _write_json_atomic(mpath, cfg)
    elif rank == 0:
        _write_json_atomic(mpath, cfg)
    mine = [i for i in range(cfg["num_shards"]) if i % world_size == rank]
    for i in mine:  # a shard of another size (the old partial last shard after a resize) or unreadable is redone
        p = shard_path(out, i)
        if p.exists():
            try:
                stored = len(read_shard(p)["ids"])
            except (CorruptCheckpointError, KeyError) as e:
                print(f"[dd1 pairs] {e if isinstance(e, CorruptCheckpointError) else p}: writing it again", flush=True)
                stored = -1
            if stored != min(shard_size, n - i * shard_size):
                p.unlink()
    todo = [i for i in mine if not shard_path(out, i).exists()]
    if todo and rank == 0 and read_manifest(out).get("complete"):  # a shard went missing: not complete any more
        _write_json_atomic(mpath, cfg)
    size = {i: min(shard_size, n - i * shard_size) for i in mine}
    bar = tqdm(total=sum(size.values()), initial=sum(size[i] for i in mine if i not in todo), unit="pair",
               desc="dd1 pairs", disable=not progress or rank != 0, dynamic_ncols=True)
    np_eps = np.float16 if eps_dtype == "float16" else np.float32
    for i in todo:
        t0, c0 = time.time(), time.process_time()
        m = size[i]
        eps, labels = _shard_noise(i, m, seed, teacher)
        eps = eps.to(getattr(torch, eps_dtype)).float()  # map exactly the noise that is stored
        ids, moved, smax = [], 0.0, 0.0
        for a in range(0, m, map_batch):
            e, lab = eps[a:a + map_batch].to(device), labels[a:a + map_batch].to(device)
            q, st = map_noise_to_tokens(teacher, e, lab, sampling_cfg, ode, return_stats=True)
            ids.append(q.cpu())
            moved += st["snap_moved"] * len(e)
            smax = max(smax, st["snap_max"])
            bar.update(len(e))
        ids = torch.cat(ids)
        tmp = out / f".shard_{i:05d}.tmp{os.getpid()}.npz"
        np.savez(tmp, eps=eps.numpy().astype(np_eps), ids=ids.numpy().astype(_ids_dtype(teacher.vocab_size)),
                 labels=labels.numpy().astype(np.int64),
                 index=np.arange(i * shard_size, i * shard_size + m, dtype=np.int64),
                 seeds=np.full(m, seed + i, dtype=np.int64), wall_s=np.float64(time.time() - t0),
                 cpu_s=np.float64(time.process_time() - c0),
                 snap_moved=np.float64(moved / m), snap_max=np.float64(smax))
        os.replace(tmp, shard_path(out, i))
    bar.close()
    if finalize and world_size == 1:
        return finalize_manifest(out)
    return read_manifest(out) if mpath.exists() else cfg


def finalize_manifest(out_dir: str | Path) -> dict:
    """Add per-shard wall times and snap statistics to the manifest (after all shards exist)."""
    out = Path(out_dir)
    man = read_manifest(out)
    shards, missing = [], []
    for i in range(man["num_shards"]):
        p = shard_path(out, i)
        if not p.exists():
            missing.append(i)
            continue
        z = read_shard(p)
        shards.append({"file": p.name, "count": int(len(z["ids"])), "seed": int(z["seeds"][0]),
                       "wall_s": float(z["wall_s"]), "snap_moved": float(z["snap_moved"]),
                       "cpu_s": float(z["cpu_s"]) if "cpu_s" in z else None, "snap_max": float(z["snap_max"])})
    if missing:
        raise FileNotFoundError(f"{len(missing)} shards missing in {out}, e.g. {missing[:5]}")
    cnt = sum(s["count"] for s in shards)
    man["shards"] = shards
    man["complete"] = True
    man["wall_s"] = sum(s["wall_s"] for s in shards)
    man["wall_s_per_1k"] = 1000 * man["wall_s"] / max(cnt, 1)
    cpu = [s["cpu_s"] for s in shards]
    man["cpu_s"] = sum(cpu) if all(c is not None for c in cpu) else None  # process CPU time (all threads)
    man["snap_moved"] = sum(s["snap_moved"] * s["count"] for s in shards) / max(cnt, 1)
    man["snap_max"] = max((s["snap_max"] for s in shards), default=0.0)
    _write_json_atomic(out / MANIFEST, man)
    return man


def _load_shard(p: Path) -> dict[str, Tensor]:
    z = read_shard(p)
    return {"eps": torch.from_numpy(z["eps"].astype(np.float32)), "ids": torch.from_numpy(z["ids"].astype(np.int64)),
            "labels": torch.from_numpy(z["labels"]), "index": torch.from_numpy(z["index"])}


def load_pairs(out_dir: str | Path) -> dict[str, Tensor]:
    """All pairs in memory: {"eps" (N, n, C) float32, "ids" (N, n) int64, "labels" (N,), "index" (N,)}."""
    man = read_manifest(out_dir)
    parts = [_load_shard(shard_path(out_dir, i)) for i in range(man["num_shards"])]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class PairShards(torch.utils.data.Dataset):
    """Map-style dataset over the shards without loading them all: item j -> dict of tensors.

    Keeps the ``cache_shards`` most recently used shards in memory; pair it with an index order that
    is shard-local (e.g. :func:`iter_pair_batches`) when the data set does not fit in memory.
    """

    def __init__(self, out_dir: str | Path, cache_shards: int = 4):
        self.dir, self.man = Path(out_dir), read_manifest(out_dir)
        self.shard_size, self.n, self.cache_shards = self.man["shard_size"], self.man["n"], cache_shards
        self._cache: dict[int, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return self.n

    def shard(self, i: int) -> dict[str, Tensor]:
        if i not in self._cache:
            if len(self._cache) >= self.cache_shards:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = _load_shard(shard_path(self.dir, i))
        else:
            self._cache[i] = self._cache.pop(i)  # most recently used last
        return self._cache[i]

    def __getitem__(self, j: int) -> dict[str, Tensor]:
        s, r = divmod(int(j), self.shard_size)
        return {k: v[r] for k, v in self.shard(s).items()}

    def batch(self, idx: Tensor) -> dict[str, Tensor]:
        """Gather a batch of global indices (grouped by shard)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = {}
        sh = idx // self.shard_size
        for s in sh.unique().tolist():
            sel = (sh == s).nonzero().squeeze(1)
            d = self.shard(s)
            for k, v in d.items():
                out.setdefault(k, torch.empty((len(idx),) + v.shape[1:], dtype=v.dtype))[sel] = v[idx[sel] % self.shard_size]
        return out


def iter_pair_batches(out_dir: str | Path, batch_size: int, seed: int = 0, epoch: int = 0, rank: int = 0,
                      world_size: int = 1, shards_in_memory: int = 4, drop_last: bool = True) -> Iterator[dict]:
    """Stream one epoch of shuffled batches: shard order permuted, then pairs shuffled within a window
    of ``shards_in_memory`` shards; rank r takes every world_size-th batch. Deterministic in
    (seed, epoch)."""
    man = read_manifest(out_dir)
    g = torch.Generator().manual_seed(derived_seed(seed * 100003 + epoch))
    order = torch.randperm(man["num_shards"], generator=g).tolist()
    b = 0
    carry: dict[str, Tensor] | None = None
    for w in range(0, len(order), shards_in_memory):
        parts = [_load_shard(shard_path(out_dir, i)) for i in order[w:w + shards_in_memory]]
        if carry is not None:
            parts.insert(0, carry)
        pool = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        perm = torch.randperm(len(pool["ids"]), generator=g)
        pool = {k: v[perm] for k, v in pool.items()}
        full = len(pool["ids"]) // batch_size * batch_size
        for a in range(0, full, batch_size):
            if b % world_size == rank:
                yield {k: v[a:a + batch_size] for k, v in pool.items()}
            b += 1
        carry = {k: v[full:] for k, v in pool.items()} if full < len(pool["ids"]) else None
    if carry is not None and not drop_last and len(carry["ids"]):
        if b % world_size == rank:
            yield carry
