"""Stage-1 AR-diffusion models sampled token by token with E Euler steps per token (the paper's Table 7 uses 10).

    OMP_NUM_THREADS=1 python lab/studies/dd2_stage1_euler.py NAME=STAGE1_RUN [NAME=...] [-n 2000] [--euler 10 40 100]

Each row is scored as the bench's ``dd2-stage1-euler10`` row is (``onestep.dd2.sampling.ardiffusion_sampler``, the
same balanced labels and seeds for every row): classifier FID against the train split, IS, precision / recall, class
accuracy. More Euler steps separate the per-token solver's error from the model's: a model whose FID keeps falling
with E has a better score than its Euler-10 row says. Writes lab/results/dd2-stage1-euler.{json,md}
(``--out``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402


def main(argv=None) -> dict:
    from onestep import checkpoint as ckpt
    from onestep.dd2.sampling import ardiffusion_sampler
    from onestep.dd2.tune import load_ardiffusion
    from onestep.eval.evaluate import Evaluator
    from onestep.runs import final_dir, resolve_ref
    from onestep.teacher.load import load_teacher
    from onestep.samplers import class_labels, generate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=DIR: a `onestep dd2 tune` run")
    p.add_argument("-n", type=int, default=2000, help="samples per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--euler", type=int, nargs="+", default=[10, 40, 100], help="Euler steps per token")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "dd2-stage1-euler"))
    a = p.parse_args(argv)
    ev = Evaluator(progress=False)
    rows = []
    for spec in a.runs:
        name, _, run = spec.partition("=")
        if not run:
            raise ValueError(f"expected NAME=DIR, got {spec!r}")
        model, config = load_ardiffusion(run)
        if config.get("kind") != "dd2-ardiffusion":
            raise ValueError(f"{run} is a {config.get('kind')!r} model, not a stage-1 (dd2 tune) run")
        _, _, tok = load_teacher(resolve_ref(config["teacher_dir"], final_dir(run)), "cpu")
        tune = ckpt.read_json(final_dir(run) / "config.json").get("tune", {})
        for E in a.euler:
            t0 = time.time()
            sampler = ardiffusion_sampler(model, tok, E)
            out = generate(sampler, class_labels(a.n, sampler.info["num_classes"]), a.seed, batch_size=250,
                           progress=False, keep_tokens=False)
            res = ev.evaluate(out["images"], out["labels"], n_inception=0)
            rows.append({"run": name, "euler_steps": E, "tune_steps": tune.get("steps"), "n_pool": tune.get("n_pool"),
                         **{m: round(v, 4) for m, v in res.items() if isinstance(v, float)},
                         "sample_and_score_s": round(time.time() - t0, 1), "dir": run})
            print(rows[-1], flush=True)
    result = {**provenance(), "n_samples": a.n, "metric": "classifier FID (own features) vs the train split; same "
              "labels and seeds for every row", "rows": rows}
    write_results(a.out, result, "Stage-1 AR-diffusion models: per-token Euler steps against FID")
    return result


if __name__ == "__main__":
    main()
