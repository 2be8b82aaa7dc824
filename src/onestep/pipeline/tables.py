"""The tables of a pipeline: its rows with their speed, the training cost (Table 3), and the papers' tables written
as ``paper-table.md`` (and, with ``publish``, into benchmarks/results). The papers' claims checked on them and the
CSD-initialisation table are benchmarks (``benchmarks/paper_goals.py``)."""
from __future__ import annotations

import json
from pathlib import Path

from onestep import checkpoint as ckpt
from onestep.eval.report import markdown_table
from onestep.eval.speed import git_commit, machine_info
from onestep.paths import results_dir


def branch_prefix_s(run: Path) -> float:
    """Wall seconds of the shared prefix when ``run`` was branched from another run's checkpoint
    (``branched_from.json``, written by :func:`onestep.checkpoint.branch_run`), else 0."""
    b = run / "branched_from.json"
    return float(ckpt.read_json(b)["prefix_wall_s"]) if b.exists() else 0.0


def cost(runs: dict[str, Path]) -> dict:
    """Table 3: training wall time per stage on this machine (from each run's metrics.json)."""
    def wall(run: Path, key: str = "wall_time_s"):
        p = run / "metrics.json"
        return ckpt.read_json(p).get(key) if p.exists() else None

    c: dict = {}
    if "dd2" in runs:
        c["dd2_stage0_adapt_s"] = wall(runs["dd2_adapt"])
        c["dd2_stage1_tune_s"] = wall(runs["dd2_tune"])
        c["dd2_stage2_csd_s"] = wall(runs["dd2"])
        if "dd2_align" in runs:
            c["dd2_stage2_csd_with_alignment_s"] = wall(runs["dd2_align"]) + branch_prefix_s(runs["dd2_align"])
        parts = [c["dd2_stage0_adapt_s"], c["dd2_stage1_tune_s"], c["dd2_stage2_csd_s"]]
        c["dd2_total_s"] = round(sum(parts), 2) if None not in parts else None
    if "mapkd" in runs:  # MapKD: one stage from the teacher
        c["mapkd_s"] = wall(runs["mapkd"])
    if "dd1" in runs:
        c["dd1_pairs_s"] = wall(runs["dd1"], "pairs_wall_time_s")
        c["dd1_train_s"] = wall(runs["dd1"], "train_wall_time_s")
        c["dd1_total_s"] = round(c["dd1_pairs_s"] + c["dd1_train_s"], 2) if None not in (c["dd1_pairs_s"], c["dd1_train_s"]) else None
    cpu = {}  # process CPU seconds where the run recorded them (on a shared machine they measure the work)
    if "dd2" in runs:
        cpu.update(dd2_stage1_tune_cpu_s=wall(runs["dd2_tune"], "cpu_time_s"), dd2_stage2_csd_cpu_s=wall(runs["dd2"], "cpu_time_s"))
    if "mapkd" in runs:
        cpu["mapkd_cpu_s"] = wall(runs["mapkd"], "cpu_time_s")
    if "dd1" in runs:
        cpu.update(dd1_pairs_cpu_s=wall(runs["dd1"], "pairs_cpu_time_s"), dd1_train_cpu_s=wall(runs["dd1"], "train_cpu_time_s"))
    c.update({k: round(v, 2) for k, v in cpu.items() if v is not None})
    c["note"] = ("*_s: wall seconds on this machine (see machine), *_cpu_s: process CPU seconds where recorded; "
                 "DD2 total = stages 0 + 1 + 2 (without alignment); mapkd: MapKD, its one stage")
    return c


def tables(rows: list[dict], speed: dict, ppl: dict | None, cost: dict, floor: dict, cfg, command: str) -> dict:
    """metrics.json of a pipeline (``cfg``, run by ``command``): the quality rows with their speed columns, the data
    floor, the cost, the PPL, and what the figures were measured with."""
    sp = {r["method"]: r for r in speed.get("rows", [])}
    keys = ("latency_b1_s", "throughput_b64", "speedup_b1", "speedup_b64")
    full = []
    for r in rows:
        r = {"fid_inception": None, **r}
        r.update({k: sp.get(r["method"], {}).get(k) for k in keys})
        full.append(r)
    return {"rows": full, "data_floor_fid": floor, "cost": cost, "ppl": ppl,
            "sampling": cfg.sampling().to_dict(), "pipeline": cfg.to_dict(),
            "command": command,
            "commit": git_commit(), "machine": machine_info(), "speed_protocol": {k: v for k, v in speed.items() if k != "rows"}}


TABLE1 = ["method", "steps", "params", "fid_classifier", "fid_classifier_10000", "fid_inception", "n_inception",
          "inception_score", "precision", "recall",
          "latency_b1_s", "throughput_b64", "speedup_b1", "speedup_b64"]


def write_tables_md(path: Path, table: dict) -> Path:
    """Tables 1-3 and 5 of the DD2 paper, at this scale, as markdown (Table 4: ``benchmarks/paper_goals.py``)."""
    rows = table["rows"]
    multi = [r for r in rows if r["method"].startswith(("teacher", "dd1", "dd2", "mapkd"))]
    md = [f"# onestep: the papers' tables at small scale ({table['pipeline']['name']} preset)", "",
          f"- command: `{table['command']}`", f"- commit: `{table['commit']}`", f"- machine: {json.dumps(table['machine'])}",
          f"- teacher sampling: {json.dumps(table['sampling'])}",
          f"- data floor (test split vs train reference): {json.dumps(table['data_floor_fid'])}",
          *[f"- note: {n}" for n in table.get("notes", [])],
          "", "## Table 1: quality and speed", "", markdown_table(rows, TABLE1), "",
          "## Table 2: multi-step", "", markdown_table(sorted(multi, key=lambda r: (r["method"].split("-")[0], r["steps"])),
                                                        ["method", "steps", "fid_classifier", "fid_classifier_10000", "fid_inception",
                                                         "n_inception", "precision", "recall"]), "",
          "## Table 3: training cost (wall seconds on this machine)", "",
          "| stage | seconds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in table["cost"].items() if k != "note"]
    if table.get("ppl"):
        md += ["", "## Table 5: perceptual path length (lower = smoother)", "", "| generator | PPL |", "|---|---|"]
        md += [f"| {k} | {v:.4g} |" for k, v in table["ppl"].items() if k.startswith("dd") and isinstance(v, float)]
        md += ["", table["ppl"].get("note", "")]
    path.write_text("\n".join(md) + "\n")
    return path


def publish(table: dict, preset: str) -> None:
    """benchmarks/results/paper-table.{json,md} and the per-method views dd1-, dd2-, mapkd-<preset>."""
    results = results_dir()
    results.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(results / "paper-table.json", table)
    write_tables_md(results / "paper-table.md", table)
    for fam in ("dd1", "dd2", "mapkd"):
        sub = {**table, "rows": [r for r in table["rows"] if r["method"].startswith((fam, "teacher", "skip", "onestep"))]}
        ckpt.write_json(results / f"{fam}-{preset}.json", sub)
        write_tables_md(results / f"{fam}-{preset}.md", sub)
