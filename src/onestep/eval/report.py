"""Reports: sample grids, the metrics table, and plots (FID vs steps, FID vs latency) as md + html + png.

Inputs (:func:`collect_rows`), each one of:

- a run directory holding ``metrics.json``, or a ``metrics.json`` file, with rows (a pipeline's table)::

    {"rows": [{"method": str, "steps": int, "params": int, "fid_classifier": float, "fid_inception": float,
               "inception_score": float, "precision": float, "recall": float, "latency_b1_s": float,
               "throughput_b64": float, "speedup_b1": float, "speedup_b64": float, "grid": "path.png"}, ...],
     "data_floor_fid": {...}, ...}

- the JSON of one evaluation (``onestep eval --out FILE``, a pipeline's ``evals/<method>.json``): one row, its
  ``method``, ``steps`` and ``params`` as recorded (``--images``: the method is the images' file name), its grid
  (``eval`` writes FILE's name with .png), and its ``data_floor`` as the report's data floor.

Missing values are shown as "-". Grids are referenced relative to the report. The tables' headers are the metrics'
labels (:data:`LABELS`): IS, precision and recall are computed on the project's classifier (its logits and
128-d features, :mod:`onestep.eval.classifier`), not on Inception-v3, and are labelled so; ``fid_inception`` is the
one Inception-v3 figure.
"""
from __future__ import annotations

import html
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

COLUMNS = ["method", "steps", "params", "fid_classifier", "fid_inception", "inception_score", "precision", "recall",
           "class_accuracy", "latency_b1_s", "throughput_b64", "speedup_b1", "speedup_b64"]

# the human-facing name of each metric key (tables, eval's printed output); the JSON keys stay as they are
LABELS = {
    "n": "samples",
    "fid_classifier": "FID (classifier)",
    "fid_classifier_10000": "FID (classifier, 10k samples)",
    "fid_inception": "FID (Inception)",
    "n_inception": "samples (Inception FID)",
    "inception_score": "IS (classifier)",
    "precision": "precision (classifier)",
    "recall": "recall (classifier)",
    "class_accuracy": "class accuracy (classifier)",
    "latency_b1_s": "latency b=1 (s)",
    "throughput_b64": "throughput b=64 (images/s)",
    "speedup_b1": "speed-up b=1",
    "speedup_b64": "speed-up b=64",
}


def label(key: str) -> str:
    """The column header of a metric key (the key itself when it has no label)."""
    return LABELS.get(key, key)


MIN_CELL = 64  # grids upscale smaller images to at least this many pixels a side (nearest neighbour)
CAPTION_H = 14  # pixels of a caption line


def grid_columns(n: int, num_classes: int | None = None) -> int:
    """Columns of a grid of ``n`` images: one class per column when the classes fit (at most 16), else a near-square
    grid."""
    if num_classes and num_classes <= 16:
        return max(1, min(n, num_classes))
    return max(1, min(n, math.ceil(math.sqrt(n))))


@dataclass(frozen=True)
class GridLayout:
    """Where :func:`save_grid` puts things: ``cols`` x ``rows`` cells of ``cell_w`` x ``cell_h`` pixels (the image
    upscaled by ``scale``, plus ``caption_h`` under it when every image has its own caption), ``header_h`` pixels of
    column captions on top, ``pad`` pixels between cells."""

    cols: int
    rows: int
    scale: int
    cell_w: int
    cell_h: int
    caption_h: int
    header_h: int
    pad: int

    def top(self, row: int) -> int:
        """The y of row ``row``'s cell (``row == rows``: the grid's height)."""
        return self.header_h + self.pad + row * (self.cell_h + self.pad)


def grid_layout(n: int, h: int, w: int, cols: int, pad: int = 2, captions: str | None = None,
                min_cell: int = MIN_CELL) -> GridLayout:
    """The layout of ``n`` images of ``h`` x ``w`` in ``cols`` columns; ``captions``: None, "columns" (one caption per
    column, on top) or "cells" (one under each image)."""
    cols = max(1, min(cols, n))
    scale = max(1, math.ceil(min_cell / max(h, w)))
    cap = CAPTION_H if captions == "cells" else 0
    return GridLayout(cols, (n + cols - 1) // cols, scale, w * scale, h * scale + cap, cap,
                      CAPTION_H + pad if captions == "columns" else 0, pad)


def save_grid(images_uint8: torch.Tensor, path: str | Path, nrow: int | None = None, pad: int = 2,
              labels=None, class_names: list[str] | None = None, min_cell: int = MIN_CELL) -> Path:
    """Tile uint8 images (N, C, H, W) into one PNG on a white background, ``nrow`` per row (None: :func:`grid_columns`
    of the number of classes). Images smaller than ``min_cell`` pixels are upscaled by the integer factor that brings
    them there (nearest neighbour: the pixels stay visible). With ``labels`` (one per image) and ``class_names``, the
    classes are captioned: above each column when every image of the column has one class (the balanced labels of
    ``class_labels`` in one column per class), else under each image."""
    from PIL import Image, ImageDraw, ImageFont  # Pillow, optional (it comes with matplotlib): imported to draw

    x = images_uint8.cpu()
    if x.dtype != torch.uint8:
        raise TypeError("save_grid expects uint8 images")
    N, C, H, W = x.shape
    labels = None if labels is None or not class_names else [int(v) for v in labels][:N]
    if not nrow:
        nrow = grid_columns(N, len(class_names) if class_names else (len(set(labels)) if labels else None))
    captions = None
    if labels is not None:
        cols = max(1, min(nrow, N))
        same = all(labels[i] == labels[i % cols] for i in range(N))
        captions = "columns" if same else "cells"
    lay = grid_layout(N, H, W, nrow, pad, captions, min_cell)
    if lay.scale > 1:
        x = x.repeat_interleave(lay.scale, dim=2).repeat_interleave(lay.scale, dim=3)
    width = lay.cols * (lay.cell_w + pad) + pad
    grid = torch.full((C, lay.top(lay.rows), width), 255, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, lay.cols)
        y0, x0 = lay.top(r), pad + c * (lay.cell_w + pad)
        grid[:, y0:y0 + H * lay.scale, x0:x0 + lay.cell_w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if C == 1 else arr)
    if captions is not None:
        draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=10)
        ink = 0 if C == 1 else (0, 0, 0)

        def caption(text: str, x0: int, y0: int) -> None:
            while text and draw.textlength(text, font=font) > lay.cell_w:
                text = text[:-1]
            draw.text((x0 + (lay.cell_w - draw.textlength(text, font=font)) / 2, y0), text, fill=ink, font=font)

        name = lambda k: class_names[k] if 0 <= k < len(class_names) else str(k)  # noqa: E731
        if captions == "columns":
            for c in range(min(lay.cols, N)):
                caption(name(labels[c]), pad + c * (lay.cell_w + pad), 2)
        else:
            for i in range(N):
                r, c = divmod(i, lay.cols)
                caption(name(labels[i]), pad + c * (lay.cell_w + pad), lay.top(r) + H * lay.scale + 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    if isinstance(v, int) and v > 10_000:
        return f"{v / 1e6:.2f}M"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    """The ``columns`` that some row has, as a markdown table headed by their labels (:func:`label`)."""
    cols = [c for c in columns if any(c in r for r in rows)]
    out = ["| " + " | ".join(label(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


EVAL_METRICS = ("fid_classifier", "fid_inception", "inception_score", "precision", "recall", "class_accuracy")


def format_evaluation(res: dict) -> str:
    """One evaluation (``onestep eval``'s JSON) as labelled lines: what was scored, each metric under its label
    (:data:`LABELS`) beside the data floor's figure, the Inception FID's sample count and reference."""
    source = res.get("method") or res.get("images") or "images"
    steps = f", {res['steps']} sampling step(s)" if res.get("steps") is not None else ""
    lines = [f"{source}{steps}: {res.get('n', '?')} samples scored against {res.get('data', 'the data set')}"]
    floor = res.get("data_floor") or {}
    for k in EVAL_METRICS:
        if res.get(k) is None:
            continue
        line = f"  {label(k):<28} {_fmt(res[k]):>9}"
        if floor.get(k) is not None:
            line += f"    data floor {_fmt(floor[k]):>7}"
        if k == "fid_inception":
            line += f"    on {res.get('n_inception', '?')} samples; reference: {res.get('inception_reference', '-')}"
        lines.append(line)
    if floor:
        lines.append(f"  (data floor: the same metrics of {floor.get('n', '?')} real test images against the reference)")
    if res.get("classifier_test_accuracy") is not None:
        lines.append(f"  (classifier: the project's own, test accuracy {_fmt(res['classifier_test_accuracy'])})")
    return "\n".join(lines)


def plot_fid(rows: list[dict], x: str, path: Path, metric: str = "fid_classifier", logx: bool = False) -> Path | None:
    import matplotlib  # slow to import, and its backend is set before pyplot loads: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get(x) is not None and r.get(metric) is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    families: dict[str, list] = {}
    for r in pts:
        families.setdefault(r["method"].split("-")[0].split(" ")[0], []).append(r)
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r[x])
        ax.plot([r[x] for r in rs], [r[metric] for r in rs], "o-", label=fam)
        for r in rs:
            ax.annotate(r["method"], (r[x], r[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(label(x))
    ax.set_ylabel(label(metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


NO_ROWS = ("expected a run directory holding metrics.json, a metrics.json with \"rows\", or the JSON that "
           "`onestep eval --out` writes")


def _read_source(source: str | Path) -> tuple[dict, Path]:
    """The JSON of one report input (a run directory: its metrics.json) and the folder its paths are relative to."""
    p = Path(source)
    if p.is_dir():
        if not (p / "metrics.json").exists():
            raise ValueError(f"{source}: no metrics.json in this directory; {NO_ROWS}")
        p = p / "metrics.json"
    elif not p.exists():
        raise ValueError(f"{source} does not exist; {NO_ROWS}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source} is not a JSON file ({e}); {NO_ROWS}") from None
    return data, p.parent


def evaluation_row(data: dict, name: str) -> dict:
    """One evaluation (``onestep eval --out``'s JSON) as a report row: its method (``--images``: the images' file
    name, else ``name``), steps, params and metrics as recorded."""
    row = {k: v for k, v in data.items() if k != "data_floor"}
    if not row.get("method"):
        row["method"] = Path(data["images"]).name if data.get("images") else name
    return row


def collect_rows(sources: list[str | Path] | list[dict], out_dir: str | Path,
                 warn: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """The rows and the other entries (the data floor, ...) of report inputs: run directories, metrics.json files or
    ``onestep eval --out`` files (module docstring), or dicts of either form. Grid paths come back relative to
    ``out_dir``. ``ValueError`` naming the input when one yields no row; ``warn`` (default: a line on stderr) is
    called once for each row whose grid file is missing."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    out_dir = Path(out_dir)
    rows, extras = [], {}
    for s in sources:
        if isinstance(s, dict):
            data, base, name = s, out_dir, "rows"
        else:
            (data, base), name = _read_source(s), str(s)
        if isinstance(data, dict) and isinstance(data.get("rows"), list) and data["rows"]:
            found = [dict(r) for r in data["rows"] if isinstance(r, dict)]
            extras.update({k: v for k, v in data.items() if k != "rows"})
        elif isinstance(data, dict) and "fid_classifier" in data:
            found = [evaluation_row(data, Path(name).stem)]
            if isinstance(data.get("data_floor"), dict):
                f = data["data_floor"]
                extras["data_floor_fid"] = {k: f[k] for k in ("n", "fid_classifier", "fid_inception", "n_inception")
                                            if k in f}
        else:
            found = []
        if not found:
            raise ValueError(f"{name} holds no evaluation rows; {NO_ROWS}")
        for r in found:
            r.setdefault("method", Path(name).stem)
            if not r.get("grid"):
                warn(f"{name}: row {r['method']} has no sample grid")
            else:
                g = Path(r["grid"])
                g = g if g.is_absolute() else (base / g)
                if not g.exists():
                    warn(f"{name}: row {r['method']}: grid {g} not found")
                r["grid"] = os.path.relpath(g, out_dir)
        rows += found
    return rows, extras


def write_report(sources: list[str | Path] | list[dict], out_dir: str | Path, title: str = "onestep report",
                 warn: Callable[[str], None] | None = None) -> Path:
    """Collect rows (:func:`collect_rows`: run directories, metrics.json or ``onestep eval --out`` files, dicts);
    write report.md, report.html and the plots into ``out_dir``. An input without rows is refused (``ValueError``)
    before anything is written."""
    out_dir = Path(out_dir)
    rows, extras = collect_rows(sources, out_dir, warn)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [plot_fid(rows, "steps", out_dir / "fid_vs_steps.png", logx=True),
             plot_fid(rows, "latency_b1_s", out_dir / "fid_vs_latency.png", logx=True)]
    md = [f"# {title}", "", markdown_table(rows), ""]
    if "data_floor_fid" in extras:
        md += [f"Data floor (test split vs train reference): {json.dumps(extras['data_floor_fid'])}", ""]
    md += [f"![{p.stem}]({p.name})" for p in plots if p] + [""]
    md += ["## Samples (same labels and seeds for every method)", ""]
    md += [f"**{r['method']}**\n\n![{r['method']}]({r['grid']})\n" for r in rows if r.get("grid")]
    (out_dir / "report.md").write_text("\n".join(md))
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    h = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{image-rendering:pixelated}</style></head><body>",
         f"<h1>{html.escape(title)}</h1><table><tr>" + "".join(f"<th>{html.escape(label(c))}</th>" for c in cols)
         + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows]
    h.append("</table>")
    if "data_floor_fid" in extras:
        h.append(f"<p>Data floor: {html.escape(json.dumps(extras['data_floor_fid']))}</p>")
    h += [f"<img src='{p.name}'>" for p in plots if p]
    h += [f"<h3>{html.escape(r['method'])}</h3><img src='{html.escape(r['grid'])}' width='420'>" for r in rows if r.get("grid")]
    h.append("</body></html>")
    (out_dir / "report.html").write_text("\n".join(h))
    return out_dir / "report.md"
