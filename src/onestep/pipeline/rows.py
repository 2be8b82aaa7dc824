"""What a pipeline scores: every method of the tables as a sampler, one quality row per method (cached in
``ROOT/evals/<method>.json``, the same labels and seeds for every method), the data floor, speed side by side, the
perceptual path length (Table 5) and the side-by-side grid."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from onestep import checkpoint as ckpt
from onestep.dd1.baselines import baseline_samplers, skip_counts
from onestep.dd1.load import load_dd1
from onestep.dd1.sampling import dd1_samplers, one_step
from onestep.dd2.sampling import ardiffusion_sampler, dd2_sampler, load_dd2
from onestep.dd2.tune import load_ardiffusion
from onestep.eval import report
from onestep.eval.evaluate import Evaluator
from onestep.eval.metrics import perceptual_path_length
from onestep.eval.speed import measure
from onestep.mapkd.sampling import load_mapkd, mapkd_sampler
from onestep.paths import assets_dir
from onestep.runs import class_names, tokenizer_image_shape
from onestep.samplers import class_labels, generate, teacher_sampler
from onestep.teacher.base import nearest_code
from onestep.teacher.load import load_teacher

# the evaluation noise rule of samplers.generate; rows cached under another rule are re-evaluated (before it, batch b
# drew from seed b, DD1's training noise for seed 0)
EVAL_NOISE = "stream_seed/1"


class Rows:
    """The scoring half of :class:`~onestep.pipeline.run.Pipeline` (which sets ``root``, ``cfg``, ``device``,
    ``seed`` and ``data_root``)."""

    def teacher_facts(self, teacher_dir: Path) -> dict:
        """What the rows and grids follow from the teacher and its tokenizer: ``num_classes``, ``ar_steps`` (K, which
        names the skip-n rows), ``image_shape`` (C, H, W) and ``class_names`` (None when the tokenizer records none)."""
        if getattr(self, "_facts", None) is None:
            teacher, _, tok = load_teacher(teacher_dir, "cpu")
            self._facts = {"num_classes": int(teacher.num_classes), "ar_steps": len(teacher.ar_steps()),
                           "image_shape": tokenizer_image_shape(tok), "class_names": class_names(teacher_dir)}
        return self._facts

    def grid_columns(self) -> int:
        return report.grid_columns(self.cfg.n_grid, self._facts["num_classes"])

    def samplers(self, teacher_dir: Path, runs: dict[str, Path]) -> dict:
        """Every row of :meth:`row_plan` whose runs are there, as a :class:`~onestep.samplers.Sampler` keyed by row name,
        in the plan's order (a sampler built for a row the plan does not list is an error)."""
        self.teacher_facts(teacher_dir)
        teacher, _, tok = load_teacher(teacher_dir, self.device)
        sampling = self.cfg.sampling()
        out = {"teacher": teacher_sampler(teacher, tok, sampling)}
        if "dd2_tune" in runs:  # the baselines' marginals come from the stage-1 pool of teacher samples
            out.update(baseline_samplers(teacher_dir, self.device, sampling, self.teacher_tokens(runs)))
        if "dd1" in runs:
            out.update(dd1_samplers(runs["dd1"], self.device, sampling))
        if "dd2_adapt" in runs:  # stage 0's continuous-input teacher, sampled like the teacher (FID after stage 0)
            adapted, _, _ = load_teacher(runs["dd2_adapt"], self.device, with_tokenizer=False)
            out["teacher-stage0"] = teacher_sampler(adapted, tok, sampling, name="teacher-stage0")
        if "mapkd" in runs:  # MapKD: one pass + the ODE map, then k - 1 Jacobi teacher passes
            gen, mapkd_teacher, _, samp = load_mapkd(runs["mapkd"], self.device)
            for k in (1, *self.cfg.mapkd_multi):
                smp = mapkd_sampler(gen, mapkd_teacher, tok, samp, k, "jacobi")
                out[smp.name] = smp
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
                        smp = dd2_sampler(gen, dd2_teacher, tok, samp, k, multistep="alg4")
                        out[smp.name] = smp
        shipped = self.shipped_dd2()
        if shipped is not None:  # the shipped DD2 generator, beside the run's own short CSD
            gen, dd2_teacher, _, samp = load_dd2(shipped, self.device)
            out["dd2-1step-shipped"] = dd2_sampler(gen, dd2_teacher, tok, samp, 1, name="dd2-1step-shipped")
        planned = [name for name, _ in self.row_plan(teacher_dir)]
        unplanned = sorted(set(out) - set(planned))
        if unplanned:
            raise RuntimeError(f"samplers built for rows that row_plan does not list: {unplanned}")
        return {name: out[name] for name in planned if name in out}

    def shipped_dd2(self) -> Path | None:
        """The shipped DD2 generator when the config asks for its row and the run uses the shipped teacher."""
        path = assets_dir() / "fashion-mnist" / "dd2"
        ok = self.cfg.shipped_dd2 and self.cfg.use_assets and self.cfg.data == "fashion-mnist"
        return path if ok and (path / "final" / "config.json").exists() else None

    def teacher_tokens(self, runs: dict[str, Path]) -> torch.Tensor:
        """Teacher token samples (ids, labels) for the onestep* marginals: the stage-1 pool (same sampling rule)."""
        with np.load(runs["dd2_tune"] / "pool.npz") as f:
            return torch.from_numpy(f["ids"]).long(), torch.from_numpy(f["labels"]).long()

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluator(self):
        if not hasattr(self, "_ev"):
            self._ev = Evaluator(self.cfg.data, self.data_root, self.device, n_ref_classifier=self.cfg.n_ref_classifier,
                                 n_ref_inception=self.cfg.n_ref_inception)
        return self._ev

    def evaluate(self, samplers: dict) -> list[dict]:
        """Quality rows, one per sampler, cached in ROOT/evals/<method>.json (same labels and seeds for all)."""
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
            grid = report.save_grid(out["images"][: self.cfg.n_grid], self.root / "grids" / f"{name}.png",
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
        if "mapkd" in runs:  # MapKD's tokens are codes: its one map is the quantised one
            mapkd_gen = load_mapkd(runs["mapkd"], self.device)[0]
            with torch.no_grad():
                out["mapkd_quantised"] = perceptual_path_length(
                    lambda z, y: tok.decode_ids(mapkd_gen.sample_ids(z, y)), shape, labels, clf.features)
        out["note"] = ("quantised: decoded nearest codes (piecewise constant in the noise: the mean is set by the rare "
                       "pairs that cross a code boundary); continuous: DD2's output vectors / DD1's softmax-expected "
                       "code vectors (smooth)")
        ckpt.write_json(path, out)
        return out

    def data_floor(self, ev) -> dict:
        """The data floor on as many test images as the rows have samples: ``fid_classifier`` on ``n_eval``, and
        ``fid_classifier_<n>`` on the headline column's n (FID's bias depends on the sample size)."""
        f = ev.data_floor(n_inception=self.cfg.n_inception_floor, n_test=self.cfg.n_eval)
        floor = {"n": f["n"], **{k: f[k] for k in ("fid_classifier", "fid_inception", "n_inception") if k in f}}
        if self.cfg.n_eval_headline > self.cfg.n_eval:
            h = ev.data_floor(n_inception=0, n_test=self.cfg.n_eval_headline)
            floor[f"fid_classifier_{h['n']}"] = h["fid_classifier"]
        return floor

    def row_plan(self, teacher_dir: Path) -> list[tuple[str, str]]:
        """The table's rows, in the one list both :meth:`row_names` and :meth:`samplers` read: (row, group), the group
        being what the row needs trained (the teacher alone, DD1, DD2's stages, MapKD; the baselines are DD2's:
        onestep*'s marginals come from the stage-1 pool), most expensive first within a group. The skip-n rows follow
        the teacher's AR step count (:func:`~onestep.dd1.baselines.skip_counts`)."""
        skips = [f"skip-{n}" for n in skip_counts(self.teacher_facts(teacher_dir)["ar_steps"])]
        plan = [("teacher", "teacher")] + ([("dd2-1step-shipped", "teacher")] if self.shipped_dd2() is not None else [])
        plan += [(n, "dd1") for n in ("dd1-teacher-involved", "dd1-2step", "dd1-1step")]
        dd2 = [f"dd2-alg4-{k}step" for k in sorted(self.cfg.dd2_multi, reverse=True)]
        dd2 += ["dd2-stage1-euler10", "teacher-stage0", *skips, "dd2-1step", "dd2-1step-continuous", "onestep*"]
        plan += [(n, "dd2") for n in dd2 + (["dd2-1step-align"] if self.cfg.align else [])]
        if self.cfg.mapkd:
            plan += [(f"mapkd-jacobi-{k}step", "mapkd") for k in sorted(self.cfg.mapkd_multi, reverse=True)]
            plan.append(("mapkd-1step", "mapkd"))
        return plan

    def row_names(self, teacher_dir: Path) -> dict[str, list[str]]:
        """:meth:`row_plan` by group."""
        out: dict[str, list[str]] = {"teacher": [], "dd1": [], "dd2": [], "mapkd": []}
        for name, group in self.row_plan(teacher_dir):
            out[group].append(name)
        return out

    def side_by_side(self, methods: list[str]) -> Path | None:
        """One PNG: for each method a block of its first two grid rows (and the class captions), stacked vertically
        with labels."""
        # matplotlib (slow, its backend set before pyplot loads) and Pillow (optional): imported when the grid is drawn
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image

        have = [m for m in methods if (self.root / "grids" / f"{m}.png").exists()]
        if not have:
            return None
        _, H, W = self._facts["image_shape"]
        lay = report.grid_layout(self.cfg.n_grid, H, W, self.grid_columns(),
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
