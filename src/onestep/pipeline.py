"""The main job: one command from data to the comparison table (``onestep demo`` quick, ``onestep bench`` full).

Stages, each in its own run directory under ``ROOT`` and skipped when already finished (re-running the
command resumes an interrupted stage from its last checkpoint):

    tokenizer -> teacher ----------------------------------------------+
                   |-> DD2: adapt (stage 0) -> tune (stage 1) -> train   |-> evaluate every method (same labels
                   |                                   \\-> train+align  |   and seeds): FID (classifier; Inception
                   \\-> DD1: pairs -> train                              |   for the headline rows), IS, P/R,
                                                                         |   speed side by side, PPL
                                                                         \\-> tables (paper-table.json/.md), report

The tokenizer and teacher can come from a shipped checkpoint (``assets/``) made with this project's own
commands (see assets/README.md), so the quick job fits its time budget on a 2-core CPU. Each method's
evaluation is cached in ``ROOT/evals/<method>.json``; delete one to re-evaluate it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from onestep import checkpoint as ckpt
from onestep.paths import assets_dir, results_dir



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
    # distillation (presets of the stage commands; *_steps override their step counts)
    distill: bool = True
    adapt_preset: str = "small"
    adapt_steps: int | None = 150
    adapt_max_items: int | None = None  # stage 0 on the first N train / test images only (quick runs)
    tune_preset: str = "small"
    tune_steps: int | None = None
    tune_pool: int | None = None   # override the number of teacher-sampled sequences of stage 1
    train_preset: str = "small"
    train_steps: int | None = None
    align: bool = True          # also train the performance-alignment variant
    align_steps: int = 30       # guidance-only steps ...
    align_at_frac: float = 0.75  # ... at this fraction of the generator steps
    dd1_preset: str = "small"
    dd1_pairs: int | None = None   # override the DD1 preset's number of pairs ...
    dd1_steps: int | None = None   # ... and training steps
    dd2_multi: tuple = (2, 3, 4)
    # evaluation
    n_grid: int = 50
    n_eval: int = 1000        # samples per method scored with the classifier features (every row)
    headline_methods: tuple = ("teacher", "dd1-1step", "dd1-2step", "dd1-teacher-involved", "dd2-1step",
                               "dd2-2step", "dd2-3step", "dd2-4step")  # these rows also get ...
    n_eval_headline: int = 0  # ... the classifier FID on this many samples (0 = off) and ...
    n_inception: int = 0      # ... the Inception FID on this many (slow on a CPU: 0.12-0.25 s per image)
    n_inception_floor: int = 0  # test images in the data floor's Inception FID (0 = classifier floor only)
    n_ref_classifier: int | None = None  # train images in the classifier reference (None = all)
    n_ppl: int = 200
    speed_repeats: int = 5
    publish: bool = False     # also write benchmarks/results/{paper-table,dd1-<preset>,dd2-<preset>}.*

    def to_dict(self) -> dict:
        return asdict(self)

    def sampling(self):
        from onestep.teacher.sampling import SamplingConfig

        return SamplingConfig(cfg_scale=self.cfg_scale, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


# the evaluation noise rule of samplers.generate; rows cached under another rule are re-evaluated (before it, batch b
# drew from seed b, DD1's training noise for seed 0)
EVAL_NOISE = "stream_seed/1"

PIPELINE_PRESETS = {
    # the README's main command: every stage at a small budget (<= 20 min on 2 cores); CSD with K = 5 guidance
    # updates per generator step (the small preset): 40 + 12 steps cost what 60 + 20 did at K = 3
    "quick": PipelineConfig(name="quick", adapt_steps=40, adapt_max_items=10000, tune_steps=150, tune_pool=2048,
                            train_steps=40, align_steps=12, dd1_pairs=2048, dd1_steps=150, n_eval=1000,
                            speed_repeats=3, n_ppl=100),
    # `onestep bench`: the figures of benchmarks/results (stage budgets of the commands' "small" presets)
    # the issues' protocol for the DD1 / DD2 rows and the teacher: classifier FID on 10k samples, Inception FID on
    # 2k (Inception-v3 on a 2-core CPU costs ~0.12 s per image at 2 threads)
    "full": PipelineConfig(name="full", n_eval=2000, n_eval_headline=10000, n_inception=2000, publish=True),
    "tiny": PipelineConfig(name="tiny", tokenizer_preset="tiny", teacher_preset="tiny", use_assets=False, n_grid=10,
                           n_eval=100, n_ref_classifier=1000, adapt_preset="tiny", adapt_steps=2, tune_preset="tiny",
                           tune_steps=None, train_preset="tiny", train_steps=None, align_steps=1, dd1_preset="tiny",
                           dd2_multi=(2,), n_ppl=8, speed_repeats=1),
}


# run directory (under ROOT) of each trained stage, by its key in ``runs``
RUN_DIRS = {"dd2_adapt": "dd2-adapt", "dd2_tune": "dd2-tune", "dd2": "dd2", "dd2_align": "dd2-align", "dd1": "dd1"}


class Pipeline:
    def __init__(self, root: str | Path, cfg: PipelineConfig, device: str = "cpu", seed: int = 0, data_root=None,
                 command: str = "", workers: int = 1, _worker: bool = False):
        self.command, self.workers = command, workers
        self.root, self.cfg, self.device, self.seed, self.data_root = Path(root), cfg, device, seed, data_root
        self.root.mkdir(parents=True, exist_ok=True)
        self.costs_path = self.root / "costs.json"
        if not _worker:
            ckpt.write_json(self.root / "pipeline.json", {"config": cfg.to_dict(), "device": device, "seed": seed,
                                                          "workers": workers})

    def _record_cost(self, name: str, seconds: float) -> None:
        """costs.json[name] = seconds, read-modify-write under a lock (worker processes share the file)."""
        import fcntl

        with open(self.root / ".costs.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            costs = ckpt.read_json(self.costs_path) if self.costs_path.exists() else {}
            costs[name] = round(seconds, 2)
            ckpt.write_json(self.costs_path, costs)

    def _stage(self, name: str, done: Path | None, fn) -> Path:
        """Run ``fn`` unless ``done`` (a model dir or a file) exists (``None``: ``fn`` resumes by itself and is
        always called); its wall time goes to costs.json."""
        if done is not None and (ckpt.is_model_dir(done) or done.is_file()):
            print(f"[{self.cfg.name}] {name}: reusing {done}", flush=True)
            return done
        print(f"[{self.cfg.name}] {name}: running", flush=True)
        t0 = time.time()
        out = fn()
        self._record_cost(name, time.time() - t0)
        return out

    def _info(self):
        from onestep.distributed import setup

        return setup(self.device)

    # ---- tokenizer and teacher ----------------------------------------------------------------
    def asset(self, kind: str) -> Path | None:
        d = assets_dir() / self.cfg.data / kind
        return d if self.cfg.use_assets and ckpt.is_model_dir(d / "final") else None

    def tokenizer(self) -> Path:
        shipped = self.asset("tokenizer")
        if shipped is not None:
            print(f"[{self.cfg.name}] tokenizer: shipped checkpoint {shipped}", flush=True)
            return shipped
        from onestep.tokenizer.train import VQ_TRAIN_PRESETS, train_tokenizer

        run = self.root / "tokenizer"
        cfg = replace(VQ_TRAIN_PRESETS[self.cfg.tokenizer_preset], seed=self.seed)
        if self.cfg.tokenizer_steps:
            cfg = replace(cfg, steps=self.cfg.tokenizer_steps)
        self._stage("tokenizer", run / "final", lambda: train_tokenizer(run, cfg, self.cfg.data, self.data_root, self._info()))
        return run

    def teacher(self, tokenizer_dir: Path) -> Path:
        shipped = self.asset("teacher")
        if shipped is not None:
            print(f"[{self.cfg.name}] teacher: shipped checkpoint {shipped}", flush=True)
            return shipped
        from onestep.teacher.train import TEACHER_TRAIN_PRESETS, train_teacher

        run = self.root / "teacher"
        cfg = replace(TEACHER_TRAIN_PRESETS[self.cfg.teacher_preset], seed=self.seed)
        if self.cfg.teacher_steps:
            cfg = replace(cfg, steps=self.cfg.teacher_steps)
        self._stage("teacher", run / "final",
                    lambda: train_teacher(run, tokenizer_dir, cfg, self.cfg.data, self.data_root, self._info()))
        return run

    # ---- DD2 ------------------------------------------------------------------------------------
    def dd2_adapt(self, teacher_dir: Path) -> Path:
        from onestep.dd2.adapt import ADAPT_PRESETS, adapt_teacher

        run = self.root / RUN_DIRS["dd2_adapt"]
        cfg = replace(ADAPT_PRESETS[self.cfg.adapt_preset], seed=self.seed)
        if self.cfg.adapt_steps:
            cfg = replace(cfg, steps=self.cfg.adapt_steps, batch_size=min(cfg.batch_size, 64))
        if self.cfg.adapt_max_items:
            cfg = replace(cfg, max_items=self.cfg.adapt_max_items)
        self._stage("dd2_adapt", run / "final", lambda: adapt_teacher(run, teacher_dir, cfg, self._info()))
        return run

    def dd2_tune(self, adapt_dir: Path) -> Path:
        from onestep.dd2.tune import TUNE_PRESETS, tune

        run = self.root / RUN_DIRS["dd2_tune"]
        cfg = replace(TUNE_PRESETS[self.cfg.tune_preset], seed=self.seed)
        if self.cfg.tune_steps:
            cfg = replace(cfg, steps=self.cfg.tune_steps, head_only_steps=min(cfg.head_only_steps, self.cfg.tune_steps // 4))
        if self.cfg.tune_pool:
            cfg = replace(cfg, n_pool=self.cfg.tune_pool)
        self._stage("dd2_tune", run / "final", lambda: tune(run, adapt_dir, cfg, self.cfg.sampling(), self._info()))
        return run

    def dd2_train_cfg(self, align: bool):
        from onestep.dd2.train import TRAIN_PRESETS

        cfg = replace(TRAIN_PRESETS[self.cfg.train_preset], seed=self.seed)
        if self.cfg.train_steps:
            cfg = replace(cfg, steps=self.cfg.train_steps, warmup_steps=min(cfg.warmup_steps, self.cfg.train_steps // 4))
        align_at = max(1, int(cfg.steps * self.cfg.align_at_frac))
        return replace(cfg, align_at=align_at, align_steps=self.cfg.align_steps) if align else cfg, align_at

    def dd2_train(self, tune_dir: Path, align: bool) -> Path:
        """Stage 2 (CSD). The alignment run shares the plain run's first ``align_at`` steps (same config and
        seeds up to there): the plain run checkpoints at ``align_at`` and the alignment run is branched off
        that checkpoint (``branched_from.json``), so only the alignment phase and the rest are trained twice."""
        from onestep.dd2.train import train

        run = self.root / RUN_DIRS["dd2_align" if align else "dd2"]
        cfg, align_at = self.dd2_train_cfg(align)
        save_at, hook = (), None
        branch = self.root / RUN_DIRS["dd2_align"]
        if not align and self.cfg.align and not ckpt.is_model_dir(branch / "final") \
                and ckpt.latest_checkpoint(branch) is None:
            t0, save_at = time.time(), (align_at,)

            def hook(step: int) -> None:
                if step == align_at:
                    ckpt.branch_run(run, step, branch, time.time() - t0)
                    print(f"[{self.cfg.name}] dd2_train_align: branched from {run} at step {step}", flush=True)

        self._stage("dd2_train_align" if align else "dd2_train", run / "final",
                    lambda: train(run, tune_dir, cfg, self._info(), save_at=save_at, on_checkpoint=hook))
        return run

    def dd2_branch(self, teacher_dir: Path) -> dict[str, Path]:
        """Stages 0, 1, 2 (and the alignment run) in order."""
        runs = {"dd2_adapt": self.dd2_adapt(teacher_dir)}
        runs["dd2_tune"] = self.dd2_tune(runs["dd2_adapt"])
        runs["dd2"] = self.dd2_train(runs["dd2_tune"], align=False)
        if self.cfg.align:
            runs["dd2_align"] = self.dd2_train(runs["dd2_tune"], align=True)
        return runs

    # ---- DD1 ------------------------------------------------------------------------------------
    def dd1(self, teacher_dir: Path) -> Path:
        from onestep.dd1.stages import DD1_PRESETS, make_pairs, train_dd1

        preset = replace(DD1_PRESETS[self.cfg.dd1_preset], seed=self.seed)
        if self.cfg.dd1_pairs:
            preset = replace(preset, n_pairs=self.cfg.dd1_pairs)
        if self.cfg.dd1_steps:
            preset = replace(preset, steps=self.cfg.dd1_steps, warmup_steps=min(preset.warmup_steps, self.cfg.dd1_steps // 4))
        pairs, run = self.root / "dd1-pairs", self.root / RUN_DIRS["dd1"]
        if not ckpt.is_model_dir(run / "final"):  # make_pairs resumes / returns at once when complete
            self._stage("dd1_pairs", None,
                        lambda: make_pairs(pairs, teacher_dir, None, self.seed, self.cfg.sampling(), cfg=preset,
                                           info=self._info()))
        self._stage("dd1_train", run / "final", lambda: train_dd1(run, pairs, teacher_dir, preset, self._info()))
        return run

    # ---- methods ----------------------------------------------------------------------------------
    def teacher_facts(self, teacher_dir: Path) -> dict:
        """What the rows and grids follow from the teacher and its tokenizer: ``num_classes``, ``ar_steps`` (K, which
        names the skip-n rows), ``image_shape`` (C, H, W) and ``class_names`` (None when the tokenizer records none)."""
        if getattr(self, "_facts", None) is None:
            from onestep.runs import class_names, load_teacher, tokenizer_image_shape

            teacher, _, tok = load_teacher(teacher_dir, "cpu")
            self._facts = {"num_classes": int(teacher.num_classes), "ar_steps": len(teacher.ar_steps()),
                           "image_shape": tokenizer_image_shape(tok), "class_names": class_names(teacher_dir)}
        return self._facts

    def grid_columns(self) -> int:
        from onestep.eval.report import grid_columns

        return grid_columns(self.cfg.n_grid, self._facts["num_classes"])

    def samplers(self, teacher_dir: Path, runs: dict[str, Path]) -> dict:
        """Every method of the tables as a :class:`~onestep.samplers.Sampler`, keyed by row name."""
        from onestep.dd2.sampling import ardiffusion_sampler, dd2_sampler, load_dd2
        from onestep.dd2.tune import load_ardiffusion
        from onestep.runs import load_teacher
        from onestep.samplers import teacher_sampler

        self.teacher_facts(teacher_dir)
        teacher, _, tok = load_teacher(teacher_dir, self.device)
        sampling = self.cfg.sampling()
        out = {"teacher": teacher_sampler(teacher, tok, sampling)}
        if "dd2_tune" in runs:  # the baselines' marginals come from the stage-1 pool of teacher samples
            from onestep.dd1.baselines import baseline_samplers

            out.update(baseline_samplers(teacher_dir, self.device, sampling, self.teacher_tokens(runs)))
        if "dd1" in runs:
            from onestep.dd1.sampling import dd1_samplers

            out.update(dd1_samplers(runs["dd1"], self.device, sampling))
        if "dd2_adapt" in runs:  # stage 0's continuous-input teacher, sampled like the teacher (FID after stage 0)
            adapted, _, _ = load_teacher(runs["dd2_adapt"], self.device, with_tokenizer=False)
            out["teacher-stage0"] = teacher_sampler(adapted, tok, sampling, name="teacher-stage0")
        if "dd2" in runs:
            stage1, _ = load_ardiffusion(runs["dd2_tune"], self.device)
            out["dd2-stage1-euler10"] = ardiffusion_sampler(stage1, tok, 10)
            for key, suffix in (("dd2", ""), ("dd2_align", "-align")):
                if key not in runs:
                    continue
                gen, dd2_teacher, _, samp = load_dd2(runs[key], self.device)
                out[f"dd2-1step{suffix}"] = dd2_sampler(gen, dd2_teacher, tok, samp, 1, name=f"dd2-1step{suffix}")
                if key == "dd2":
                    out["dd2-1step-continuous"] = dd2_sampler(gen, dd2_teacher, tok, samp, 1, continuous=True)
                    for k in self.cfg.dd2_multi:
                        out[f"dd2-{k}step"] = dd2_sampler(gen, dd2_teacher, tok, samp, k)
        return out

    def teacher_tokens(self, runs: dict[str, Path]) -> torch.Tensor:
        """Teacher token samples (ids, labels) for the onestep* marginals: the stage-1 pool (same sampling rule)."""
        import numpy as np

        with np.load(runs["dd2_tune"] / "pool.npz") as f:
            return torch.from_numpy(f["ids"]).long(), torch.from_numpy(f["labels"]).long()

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluator(self):
        from onestep.eval.evaluate import Evaluator

        if not hasattr(self, "_ev"):
            self._ev = Evaluator(self.cfg.data, self.data_root, self.device, n_ref_classifier=self.cfg.n_ref_classifier,
                                 n_ref_inception=max(self.cfg.n_inception, 2000))
        return self._ev

    def evaluate(self, samplers: dict) -> list[dict]:
        """Quality rows, one per sampler, cached in ROOT/evals/<method>.json (same labels and seeds for all)."""
        from onestep.eval.report import save_grid
        from onestep.samplers import class_labels, generate

        rows = []
        for name, s in samplers.items():
            path = self.root / "evals" / f"{name}.json"
            headline = name in self.cfg.headline_methods
            if path.exists():
                cached = ckpt.read_json(path)
                if self.meets_protocol(cached, headline):
                    rows.append(cached)
                    continue
                print(f"[{self.cfg.name}] eval {name}: cached row is short of the protocol, re-evaluating", flush=True)
            ev = self.evaluator()
            n_cls = s.info["num_classes"]
            n = max(self.cfg.n_eval, self.cfg.n_grid, self.cfg.n_eval_headline if headline else 0)
            labels = class_labels(n, n_cls, self.device)
            t0 = time.time()
            out = generate(s, labels, self.seed, batch_size=250, keep_tokens=False)
            gen_time = time.time() - t0
            grid = save_grid(out["images"][: self.cfg.n_grid], self.root / "grids" / f"{name}.png",
                             nrow=self.grid_columns(), labels=out["labels"][: self.cfg.n_grid],
                             class_names=self._facts["class_names"])
            n_inc = self.cfg.n_inception if headline else 0
            k = self.cfg.n_eval  # every row's metrics on the same number of samples (FID's bias depends on it)
            res = ev.evaluate(out["images"][:k], out["labels"][:k], n_inception=n_inc)
            if len(out["images"]) > k:  # the headline rows also get the classifier FID on all their samples
                res[f"fid_classifier_{len(out['images'])}"] = ev.evaluate(out["images"], None, n_inception=0)["fid_classifier"]
            row = {"method": name, "steps": s.steps, "params": s.params, **res, "sampling_wall_time_s": round(gen_time, 2),
                   "grid": str(grid.relative_to(self.root)), "seed": self.seed, "noise": EVAL_NOISE}
            ckpt.write_json(path, row)
            print(f"[{self.cfg.name}] eval {name}: classifier FID {res['fid_classifier']:.3f}", flush=True)
            rows.append(row)
        return rows

    def meets_protocol(self, row: dict, headline: bool) -> bool:
        """A cached row is re-used only if it was scored as this config asks: the same sample counts (FID's bias
        depends on them, so every row must have the same), seed and evaluation noise rule."""
        if row.get("n") != self.cfg.n_eval or row.get("seed") != self.seed or row.get("noise") != EVAL_NOISE:
            return False
        if not headline:
            return True
        if self.cfg.n_eval_headline > self.cfg.n_eval and f"fid_classifier_{self.cfg.n_eval_headline}" not in row:
            return False
        return row.get("n_inception", 0) == min(self.cfg.n_inception, self.cfg.n_eval)

    def speed(self, samplers: dict) -> dict:
        """Latency at batch 1 and throughput at batch 64 of every method, side by side in this process."""
        from onestep.eval.speed import measure
        from onestep.samplers import class_labels

        path = self.root / "speed.json"
        if path.exists():
            return ckpt.read_json(path)
        labels = class_labels(64, self._facts["num_classes"], self.device)

        def fn(s):
            g = torch.Generator(device=self.device).manual_seed(0)
            return lambda b: s.images(labels[:b], g)

        res = measure({k: fn(s) for k, s in samplers.items() if k != "dd2-stage1-euler10"}, (1, 64), warmup=1,
                      repeats=self.cfg.speed_repeats, reference="teacher", device=self.device)
        ckpt.write_json(path, res)
        return res

    def ppl(self, runs: dict[str, Path]) -> dict:
        """Table 5: perceptual path length in noise space (classifier-feature PPL, see eval.metrics), DD1 vs DD2."""
        from onestep.dd2.sampling import load_dd2
        from onestep.eval.metrics import perceptual_path_length
        from onestep.samplers import class_labels
        from onestep.teacher.base import nearest_code

        path = self.root / "ppl.json"
        if path.exists():
            return ckpt.read_json(path)
        clf = self.evaluator().classifier
        labels = class_labels(self.cfg.n_ppl, self._facts["num_classes"])
        out: dict = {"n": self.cfg.n_ppl, "epsilon": 1e-4, "feature": "classifier penultimate layer"}
        gen, teacher, tok, _ = load_dd2(runs["dd2"], self.device)
        cb = teacher.codebook()
        shape = (teacher.seq_len, teacher.code_dim)
        with torch.no_grad():
            out["dd2_quantised"] = perceptual_path_length(
                lambda z, y: tok.decode_ids(nearest_code(gen.generate(z, y), cb)), shape, labels, clf.features)
            out["dd2_continuous"] = perceptual_path_length(
                lambda z, y: tok.decode_codes(gen.generate(z, y)), shape, labels, clf.features)
            if "dd1" in runs:
                from onestep.dd1.sampling import one_step
                from onestep.dd1.stages import load_dd1

                model = load_dd1(runs["dd1"], self.device)[0]
                n_pos = teacher.seq_len

                def dd1_soft(z, y):  # the smooth counterpart of DD1's argmax: the logits' expected code vector
                    ids0 = torch.zeros(z.shape[:2], dtype=torch.long, device=z.device)
                    clean = torch.zeros(z.shape[:2], dtype=torch.bool, device=z.device)
                    return tok.decode_codes(model(ids0, z, clean, y).softmax(-1) @ cb)

                assert model.seq_len == n_pos
                out["dd1_quantised"] = perceptual_path_length(
                    lambda z, y: tok.decode_ids(one_step(model, z, y)), shape, labels, clf.features)
                out["dd1_continuous"] = perceptual_path_length(dd1_soft, shape, labels, clf.features)
        out["note"] = ("quantised: decoded nearest codes (piecewise constant in the noise: the mean is set by the rare "
                       "pairs that cross a code boundary); continuous: DD2's output vectors / DD1's softmax-expected "
                       "code vectors (smooth)")
        ckpt.write_json(path, out)
        return out

    # ---- tables -----------------------------------------------------------------------------------
    def cost(self, runs: dict[str, Path]) -> dict:
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
        if "dd1" in runs:
            c["dd1_pairs_s"] = wall(runs["dd1"], "pairs_wall_time_s")
            c["dd1_train_s"] = wall(runs["dd1"], "train_wall_time_s")
            c["dd1_total_s"] = round(c["dd1_pairs_s"] + c["dd1_train_s"], 2) if None not in (c["dd1_pairs_s"], c["dd1_train_s"]) else None
        cpu = {}  # process CPU seconds where the run recorded them (on a shared machine they measure the work)
        if "dd2" in runs:
            cpu.update(dd2_stage1_tune_cpu_s=wall(runs["dd2_tune"], "cpu_time_s"), dd2_stage2_csd_cpu_s=wall(runs["dd2"], "cpu_time_s"))
        if "dd1" in runs:
            cpu.update(dd1_pairs_cpu_s=wall(runs["dd1"], "pairs_cpu_time_s"), dd1_train_cpu_s=wall(runs["dd1"], "train_cpu_time_s"))
        c.update({k: round(v, 2) for k, v in cpu.items() if v is not None})
        c["note"] = ("*_s: wall seconds on this machine (see machine), *_cpu_s: process CPU seconds where recorded; "
                     "DD2 total = stages 0 + 1 + 2 (without alignment)")
        return c

    def data_floor(self, ev) -> dict:
        """The data floor on as many test images as the rows have samples: ``fid_classifier`` on ``n_eval``, and
        ``fid_classifier_<n>`` on the headline column's n (FID's bias depends on the sample size)."""
        f = ev.data_floor(n_inception=self.cfg.n_inception_floor, n_test=self.cfg.n_eval)
        floor = {"n": f["n"], **{k: f[k] for k in ("fid_classifier", "fid_inception", "n_inception") if k in f}}
        if self.cfg.n_eval_headline > self.cfg.n_eval:
            h = ev.data_floor(n_inception=0, n_test=self.cfg.n_eval_headline)
            floor[f"fid_classifier_{h['n']}"] = h["fid_classifier"]
        return floor

    def tables(self, rows: list[dict], speed: dict, ppl: dict | None, cost: dict, floor: dict) -> dict:
        from onestep.eval.speed import git_commit, machine_info

        sp = {r["method"]: r for r in speed.get("rows", [])}
        keys = ("latency_b1_s", "throughput_b64", "speedup_b1", "speedup_b64")
        full = []
        for r in rows:
            r = {"fid_inception": None, **r}
            r.update({k: sp.get(r["method"], {}).get(k) for k in keys})
            full.append(r)
        by = {r["method"]: r for r in full}
        goals = {}
        t, d1, d2 = by.get("teacher"), by.get("dd1-1step"), by.get("dd2-1step")
        if t and d1 and d2:
            gap1, gap2 = d1["fid_classifier"] - t["fid_classifier"], d2["fid_classifier"] - t["fid_classifier"]
            goals["dd2_gap_le_third_of_dd1_gap"] = {"dd1_gap": gap1, "dd2_gap": gap2, "ratio": gap2 / gap1 if gap1 else None,
                                                    "holds": bool(gap2 <= gap1 / 3)}
            if d2.get("speedup_b1") is not None:
                goals["speedup_b1_ge_20x"] = {"speedup_b1": d2["speedup_b1"], "holds": bool(d2["speedup_b1"] >= 20)}
        if by.get("dd2-3step") and by.get("dd1-2step"):
            goals["dd2_3step_beats_dd1_2step"] = {"dd2_3step": by["dd2-3step"]["fid_classifier"],
                                                  "dd1_2step": by["dd1-2step"]["fid_classifier"],
                                                  "holds": bool(by["dd2-3step"]["fid_classifier"] < by["dd1-2step"]["fid_classifier"])}
        if cost.get("dd2_total_s") is not None and cost.get("dd1_total_s") is not None:
            goals["dd2_train_time_le_dd1"] = {"dd2_total_s": cost["dd2_total_s"], "dd1_total_s": cost["dd1_total_s"],
                                              "holds": bool(cost["dd2_total_s"] <= cost["dd1_total_s"])}
        abl = results_dir() / "dd2-init-ablation.json"  # Table 4 runs on the tabular teacher (benchmarks/dd2_init_ablation.py)
        init_ablation = json.loads(abl.read_text()) if abl.exists() else None
        return {"rows": full, "data_floor_fid": floor, "cost": cost, "ppl": ppl, "goals": goals,
                "init_ablation": init_ablation,
                "sampling": self.cfg.sampling().to_dict(), "pipeline": self.cfg.to_dict(),
                "command": self.command,
                "commit": git_commit(), "machine": machine_info(), "speed_protocol": {k: v for k, v in speed.items() if k != "rows"}}

    # ---- the whole job ------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.time()
        tok = self.tokenizer()
        teacher = self.teacher(tok)
        outputs = {"tokenizer": str(tok), "teacher": str(teacher)}
        if self.workers > 1 and self.cfg.distill:
            self.run_parallel(teacher)  # every stage and every row's evaluation, cached on disk: the code below re-uses them
        runs: dict[str, Path] = {}
        if self.cfg.distill:
            runs.update(self.dd2_branch(teacher))
            runs["dd1"] = self.dd1(teacher)
        samplers = self.samplers(teacher, runs)
        rows = self.evaluate(samplers)
        ev = self.evaluator()
        floor = self.data_floor(ev)
        speed = self.speed(samplers)
        ppl = self.ppl(runs) if "dd2" in runs else None
        table = self.tables(rows, speed, ppl, self.cost(runs), floor)
        ckpt.write_json(self.root / "metrics.json", table)
        write_tables_md(self.root / "paper-table.md", table)
        grid = self.side_by_side(["teacher", "dd1-1step", "dd1-2step", "dd2-1step", "dd2-3step"])
        from onestep.eval.report import write_report

        report = write_report([self.root], self.root / "report", title=f"onestep {self.cfg.name}: {self.cfg.data}")
        if self.cfg.publish:
            publish(table, self.cfg.tokenizer_preset)  # dd1-default / dd2-default: the default data preset
        outputs.update({"metrics": str(self.root / "metrics.json"), "tables": str(self.root / "paper-table.md"),
                        "side_by_side_grid": str(grid) if grid else None, "report": str(report),
                        "wall_time_s": round(time.time() - t0, 1)})
        ckpt.write_json(self.root / "outputs.json", outputs)
        return outputs

    # ---- parallel schedule (CPU) ------------------------------------------------------------------
    def row_names(self, teacher_dir: Path) -> dict[str, list[str]]:
        """The table's rows by what they need: the teacher alone, DD1, or DD2's stages (baselines included:
        onestep*'s marginals come from the stage-1 pool), most expensive first. The skip-n rows follow the teacher's
        AR step count (:func:`~onestep.dd1.baselines.skip_counts`)."""
        from onestep.dd1.baselines import skip_counts

        skips = [f"skip-{n}" for n in skip_counts(self.teacher_facts(teacher_dir)["ar_steps"])]
        dd2 = [f"dd2-{k}step" for k in sorted(self.cfg.dd2_multi, reverse=True)]
        dd2 += ["dd2-stage1-euler10", "teacher-stage0", *skips, "dd2-1step", "dd2-1step-continuous",
                "onestep*"] + (["dd2-1step-align"] if self.cfg.align else [])
        return {"teacher": ["teacher"], "dd1": ["dd1-teacher-involved", "dd1-2step", "dd1-1step"], "dd2": dd2}

    def run_parallel(self, teacher_dir: Path) -> None:
        """The DD1 and DD2 branches side by side, then every row's evaluation, in ``workers`` processes with
        cpu_count // workers threads each (the models here are small and use several threads poorly). Rows are
        evaluated as soon as what they need is trained. Results land
        in the run directories and ROOT/evals/, which the sequential code path then re-uses."""
        import multiprocessing as mp
        import os
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        threads = max(1, (os.cpu_count() or 1) // self.workers)
        args = (str(self.root), self.cfg, self.device, self.seed, self.data_root, self.command)
        names = self.row_names(teacher_dir)
        ev = self.evaluator()  # the classifier and the reference statistics, made once here (cached on disk)
        ev.reference("classifier")
        if self.cfg.n_inception:
            ev.reference("inception")
        print(f"[{self.cfg.name}] parallel: {self.workers} worker processes x {threads} thread(s)", flush=True)
        with ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn")) as ex:
            branch = {ex.submit(_pipeline_task, args, threads, "dd2"): "dd2",
                      ex.submit(_pipeline_task, args, threads, "dd1"): "dd1"}
            evals = [ex.submit(_pipeline_task, args, threads, "eval", tuple(names["teacher"]))]
            try:
                while branch:
                    done, _ = wait(list(branch), return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()  # re-raises a worker's error
                        evals += [ex.submit(_pipeline_task, args, threads, "eval", (n,)) for n in names[branch.pop(f)]]
                for f in evals:
                    f.result()
            except BaseException:
                for f in [*branch, *evals]:
                    f.cancel()  # queued tasks are dropped; running ones finish (their stages stay resumable)
                raise

    def side_by_side(self, methods: list[str]) -> Path | None:
        """One PNG: for each method a block of its first two grid rows (and the class captions), stacked vertically
        with labels."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image

        have = [m for m in methods if (self.root / "grids" / f"{m}.png").exists()]
        if not have:
            return None
        from onestep.eval.report import grid_layout

        _, H, W = self._facts["image_shape"]
        lay = grid_layout(self.cfg.n_grid, H, W, self.grid_columns(),
                          captions="columns" if self._facts["class_names"] else None)
        fig, axes = plt.subplots(len(have), 1, figsize=(7, 2.2 * len(have)))
        for ax, m in zip(list(axes) if len(have) > 1 else [axes], have):
            img = Image.open(self.root / "grids" / f"{m}.png")
            w, h = img.size
            ax.imshow(img.crop((0, 0, w, min(h, lay.top(min(2, lay.rows))))), cmap="gray")  # the first two rows
            ax.set_title(m, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        out = self.root / "grids" / "side_by_side.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


def branch_prefix_s(run: Path) -> float:
    """Wall seconds of the shared prefix when ``run`` was branched from another run's checkpoint
    (``branched_from.json``, written by :func:`onestep.checkpoint.branch_run`), else 0."""
    b = run / "branched_from.json"
    return float(ckpt.read_json(b)["prefix_wall_s"]) if b.exists() else 0.0


def _pipeline_task(args: tuple, threads: int, task: str, rows: tuple = ()):
    """One worker-process task of :meth:`Pipeline.run_parallel`: a training branch ("dd2", "dd1") or the
    evaluation of some rows ("eval")."""
    torch.set_num_threads(threads)
    root, cfg, device, seed, data_root, command = args
    p = Pipeline(root, cfg, device, seed, data_root, command, _worker=True)
    teacher = p.teacher(p.tokenizer())
    if task == "dd2":
        p.dd2_branch(teacher)
    elif task == "dd1":
        p.dd1(teacher)
    elif task == "eval":
        runs = {k: p.root / d for k, d in RUN_DIRS.items() if ckpt.is_model_dir(p.root / d / "final")}
        samplers = {k: v for k, v in p.samplers(teacher, runs).items() if k in rows}
        missing = set(rows) - set(samplers)
        if missing:
            raise RuntimeError(f"rows {sorted(missing)} have no sampler (runs found: {sorted(runs)})")
        p.evaluate(samplers)
    else:
        raise ValueError(task)


TABLE1 = ["method", "steps", "params", "fid_classifier", "fid_classifier_10000", "fid_inception", "n_inception",
          "inception_score", "precision", "recall",
          "latency_b1_s", "throughput_b64", "speedup_b1", "speedup_b64"]


def write_tables_md(path: Path, table: dict) -> Path:
    """Tables 1-3 and 5 of the DD2 paper, at this scale, as markdown."""
    from onestep.eval.report import markdown_table

    rows = table["rows"]
    multi = [r for r in rows if r["method"].startswith(("teacher", "dd1", "dd2"))]
    md = [f"# onestep: the papers' tables at small scale ({table['pipeline']['name']} preset)", "",
          f"- command: `{table['command']}`", f"- commit: `{table['commit']}`", f"- machine: {json.dumps(table['machine'])}",
          f"- teacher sampling: {json.dumps(table['sampling'])}",
          f"- data floor (test split vs train reference): {json.dumps(table['data_floor_fid'])}", "",
          "## Table 1: quality and speed", "", markdown_table(rows, TABLE1), "",
          "## Table 2: multi-step", "", markdown_table(sorted(multi, key=lambda r: (r["method"].split("-")[0], r["steps"])),
                                                        ["method", "steps", "fid_classifier", "fid_classifier_10000", "fid_inception",
                                                         "n_inception", "precision", "recall"]), "",
          "## Table 3: training cost (wall seconds on this machine)", "",
          "| stage | seconds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in table["cost"].items() if k != "note"]
    if table.get("ppl"):
        md += ["", "## Table 5: perceptual path length (lower = smoother)", "", "| generator | PPL |", "|---|---|"]
        md += [f"| {k} | {v:.4g} |" for k, v in table["ppl"].items() if k.startswith("dd") and isinstance(v, float)]
        md += ["", table["ppl"].get("note", "")]
    if table.get("init_ablation"):
        md += ["", "## Table 4: CSD's initialisation (tiny scale: the tabular teacher, TV to its exact joint)", "",
               f"`{table['init_ablation']['command']}`", "", "| stage-1 init | DD2 raw | DD2 EMA | init as a one-step generator |",
               "|---|---|---|---|"]
        md += [f"| {r['init']} | {r['tv_dd2']:.4f} | {r['tv_dd2_ema']:.4f} | {r['tv_init']:.4f} |"
               for r in table["init_ablation"]["rows"]]
    md += ["", "## Goals", "", "| goal | holds | figures |", "|---|---|---|"]
    md += [f"| {k} | {'yes' if v['holds'] else 'no'} | {json.dumps({a: b for a, b in v.items() if a != 'holds'})} |"
           for k, v in table["goals"].items()]
    path.write_text("\n".join(md) + "\n")
    return path


def publish(table: dict, preset: str) -> None:
    """benchmarks/results/paper-table.{json,md} and the per-method views dd1-<preset>, dd2-<preset>."""
    results = results_dir()
    results.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(results / "paper-table.json", table)
    write_tables_md(results / "paper-table.md", table)
    for fam in ("dd1", "dd2"):
        sub = {**table, "rows": [r for r in table["rows"] if r["method"].startswith((fam, "teacher", "skip", "onestep"))]}
        ckpt.write_json(results / f"{fam}-{preset}.json", sub)
        write_tables_md(results / f"{fam}-{preset}.md", sub)


def default_workers(device: str) -> int:
    """2 worker processes on a multi-core CPU (the DD1 and DD2 branches side by side), else 1 (sequential)."""
    import os

    return 2 if str(device).startswith("cpu") and (os.cpu_count() or 1) >= 2 else 1
