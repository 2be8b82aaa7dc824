"""Shared by the benchmark scripts: provenance (command, commit, machine) and JSON + markdown output."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def machine() -> dict:
    from onestep.eval.speed import machine_info

    return machine_info()


def git_commit() -> str:
    from onestep.eval.speed import git_commit as commit

    return commit()


def provenance() -> dict:
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": git_commit(), "machine": machine()}


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_stem: str | Path, result: dict, title: str) -> None:
    """``out_stem.json`` (everything) and ``out_stem.md`` (tables of list-of-dict entries + provenance)."""
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    out_stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = [f"# {title}", "", f"- command: `{result.get('command')}`", f"- commit: `{result.get('commit')}`",
          f"- machine: {json.dumps(result.get('machine'))}", ""]
    for k, v in result.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            md += [f"## {k}", "", _md_table(v), ""]
        elif isinstance(v, dict) and k not in ("machine",):
            md += [f"## {k}", "", "```json", json.dumps(v, indent=2, default=str), "```", ""]
    out_stem.with_suffix(".md").write_text("\n".join(md))
