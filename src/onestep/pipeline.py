"""The main job: one command from data to the comparison table (``onestep demo`` quick, ``onestep bench`` full).

Stages, each in its own run directory under ``ROOT`` and skipped when already finished (re-running the
command resumes an interrupted stage from its last checkpoint):

    tokenizer -> teacher -> teacher samples -> eval (classifier FID, IS, precision/recall, accuracy) -> report

(DD1 and DD2 stages join this pipeline as they land.)

The tokenizer and teacher can come from a shipped checkpoint (``assets/``) made with this project's own
commands (see assets/README.md), so the quick job fits its time budget on a 2-core CPU.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from onestep import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets"


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    data: str = "fashion-mnist"
    tokenizer_preset: str = "default"
    tokenizer_steps: int | None = None
    teacher_preset: str = "small"
    teacher_steps: int | None = None
    # teacher sampling rule: also the p of DD1's map and DD2's teacher score
    cfg_scale: float = 2.0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    use_assets: bool = True
    n_grid: int = 50
    n_eval: int = 1000        # teacher samples scored with the classifier features
    n_inception: int = 0      # of those, how many also get the Inception FID (slow on a CPU)
    n_ref_classifier: int | None = None  # train images in the classifier reference (None = all)

    def to_dict(self) -> dict:
        return asdict(self)

    def sampling(self):
        from onestep.teacher.sampling import SamplingConfig

        return SamplingConfig(cfg_scale=self.cfg_scale, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


PIPELINE_PRESETS = {
    "quick": PipelineConfig(name="quick"),
    "full": PipelineConfig(name="full", use_assets=False, n_eval=10000, n_inception=2000),
    "tiny": PipelineConfig(name="tiny", tokenizer_preset="tiny", teacher_preset="tiny", use_assets=False, n_grid=10,
                           n_eval=100, n_ref_classifier=1000),
}


class Pipeline:
    def __init__(self, root: str | Path, cfg: PipelineConfig, device: str = "cpu", seed: int = 0, data_root=None):
        self.root, self.cfg, self.device, self.seed, self.data_root = Path(root), cfg, device, seed, data_root
        self.root.mkdir(parents=True, exist_ok=True)
        self.costs_path = self.root / "costs.json"
        self.costs = json.loads(self.costs_path.read_text()) if self.costs_path.exists() else {}
        ckpt.write_json(self.root / "pipeline.json", {"config": cfg.to_dict(), "device": device, "seed": seed})

    def _stage(self, name: str, done: Path, fn) -> Path:
        if (done / "model.safetensors").exists() or (done.is_file()):
            print(f"[{self.cfg.name}] {name}: reusing {done}", flush=True)
            return done
        print(f"[{self.cfg.name}] {name}: running", flush=True)
        t0 = time.time()
        out = fn()
        self.costs[name] = round(time.time() - t0 + self.costs.get(f"{name}_previous", 0.0), 2)
        ckpt.write_json(self.costs_path, self.costs)
        return out

    # ---- stages -------------------------------------------------------------------------------
    def asset(self, kind: str) -> Path | None:
        d = ASSETS / self.cfg.data / kind
        return d if self.cfg.use_assets and (d / "final" / "model.safetensors").exists() else None

    def tokenizer(self) -> Path:
        shipped = self.asset("tokenizer")
        if shipped is not None:
            print(f"[{self.cfg.name}] tokenizer: shipped checkpoint {shipped}", flush=True)
            return shipped
        from onestep.distributed import setup
        from onestep.tokenizer.train import VQ_TRAIN_PRESETS, train_tokenizer

        run = self.root / "tokenizer"
        cfg = replace(VQ_TRAIN_PRESETS[self.cfg.tokenizer_preset], seed=self.seed)
        if self.cfg.tokenizer_steps:
            cfg = replace(cfg, steps=self.cfg.tokenizer_steps)
        self._stage("tokenizer", run / "final",
                    lambda: train_tokenizer(run, cfg, self.cfg.data, self.data_root, setup(self.device)))
        return run

    def teacher(self, tokenizer_dir: Path) -> Path:
        shipped = self.asset("teacher")
        if shipped is not None:
            print(f"[{self.cfg.name}] teacher: shipped checkpoint {shipped}", flush=True)
            return shipped
        from onestep.distributed import setup
        from onestep.teacher.train import TEACHER_TRAIN_PRESETS, train_teacher

        run = self.root / "teacher"
        cfg = replace(TEACHER_TRAIN_PRESETS[self.cfg.teacher_preset], seed=self.seed)
        if self.cfg.teacher_steps:
            cfg = replace(cfg, steps=self.cfg.teacher_steps)
        self._stage("teacher", run / "final",
                    lambda: train_teacher(run, tokenizer_dir, cfg, self.cfg.data, self.data_root, setup(self.device)))
        return run

    def evaluate_teacher(self, teacher_dir: Path) -> dict:
        """Teacher samples: a grid (same labels/seeds as every method) and the metrics row + report."""
        from onestep.eval.evaluate import Evaluator
        from onestep.eval.report import save_grid, write_report
        from onestep.runs import load_teacher
        from onestep.samplers import class_labels, generate, teacher_sampler

        teacher, _, tok = load_teacher(teacher_dir, self.device)
        s = teacher_sampler(teacher, tok, self.cfg.sampling())
        labels = class_labels(max(self.cfg.n_eval, self.cfg.n_grid), teacher.num_classes, self.device)
        out = generate(s, labels, self.seed, batch_size=100, keep_tokens=False)
        grid = save_grid(out["images"][: self.cfg.n_grid], self.root / "grids" / "teacher.png", nrow=teacher.num_classes)
        ev = Evaluator(self.cfg.data, self.data_root, self.device, n_ref_classifier=self.cfg.n_ref_classifier,
                       n_ref_inception=max(self.cfg.n_inception, 2000))
        res = ev.evaluate(out["images"], out["labels"], n_inception=self.cfg.n_inception)
        row = {"method": "teacher", "steps": s.steps, "params": s.params, **res, "grid": str(grid.relative_to(self.root))}
        floor = ev.data_floor(n_inception=self.cfg.n_inception, n_test=self.cfg.n_ref_classifier)
        metrics = {"rows": [row], "data_floor_fid": {k: floor[k] for k in ("fid_classifier", "fid_inception") if k in floor},
                   "sampling": self.cfg.sampling().to_dict(), "classifier_test_accuracy": ev.classifier_meta["test_accuracy"]}
        ckpt.write_json(self.root / "metrics.json", metrics)
        report = write_report([self.root], self.root / "report", title=f"onestep {self.cfg.name}: {self.cfg.data}")
        return {"teacher_grid": str(grid), "metrics": str(self.root / "metrics.json"), "report": str(report),
                "teacher_fid_classifier": round(res["fid_classifier"], 3),
                "teacher_class_accuracy": round(res["class_accuracy"], 4)}

    def run(self) -> dict:
        t0 = time.time()
        tok = self.tokenizer()
        teacher = self.teacher(tok)
        outputs = {"tokenizer": str(tok), "teacher": str(teacher)}
        outputs.update(self.evaluate_teacher(teacher))
        outputs["wall_time_s"] = round(time.time() - t0, 1)
        ckpt.write_json(self.root / "outputs.json", outputs)
        return outputs


def _print_outputs(root: Path, outputs: dict) -> None:
    print("\nDone. Everything is under", root.resolve())
    for k, v in outputs.items():
        print(f"  {k:>16}: {v}")


def cmd_pipeline(args) -> None:
    import os

    preset = args.preset or ("quick" if args.command == "demo" else "full")
    cfg = PIPELINE_PRESETS[preset]
    overrides = {k: getattr(args, k) for k in ("data",) if getattr(args, k, None)}
    if args.no_assets:
        overrides["use_assets"] = False
    cfg = replace(cfg, **overrides)
    if os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(os.cpu_count() or 1)
    root = Path(args.root or f"runs/{preset}")
    outputs = Pipeline(root, cfg, args.device, args.seed, args.data_root).run()
    _print_outputs(root, outputs)


def register(sub) -> None:
    for name, help_ in (("demo", "the quick pipeline on the default data (README's main command, <= 20 min)"),
                        ("bench", "the full pipeline: the papers' tables at small scale (<= 90 min)")):
        p = sub.add_parser(name, help=help_, description=__doc__.split("\n\n")[0] + ". " + help_)
        p.add_argument("--preset", default=None, choices=sorted(PIPELINE_PRESETS), help="pipeline preset")
        p.add_argument("--root", default=None, help="where the runs go (default runs/<preset>)")
        p.add_argument("--data", default=None, choices=["fashion-mnist", "mnist", "folder"])
        p.add_argument("--data-root", default=None)
        p.add_argument("--no-assets", action="store_true", help="train the tokenizer and teacher instead of using shipped ones")
        p.add_argument("--device", default="cpu")
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=cmd_pipeline)
