"""The README's side-by-side grid from the shipped models: the teacher, DD1 in one step, MapKD in one step and in three
(Jacobi), and DD2 (CSD from the map-start variant) in one step, one class per column, the same labels and seed in
every row.

    python benchmarks/side_by_side.py          # writes docs/side-by-side.png
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import onestep  # noqa: E402
from onestep.paths import assets_dir  # noqa: E402

ROWS = [("teacher", "teacher (49 AR steps)", 1), ("dd1", "DD1, 1 step", 1), ("mapkd", "MapKD (own method), 1 step", 1),
        ("mapkd", "MapKD, 3 steps (Jacobi)", 3), ("dd2", "DD2 (paper recipe, CSD from the map-start variant), 1 step", 1)]


def main(out: str = "docs/side-by-side.png", per_class: int = 2, seed: int = 0) -> Path:
    root = assets_dir() / "fashion-mnist"
    gens = {k: onestep.load(root / k) for k in ("teacher", "dd1", "mapkd", "dd2")}
    n = gens["teacher"].num_classes
    labels = [c for _ in range(per_class) for c in range(n)]
    fig, axes = plt.subplots(len(ROWS), 1, figsize=(n * 0.9, len(ROWS) * per_class * 0.95 + 0.3))
    for ax, (kind, title, steps) in zip(axes, ROWS):
        x = gens[kind].sample(labels, steps=steps, seed=seed)  # (N, C, H, W) uint8
        N, C, H, W = x.shape
        tile = x.reshape(per_class, n, C, H, W).permute(2, 0, 3, 1, 4).reshape(C, per_class * H, n * W)
        ax.imshow(tile[0].numpy() if C == 1 else tile.permute(1, 2, 0).numpy(), cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=9, loc="left")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return Path(out)


if __name__ == "__main__":
    print(main())
