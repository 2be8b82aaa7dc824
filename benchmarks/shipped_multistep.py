"""The shipped models in one and several steps, under the headline protocol: classifier FID on 10,000 samples and the
Inception FID on the first 2,000 of them.

    OMP_NUM_THREADS=2 python benchmarks/shipped_multistep.py             # resumes: one JSON file per row

Rows: the teacher (49 AR steps), DD1 in 1 and 2 steps (DD1's own two-step rule), MapKD (``assets/fashion-mnist/mapkd``)
in 1, 2 and 3 steps (the Jacobi sampler: k - 1 teacher passes re-mapping every position, ``onestep.multistep.jacobi``),
and DD2 (``assets/fashion-mnist/dd2``: CSD from the map-start variant) in 1 and 3 steps (Alg. 4: the one-step sample,
then the teacher re-samples its last 2 AR steps), all from ``assets/fashion-mnist``, the same balanced labels and seed
(``--extra`` adds rows of other runs). The same samplers for every method: benchmarks/multistep.py. Each
row is one ``onestep.load(...)`` generator; its evaluation goes to benchmarks/results/shipped-multistep/<row>.json
and the table to benchmarks/results/shipped-multistep.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (row, shipped run, steps); the multi-step rows use each method's default sampler (DD1: dd1, MapKD: jacobi, DD2: alg4)
ROWS = [("teacher", "teacher", 1), ("dd1-1step", "dd1", 1), ("dd1-2step", "dd1", 2), ("mapkd-1step", "mapkd", 1),
        ("mapkd-jacobi-2step", "mapkd", 2), ("mapkd-jacobi-3step", "mapkd", 3), ("dd2-1step", "dd2", 1),
        ("dd2-alg4-3step", "dd2", 3)]
KEYS = ("fid_classifier", "fid_inception", "inception_score", "precision", "recall", "class_accuracy")


def evaluate_rows(runs: list[tuple], n: int, n_inception: int, seed: int, out: Path, title: str) -> dict:
    """Score each (row, run, shown run, steps, multistep sampler or None) on ``n`` samples (balanced labels, ``seed``),
    the Inception FID on the first ``n_inception``; one JSON per row under ``out`` (a finished row is read back, so the
    script resumes), the table in ``out``.json / .md."""
    import onestep
    from onestep.eval.evaluate import Evaluator
    from onestep.samplers import class_labels

    out.mkdir(parents=True, exist_ok=True)
    ev = Evaluator()
    rows = []
    for name, run, shown, steps, rule in runs:
        path = out / f"{name}.json"
        gen = onestep.load(run)
        settings = {"multistep": rule} if rule else {}
        if not path.exists():
            labels = class_labels(n, gen.num_classes)
            t0 = time.time()
            images = gen.sample(labels, steps=steps, seed=seed, batch_size=250, **settings)
            sample_s = time.time() - t0
            res = ev.evaluate(images, labels, n_inception=n_inception)
            res.update(row=name, run=shown, steps=steps, multistep=rule, sample_s=round(sample_s, 1), **provenance())
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=2) + "\n")
            tmp.replace(path)
            print(name, {k: res.get(k) for k in KEYS}, flush=True)
        row = json.loads(path.read_text())
        row["network_calls"] = gen.sampler(steps=steps, **settings).steps  # the teacher: its AR steps
        rows.append(row)
    floor = ev.data_floor(n_inception=n_inception, n_test=n)
    res = {**provenance(), "n": n, "n_inception": n_inception, "seed": seed, "data_floor": floor,
           "rows": [{"row": r["row"], "run": r.get("run"), "steps": r["network_calls"], **{k: r.get(k) for k in KEYS},
                     "commit": r["commit"]} for r in rows]}
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)  # noqa: E731
    md = [f"# {title}", "", f"- command: `{res['command']}`", f"- commit: `{res['commit']}`",
          f"- machine: {json.dumps(res['machine'])}",
          f"- protocol: classifier FID, IS, precision / recall (classifier features) on {n} samples; "
          + (f"Inception FID on the first {n_inception}" if n_inception else "no Inception FID (-)")
          + f"; balanced labels, seed {seed}",
          f"- data floor (test split against the train reference, same sizes): classifier FID "
          f"{fmt(floor.get('fid_classifier'))}, Inception FID {fmt(floor.get('fid_inception'))}", "",
          "| row | run | steps | " + " | ".join(KEYS) + " |", "|---|---|---|" + "---|" * len(KEYS)]
    md += [f"| {r['row']} | `{r['run']}` | {r['steps']} | " + " | ".join(fmt(r.get(k)) for k in KEYS) + " |"
           for r in res["rows"]]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return res


def main(argv=None) -> dict:
    from onestep.paths import assets_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=10000, help="samples per row (classifier FID)")
    p.add_argument("--n-inception", type=int, default=2000, help="of which scored by Inception-v3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "shipped-multistep"), help="output path without extension")
    p.add_argument("--extra", nargs="*", default=[], metavar="NAME=RUN:STEPS",
                   help="more rows: a run or export sampled in STEPS steps (e.g. mapkd-codes-1step=runs/mapkd-codes:1)")
    a = p.parse_args(argv)
    try:
        extra = [(name, run, int(steps)) for name, rest in (e.split("=", 1) for e in a.extra)
                 for run, steps in [rest.rsplit(":", 1)]]
    except ValueError:
        p.error("--extra takes NAME=RUN:STEPS")
    root = assets_dir() / "fashion-mnist"
    runs = [(name, root / kind, f"assets/fashion-mnist/{kind}", steps, None) for name, kind, steps in ROWS]
    runs += [(name, Path(run), run, steps, None) for name, run, steps in extra]
    return evaluate_rows(runs, a.n, a.n_inception, a.seed, Path(a.out), "The shipped models in one and several steps")


if __name__ == "__main__":
    main()
