"""Image CSD runs side by side: one-step quality of DD2 generators (EMA) from the same stage-1 model.

    OMP_NUM_THREADS=1 python lab/studies/dd2_image_csd.py NAME=RUN_OR_MODULE_DIR [NAME=...] [-n 2000] [--steps 1 2 3 4]

Every run is scored exactly as ``onestep eval --run RUN --method dd2`` scores it (the same balanced labels and
seeds for all rows): classifier FID against the train split, IS, precision / recall, class accuracy. A
training-checkpoint module directory (``RUN/checkpoints/step_N/ema``) is a valid RUN, so one training run
gives a learning curve. ``--steps`` adds the multi-step rows (paper Alg. 4: the teacher re-samples the last k - 1
AR steps) of every run. The CSD configuration of each row is read from its config. Writes
lab/results/dd2-image-csd.{json,md} (``--out``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: lab.*

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402

CSD_KEYS = ("steps", "batch_size", "lr", "guidance_lr", "guidance_steps", "m_noise", "generator_t", "loss_form",
            "condition_on_codes", "seed")


def main(argv=None) -> dict:
    import torch

    from onestep import checkpoint as ckpt
    from lab.csd_variants import CSDAblation
    from onestep.dd2.csd import CSDConfig
    from onestep.eval.evaluate import Evaluator
    from onestep.runs import final_dir
    from onestep.dd2.sampling import dd2_sampler, load_dd2
    from onestep.samplers import class_labels, generate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=DIR: a `onestep dd2 train` run or a checkpoint's ema/ directory")
    p.add_argument("-n", type=int, default=2000, help="samples per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, nargs="+", default=[1], help="total sampling steps k (1 = one step)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "dd2-image-csd"))
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    ev = Evaluator(progress=False)
    rows, csd_defaults = [], {**CSDConfig().to_dict(), **CSDAblation().to_dict()}
    for spec in a.runs:
        name, _, run = spec.partition("=")
        if not run:
            raise ValueError(f"expected NAME=DIR, got {spec!r}")
        config = ckpt.read_json(final_dir(run) / "config.json")
        csd, train_metrics = {**config.get("csd", {}), **config.get("ablation", {})}, config.get("metrics", {})
        step_dir = next((q for q in Path(run).parts if q.startswith("step_")), None)  # a training checkpoint
        models = load_dd2(run)  # loaded once per run; one sampler per step count
        for k in a.steps:
            sampler = dd2_sampler(*models, steps=k)
            out = generate(sampler, class_labels(a.n, sampler.info["num_classes"]), a.seed, batch_size=250,
                           progress=False, keep_tokens=False)
            res = ev.evaluate(out["images"], out["labels"], n_inception=0)
            rows.append({"run": name, "sampling_steps": k,
                         "generator_steps_done": int(step_dir[5:]) if step_dir else csd.get("steps"),
                         **{c: csd.get(c, csd_defaults[c]) for c in CSD_KEYS},  # older runs: the defaults
                         **{m: round(v, 4) for m, v in res.items() if isinstance(v, float)},
                         "train_cpu_s": train_metrics.get("cpu_time_s"), "train_wall_s": train_metrics.get("wall_time_s"),
                         "dir": run})
            print(rows[-1], flush=True)
    result = {**provenance(), "n_samples": a.n, "metric": "classifier FID (own features) vs the train split; same "
              "labels and seeds for every row", "rows": rows}
    write_results(a.out, result, "DD2 image CSD runs side by side (EMA generator; sampling_steps 1 = one step)")
    return result


if __name__ == "__main__":
    main()
