"""``onestep export RUN OUT``: a run as one self-contained folder that loads from anywhere.

    onestep export runs/dd2 exports/dd2
    python -c "import onestep; onestep.load('exports/dd2').sample([0, 1, 2])"

Layout of ``OUT`` (every model directory is safetensors + its JSON config, as in a run)::

    OUT/final/        the run's final weights: the generator (DD1, DD2, MapKD) or the teacher
    OUT/teacher/final the teacher the generator samples with (DD2: the stage-0 continuous-input teacher)
    OUT/tokenizer/final
    OUT/export.json   what was exported: method, components (bytes, parameters, SHA-256), the run's measured figures
    OUT/README.md     the model card: how to load it, the recipe, the measured figures

Only final weights are copied, byte for byte, or with ``half`` (``--half``) every float32 tensor stored as float16 (half
the size; the modules load them back into float32, so sampling runs as before on weights rounded to float16) (no checkpoints, caches, pools, pairs or trainer state). The configs
refer to the other components by paths inside ``OUT`` (``teacher_dir``: ``teacher``, ``tokenizer_dir``:
``tokenizer`` or ``../tokenizer``); references that sampling does not need (the stage-1 run, the pairs, the map
fit, the teacher a stage-0 teacher was adapted from) are dropped, the data location (``data_root``) is cleared (the
data set's name stays) and imported weights keep their file names only. Before ``OUT`` appears, the folder is
checked: every reference resolves inside it, no config holds an absolute path or one leading out of it, and it
loads (strictly) as a generator. It is written into a temporary folder next to ``OUT`` and renamed, so ``OUT`` is
either complete or absent.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from onestep import api
from onestep import checkpoint as ckpt
from onestep.eval import report
from onestep.integrity import file_sha256, outside_references
from onestep.methods import run_kind
# REF_KEYS: the config keys naming other runs; an export keeps those that sampling follows, rewritten inside it
from onestep.runs import REF_KEYS, final_dir, resolve_ref

FORMAT = "onestep-export/1"
# per model kind: the references sampling follows, and the component each one becomes
NEEDED = {"tokenizer": {}, "teacher": {"tokenizer_dir": "tokenizer"}, "dd1": {"teacher_dir": "teacher"},
          "dd2-generator": {"teacher_dir": "teacher"}, "mapkd": {"teacher_dir": "teacher"}}
# where each component goes in OUT (its run directory; the weights are in <run>/final)
PLACES = {"final": ".", "teacher": "teacher", "tokenizer": "tokenizer"}


def export_run(run_dir: str | Path, out: str | Path, half: bool = False) -> Path:
    """Export ``run_dir`` (a teacher, DD1, DD2 or MapKD generator run) to ``out`` (see the module docstring); returns ``out``.
    ValueError (one line) for an ``out`` that exists and is not an empty folder, or a run that is not sampled."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty: export into a new folder")
    method = run_kind(run_dir)  # ValueError for a directory that holds no sampled run
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        components = _copy_components(run_dir, tmp, half)
        problems = outside_references(tmp)
        if problems:
            raise ckpt.CheckpointError(f"the export of {run_dir} is not self-contained: {problems[0]}")
        gen = _load_check(tmp)
        card = run_card(run_dir, method, components, gen)
        ckpt.write_json(tmp / "export.json", card)
        (tmp / "README.md").write_text(model_card(card, run_dir.resolve().name))
        problems = outside_references(tmp)  # export.json too
        if problems:
            raise ckpt.CheckpointError(f"the export of {run_dir} is not self-contained: {problems[0]}")
        _permissions(tmp)
        if out.exists():
            out.rmdir()  # an empty folder given as OUT
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = ckpt.write_error(e, out) if not isinstance(e, (ValueError, ckpt.CheckpointError)) else None
        if err is not None:
            raise err from e
        raise
    return out


# ---- components ----------------------------------------------------------------------------------
def _copy_components(run_dir: Path, tmp: Path, half: bool = False) -> dict:
    """Copy the final model directory of the run and of every run it needs into ``tmp`` (see ``PLACES``), with
    rewritten configs; returns {component: {"kind", "bytes", "sha256", "config"}}."""
    todo, done = [("final", final_dir(run_dir))], {}
    while todo:
        name, src = todo.pop(0)
        config = ckpt.read_json(src / "config.json")
        kind = config.get("kind")
        needed = NEEDED.get(kind)
        if needed is None:
            raise ValueError(f"{src} is a {kind!r} model: export exports teacher, DD1, DD2 and MapKD generator runs")
        dst = tmp / PLACES[name] / "final"
        dst.mkdir(parents=True, exist_ok=True)
        new = _clean(config, path=())
        for key in (*REF_KEYS, "location"):
            new.pop(key, None)
        for key, comp in needed.items():
            target = resolve_ref(config[key], src)
            if comp not in done and all(comp != c for c, _ in todo):
                todo.append((comp, final_dir(target)))
            new[key] = os.path.relpath(tmp / PLACES[comp], dst.parent)
        if half:
            tensors = ckpt.load_tensors(src / "model.safetensors")
            ckpt.save_tensors(dst / "model.safetensors", {k: v.half() if v.dtype == torch.float32 else v
                                                          for k, v in tensors.items()})
            new["weights_dtype"] = "float16"
        else:
            shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
        ckpt.write_json(dst / "config.json", new)
        done[name] = {"kind": kind, "bytes": (dst / "model.safetensors").stat().st_size,
                      "sha256": file_sha256(dst / "model.safetensors"), "config": new, "source": src}
    return done


def _clean(value, path: tuple):
    """A config with the data location cleared and file paths of imported weights cut to their names."""
    if isinstance(value, dict):
        return {k: (None if k == "data_root" else _clean(v, path + (k,))) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v, path) for v in value]
    if isinstance(value, str) and "imported_from" in path:
        return Path(value).name
    return value


def _permissions(root: Path) -> None:
    """The modes of ordinary new files and folders (the temporary folder and atomic writes are private)."""
    mask = ckpt.umask()
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _load_check(folder: Path):
    """The folder loaded with :func:`onestep.load` (every component strictly), as a one-line error otherwise."""
    return api.load(folder)


# ---- the model card --------------------------------------------------------------------------------
# the pipeline's evaluation rows (ROOT/evals/<row>.json, ROOT/metrics.json) of the run directories it names
_PIPELINE_ROWS = {"dd1": lambda m: m.startswith("dd1-"),
                  "mapkd": lambda m: m.startswith("mapkd-"),
                  "dd2": lambda m: m == "dd2-1step" or m.startswith(("dd2-alg4-", "dd2-jacobi-")),
                  "dd2-align": lambda m: m == "dd2-1step-align",
                  "teacher": lambda m: m == "teacher"}
ROW_KEYS = ("method", "steps", "n", "fid_classifier", "fid_classifier_10000", "fid_inception", "inception_score",
            "precision", "recall", "class_accuracy", "latency_b1_s", "speedup_b1", "speedup_b64")


def evaluations(run_dir: Path) -> list[dict]:
    """Measured rows of the run: the pipeline's rows for it when the run is a stage of ``onestep demo | bench``
    (ROOT/metrics.json, else ROOT/evals/*.json), and ``onestep eval --out`` files kept in the run directory
    (``RUN/eval*.json``, ``RUN/evals/*.json``)."""
    rows = []
    root, pick = run_dir.parent, _PIPELINE_ROWS.get(run_dir.name)
    if pick is not None and (root / "pipeline.json").exists():
        table = root / "metrics.json"
        found = ckpt.read_json(table).get("rows", []) if table.exists() else \
            [ckpt.read_json(p) for p in sorted((root / "evals").glob("*.json"))]
        rows += [{"source": f"onestep {_pipeline_name(root)} (pipeline)", **r} for r in found if pick(r.get("method", ""))]
    for p in sorted([*run_dir.glob("eval*.json"), *(run_dir / "evals").glob("*.json")]):
        r = ckpt.read_json(p)
        if isinstance(r, dict) and "fid_classifier" in r:
            rows.append({"source": f"onestep eval ({p.name})", **r})
    return [{k: r[k] for k in ("source", *ROW_KEYS, "seed", "data") if k in r} for r in rows]


def _pipeline_name(root: Path) -> str:
    try:
        return ckpt.read_json(root / "pipeline.json")["config"]["name"]
    except (ckpt.CheckpointError, KeyError, TypeError):
        return "demo | bench"


UPSTREAM = ("stage 1 (not exported)", "the teacher before stage 0 (not exported)")
# the training section of each kind of model's config (the stage's recipe)
_SECTIONS = ("train", "adapt", "tune", "csd", "map_fit", "mapkd", "flow")  # flow: MapKD runs under the older name
_FIGURES = ("eval", "metrics", "wall_time_s")  # what a model's config records about its training


def _recipe(config: dict) -> dict:
    """The stage, its training section, and what it recorded (a tokenizer's test PSNR, wall times, ...)."""
    section = next((k for k in _SECTIONS if isinstance(config.get(k), dict)), None)
    out = {"stage": config.get("stage") or config.get("kind"), "section": section,
           "config": config.get(section) if section else None}
    for k in ("recipe", "pairs", "imported_from"):
        if config.get(k) is not None:
            out[k] = config[k]
    out["figures"] = {k: config[k] for k in _FIGURES if config.get(k) is not None}
    return out


def run_card(run_dir: Path, method: str, components: dict, gen) -> dict:
    """export.json: what the folder holds, the recipe of every component (and of DD2's stage 1, read from the run it
    was trained from), and what was measured on the run."""
    sampler = gen.sampler()
    final_cfg = components["final"]["config"]
    metrics = final_cfg.get("metrics")
    if metrics is None and (run_dir / "metrics.json").exists():
        metrics = ckpt.read_json(run_dir / "metrics.json")
    recipe = {name: _recipe(v["config"]) for name, v in components.items()}  # the configs are cleaned already
    # the upstream stages that are not part of the export keep their recipe here: DD2's stage 1, and the teacher
    # that stage 0 adapted
    for name, key, label in (("final", "tune_dir", UPSTREAM[0]), ("teacher", "teacher_dir", UPSTREAM[1])):
        src = components.get(name, {}).get("source")
        ref = ckpt.read_json(src / "config.json").get(key) if src is not None else None
        if ref:
            try:
                recipe[label] = _recipe(_clean(ckpt.read_json(final_dir(resolve_ref(ref, src)) / "config.json"), ()))
            except ckpt.CheckpointError:  # the upstream run is gone: its recipe is not known
                pass
    tok_cfg = components["tokenizer"]["config"]
    family = final_cfg.get("family") or final_cfg.get("model", {}).get("family") or "llamagen"
    return {"format": FORMAT, "method": method, "kind": final_cfg["kind"], "family": family,
            "num_classes": gen.num_classes, "class_names": tok_cfg.get("class_names"),
            "image_shape": list(gen.image_shape), "data": _recorded(components, "data"),
            "sampling": final_cfg.get("sampling"), "sampled_params": sampler.params,
            "components": {k: {"path": _path(k), **{kk: v[kk] for kk in ("kind", "bytes", "sha256")}}
                           for k, v in components.items()},
            "recipe": recipe, "metrics": metrics, "evaluations": evaluations(run_dir)}


def _path(component: str) -> str:
    return str(Path(PLACES[component]) / "final")


def _recorded(components: dict, key: str):
    for name in ("final", "teacher", "tokenizer"):
        if name in components and components[name]["config"].get(key) is not None:
            return components[name]["config"][key]
    return None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return "-" if v is None else str(v)


def _kv(d: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in d.items() if not isinstance(v, (dict, list)))


_WHAT = {"teacher": "the AR teacher", "dd1": "a DD1 one-step generator", "dd2": "a DD2 (CSD) one-step generator",
         "mapkd": "a MapKD one-step generator (the project's own method)"}


def model_card(card: dict, source: str) -> str:
    """README.md of an export: how to load it, its contents, its recipe and its measured figures. ``source`` is the
    name of the exported run directory (no path: a card says nothing about the machine that exported it)."""
    method, names = card["method"], card.get("class_names") or []
    c, h, w = card["image_shape"]
    lines = [f"# onestep export: {method} ({card['family']} family, {card['data'] or 'imported weights'})", "",
             f"{_WHAT[method][0].upper()}{_WHAT[method][1:]}, with everything it samples with: safetensors weights and "
             f"JSON configs that refer to each other by paths inside this folder only, so the folder loads from any "
             f"location.", "",
             "```python", "import onestep", "", 'gen = onestep.load("THIS_FOLDER")',
             f"images = gen.sample([0, 1, 2], seed=0)   # uint8 (N, {c}, {h}, {w})", "```", "",
             f"The command line: `onestep sample --run THIS_FOLDER --method {method}`. Exported by `onestep export` "
             f"from a run directory named `{source}`.", "",
             f"- classes: {card['num_classes']}" + (f" ({', '.join(names)})" if names else ""),
             f"- images: {c} x {h} x {w}",
             f"- parameters used in one sampling call: {card['sampled_params']:,}"]
    if card.get("sampling"):
        lines.append(f"- the teacher's sampling rule it was distilled under: {_kv(card['sampling'])}")
    lines += ["", "## Contents", "", "| folder | model | size | SHA-256 |", "|---|---|---|---|"]
    lines += [f"| `{v['path']}` | {v['kind']} | {v['bytes'] / 2 ** 20:.2f} MiB | `{v['sha256'][:16]}` |"
              for v in card["components"].values()]
    lines += ["", "## Recipe", ""]
    for name in ("tokenizer", UPSTREAM[1], "teacher", UPSTREAM[0], "final"):
        r = card["recipe"].get(name)
        if r is None:
            continue
        where = f"`{card['components'][name]['path']}`" if name in card["components"] else name
        text = f"- {where} ({r['stage']})"
        if r.get("config"):
            text += f": {r['section']}: {_kv(r['config'])}"
        for k in ("recipe", "pairs", "imported_from"):
            if k in r:
                text += f"; {k}: {_fmt(r[k])}"
        lines.append(text)
        for k, v in r["figures"].items():
            if k != "metrics" or name != "final":  # the final model's metrics are under Measured
                lines.append(f"  - {k}: {_kv(v) if isinstance(v, dict) else _fmt(v)}")
    return "\n".join(lines + [""] + _measured_lines(card)) + "\n"


def _measured_lines(card: dict) -> list[str]:
    out = ["## Measured", ""]
    m = card.get("metrics")
    if m:
        out += [f"- {k}: {_fmt(v)}" for k, v in m.items() if not isinstance(v, (dict, list))]
    rows = card.get("evaluations") or []
    if rows:
        cols = [k for k in ROW_KEYS if any(r.get(k) is not None for r in rows)]
        out += ["", f"Evaluations (classifier FID, IS, precision / recall and class accuracy against the "
                f"{card['data']} train split, n samples per row; IS, precision / recall and class accuracy are "
                f"computed on the project's classifier, not Inception-v3):", "",
                "| source | " + " | ".join(report.label(c) for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
        out += ["| " + r["source"] + " | " + " | ".join(_fmt(r.get(k)) for k in cols) + " |" for r in rows]
    if not m and not rows:
        out.append("The run records no measured figures.")
    return out
