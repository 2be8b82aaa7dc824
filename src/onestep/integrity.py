"""An exported folder's integrity: its weights are the bytes ``export.json`` records, and its configs reach nothing
outside it.

``onestep export`` (:mod:`onestep.export`) checks a folder with :func:`outside_references` before it appears, and every
load of a run (:func:`onestep.methods.build_sampler`) checks an export with :func:`verify_export` first; a run
directory (no ``export.json``) passes unchecked.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from onestep import checkpoint as ckpt
from onestep.runs import REF_KEYS

__all__ = ["file_sha256", "outside_references", "verify_export"]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def outside_references(root: str | Path) -> list[str]:
    """Every way the configs under ``root`` reach outside it: a run reference (``REF_KEYS``) that does not resolve
    inside ``root``, or any string that is an absolute path or leads out through ``..``. Empty when self-contained."""
    root = Path(root).resolve()
    out = []
    for cfg_path in sorted(root.rglob("*.json")):
        base = cfg_path.parent.parent if cfg_path.parent.name == "final" else cfg_path.parent

        def walk(v, key=""):
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(x, k)
            elif isinstance(v, list):
                for x in v:
                    walk(x, key)
            elif isinstance(v, str):
                rel = cfg_path.relative_to(root)
                if key in REF_KEYS:
                    target = (base / v).resolve()
                    if not target.is_relative_to(root) or not target.exists():
                        out.append(f"{rel}: {key} {v!r} does not resolve inside the folder")
                elif os.path.isabs(v) or (("/" in v or os.sep in v) and not (base / v).resolve().is_relative_to(root)):
                    out.append(f"{rel}: {key} {v!r} is a path outside the folder")

        walk(json.loads(cfg_path.read_text()))
    return out


def verify_export(folder: str | Path) -> None:
    """Check an export before it is loaded (nothing is checked for a folder without ``export.json``, a run): every
    component's weights have the SHA-256 that ``export.json`` records, and no config reaches outside the folder
    (:func:`outside_references`). A mismatch is a one-line :class:`~onestep.checkpoint.CheckpointError`."""
    folder = Path(folder)
    if not (folder / "export.json").is_file():
        return
    card = ckpt.read_json(folder / "export.json")
    components = card.get("components") if isinstance(card, dict) else None
    if not isinstance(components, dict) or not components:
        raise ckpt.CheckpointError(f"{folder / 'export.json'} lists no components: export the run again")
    for name, comp in components.items():
        path = folder / str(comp.get("path", "")) / "model.safetensors" if isinstance(comp, dict) else None
        if path is None or not path.resolve().is_relative_to(folder.resolve()) or not path.is_file():
            raise ckpt.CheckpointError(f"{folder}: the {name} weights that export.json lists are missing")
        got = file_sha256(path)
        if got != comp.get("sha256"):
            raise ckpt.CheckpointError(f"{path} does not match the SHA-256 that {folder / 'export.json'} records "
                                       f"({got[:16]}... against {str(comp.get('sha256'))[:16]}...): the file changed "
                                       f"after the export; export the run again")
    problems = outside_references(folder)
    if problems:
        raise ckpt.CheckpointError(f"{folder} is an export whose configs reach outside it ({problems[0]}): refused")
