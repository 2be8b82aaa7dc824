"""The main job: one command from data to the comparison table (``onestep demo`` quick, ``onestep bench`` full).

Stages, each in its own run directory under ``ROOT`` and skipped when already finished (re-running the
command resumes an interrupted stage from its last checkpoint):

    tokenizer -> teacher -> [DD1: pairs -> train] -> [DD2: adapt -> tune -> train (+ alignment)] -> eval -> report

The tokenizer and teacher can come from a shipped checkpoint (``assets/``) made with this project's own
commands (see assets/README.md), so the quick job fits its time budget on a 2-core CPU.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
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
    stages: tuple[str, ...] = ("tokenizer", "teacher", "samples")
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def sampling(self):
        from onestep.teacher.sampling import SamplingConfig

        return SamplingConfig(cfg_scale=self.cfg_scale, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


PIPELINE_PRESETS = {
    "quick": PipelineConfig(name="quick"),
    "full": PipelineConfig(name="full", use_assets=False),
    "tiny": PipelineConfig(name="tiny", tokenizer_preset="tiny", teacher_preset="tiny", use_assets=False, n_grid=10),
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

    def teacher_samples(self, teacher_dir: Path) -> Path:
        from onestep.eval.report import save_grid
        from onestep.runs import load_teacher
        from onestep.samplers import class_labels, generate, teacher_sampler

        teacher, _, tok = load_teacher(teacher_dir, self.device)
        s = teacher_sampler(teacher, tok, self.cfg.sampling())
        labels = class_labels(self.cfg.n_grid, teacher.num_classes, self.device)
        out = generate(s, labels, self.seed, batch_size=100)
        path = self.root / "grids" / "teacher.png"
        save_grid(out["images"], path, nrow=teacher.num_classes)
        return path

    def run(self) -> dict:
        t0 = time.time()
        tok = self.tokenizer()
        teacher = self.teacher(tok)
        outputs = {"tokenizer": str(tok), "teacher": str(teacher)}
        if "samples" in self.cfg.stages:
            outputs["teacher_grid"] = str(self.teacher_samples(teacher))
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
