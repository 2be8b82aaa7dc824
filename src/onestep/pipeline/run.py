"""The pipeline's run: every stage in its own run directory under ``ROOT`` (skipped when finished, resumed when
interrupted), then the rows and the tables; on a multi-core CPU the DD1 and DD2 branches and the rows' evaluations
run in two worker processes (:meth:`Pipeline.run_parallel`)."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import torch

from onestep import checkpoint as ckpt
from onestep.dd1.stages import make_pairs, train_dd1
from onestep.dd2.adapt import adapt_teacher
from onestep.dd2.train import train as train_dd2
from onestep.dd2.tune import tune as tune_dd2
from onestep.distributed import setup
from onestep.eval.report import write_report
from onestep.mapkd.train import train_mapkd
from onestep.paths import assets_dir
from onestep.pipeline.config import PipelineConfig, alignment_step, stage_config
from onestep.pipeline.rows import Rows
from onestep.pipeline.tables import cost, publish, tables, write_tables_md
from onestep.teacher.train import train_teacher
from onestep.tokenizer.train import train_tokenizer

# run directory (under ROOT) of each trained stage, by its key in ``runs``
RUN_DIRS = {"dd2_adapt": "dd2-adapt", "dd2_tune": "dd2-tune", "dd2": "dd2", "dd2_align": "dd2-align", "dd1": "dd1",
            "mapkd": "mapkd"}


class Pipeline(Rows):
    """The whole job in ``root``: the stages (each resumable, skipped when finished), the rows (:class:`Rows`) and
    the tables (:mod:`onestep.pipeline.tables`), sequentially or in ``workers`` processes (:meth:`run_parallel`)."""

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
        import fcntl  # POSIX only: imported where the lock is taken, so that the module imports on any system

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

        run = self.root / "tokenizer"
        cfg = stage_config(self.cfg, "tokenizer", self.seed)
        self._stage("tokenizer", run / "final", lambda: train_tokenizer(run, cfg, self.cfg.data, self.data_root, self._info()))
        return run

    def teacher(self, tokenizer_dir: Path) -> Path:
        shipped = self.asset("teacher")
        if shipped is not None:
            print(f"[{self.cfg.name}] teacher: shipped checkpoint {shipped}", flush=True)
            return shipped

        run = self.root / "teacher"
        cfg = stage_config(self.cfg, "teacher", self.seed)
        self._stage("teacher", run / "final",
                    lambda: train_teacher(run, tokenizer_dir, cfg, self.cfg.data, self.data_root, self._info()))
        return run

    # ---- DD2 ------------------------------------------------------------------------------------
    def dd2_adapt(self, teacher_dir: Path) -> Path:
        run = self.root / RUN_DIRS["dd2_adapt"]
        cfg = stage_config(self.cfg, "dd2_adapt", self.seed)
        self._stage("dd2_adapt", run / "final", lambda: adapt_teacher(run, teacher_dir, cfg, self._info()))
        return run

    def dd2_tune(self, adapt_dir: Path) -> Path:
        run = self.root / RUN_DIRS["dd2_tune"]
        cfg = stage_config(self.cfg, "dd2_tune", self.seed)
        self._stage("dd2_tune", run / "final", lambda: tune_dd2(run, adapt_dir, cfg, self.cfg.sampling(), self._info()))
        return run

    def dd2_train_cfg(self, align: bool):
        """Stage 2's config (with ``align``: the alignment run's) and the alignment step."""
        cfg = stage_config(self.cfg, "dd2_train", self.seed)
        at = alignment_step(self.cfg, cfg)
        return replace(cfg, align_at=at, align_steps=self.cfg.align_steps) if align else cfg, at

    def dd2_train(self, tune_dir: Path, align: bool) -> Path:
        """Stage 2 (CSD). The alignment run shares the plain run's first ``align_at`` steps (same config and
        seeds up to there): the plain run checkpoints at ``align_at`` and the alignment run is branched off
        that checkpoint (``branched_from.json``), so only the alignment phase and the rest are trained twice."""
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
                    lambda: train_dd2(run, tune_dir, cfg, self._info(), save_at=save_at, on_checkpoint=hook))
        return run

    def dd2_branch(self, teacher_dir: Path) -> dict[str, Path]:
        """Stages 0, 1, 2 (and the alignment run) in order."""
        runs = {"dd2_adapt": self.dd2_adapt(teacher_dir)}
        runs["dd2_tune"] = self.dd2_tune(runs["dd2_adapt"])
        runs["dd2"] = self.dd2_train(runs["dd2_tune"], align=False)
        if self.cfg.align:
            runs["dd2_align"] = self.dd2_train(runs["dd2_tune"], align=True)
        return runs

    def mapkd(self, teacher_dir: Path) -> Path:
        """MapKD (:mod:`onestep.mapkd`): from the teacher alone."""
        run = self.root / RUN_DIRS["mapkd"]
        cfg = stage_config(self.cfg, "mapkd", self.seed)
        self._stage("mapkd", run / "final", lambda: train_mapkd(run, teacher_dir, cfg, self.cfg.sampling(), self._info()))
        return run

    # ---- DD1 ------------------------------------------------------------------------------------
    def dd1(self, teacher_dir: Path) -> Path:
        preset = stage_config(self.cfg, "dd1", self.seed)
        pairs, run = self.root / "dd1-pairs", self.root / RUN_DIRS["dd1"]
        if not ckpt.is_model_dir(run / "final"):  # make_pairs resumes / returns at once when complete
            self._stage("dd1_pairs", None,
                        lambda: make_pairs(pairs, teacher_dir, None, self.seed, self.cfg.sampling(), cfg=preset,
                                           info=self._info()))
        self._stage("dd1_train", run / "final", lambda: train_dd1(run, pairs, teacher_dir, preset, self._info()))
        return run

    def notes(self, table: dict) -> list[str]:
        """Lines that say what a reader of the table must know: a row whose budget leaves it unrecognisable, and the
        row that stands in for it."""
        by = {r["method"]: r for r in table["rows"]}
        out = []
        d2 = by.get("dd2-1step")
        if d2 is not None and (d2.get("fid_classifier") or 0) > 150:
            steps = stage_config(self.cfg, "dd2_train", self.seed).steps
            line = (f"dd2-*: DD2 by the paper's recipe at this budget ({steps} CSD steps) is far from converged "
                    f"(classifier FID {d2['fid_classifier']:.0f}): its samples are not yet recognisable")
            if "dd2-1step-shipped" in by:
                line += ("; dd2-1step-shipped is the shipped DD2 generator (assets/fashion-mnist/dd2, trained far "
                         "longer) on the same protocol")
            out.append(line)
        return out

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
            if self.cfg.mapkd:
                runs["mapkd"] = self.mapkd(teacher)
        samplers = self.samplers(teacher, runs)
        rows = self.evaluate(samplers)
        ev = self.evaluator()
        floor = self.data_floor(ev)
        speed = self.speed(samplers)
        ppl = self.ppl(runs) if "dd2" in runs else None
        table = tables(rows, speed, ppl, cost(runs), floor, self.cfg, self.command)
        table["notes"] = self.notes(table)
        ckpt.write_json(self.root / "metrics.json", table)
        write_tables_md(self.root / "paper-table.md", table)
        grid = self.side_by_side(["teacher", "dd1-1step", "dd1-2step", "mapkd-1step", "mapkd-jacobi-3step", "dd2-1step",
                                  "dd2-1step-shipped"])

        report = write_report([self.root], self.root / "report", title=f"onestep {self.cfg.name}: {self.cfg.data}")
        if self.cfg.publish:
            publish(table, self.cfg.tokenizer_preset)  # dd1-default / dd2-default: the default data preset
        outputs.update({"metrics": str(self.root / "metrics.json"), "tables": str(self.root / "paper-table.md"),
                        "side_by_side_grid": str(grid) if grid else None, "report": str(report),
                        "wall_time_s": round(time.time() - t0, 1)})
        ckpt.write_json(self.root / "outputs.json", outputs)
        return outputs

    def run_parallel(self, teacher_dir: Path) -> None:
        """The DD1 and DD2 branches side by side, then every row's evaluation, in ``workers`` processes with
        cpu_count // workers threads each (the models here are small and use several threads poorly). Rows are
        evaluated as soon as what they need is trained. Results land
        in the run directories and ROOT/evals/, which the sequential code path then re-uses."""
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
            if self.cfg.mapkd:  # queued: starts when a branch frees its worker
                branch[ex.submit(_pipeline_task, args, threads, "mapkd")] = "mapkd"
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


def _pipeline_task(args: tuple, threads: int, task: str, rows: tuple = ()):
    """One worker-process task of :meth:`Pipeline.run_parallel`: a training branch ("dd2", "dd1", "mapkd") or the
    evaluation of some rows ("eval")."""
    torch.set_num_threads(threads)
    root, cfg, device, seed, data_root, command = args
    p = Pipeline(root, cfg, device, seed, data_root, command, _worker=True)
    teacher = p.teacher(p.tokenizer())
    if task == "dd2":
        p.dd2_branch(teacher)
    elif task == "dd1":
        p.dd1(teacher)
    elif task == "mapkd":
        p.mapkd(teacher)
    elif task == "eval":
        runs = {k: p.root / d for k, d in RUN_DIRS.items() if ckpt.is_model_dir(p.root / d / "final")}
        samplers = {k: v for k, v in p.samplers(teacher, runs).items() if k in rows}
        missing = set(rows) - set(samplers)
        if missing:
            raise RuntimeError(f"rows {sorted(missing)} have no sampler (runs found: {sorted(runs)})")
        p.evaluate(samplers)
    else:
        raise ValueError(task)


def default_workers(device: str) -> int:
    """2 worker processes on a multi-core CPU (the DD1 and DD2 branches side by side), else 1 (sequential)."""
    return 2 if str(device).startswith("cpu") and (os.cpu_count() or 1) >= 2 else 1
