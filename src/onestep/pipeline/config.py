"""The pipeline's configuration: :class:`PipelineConfig`, its presets (``quick`` for ``onestep demo``, ``full`` for
``onestep bench``, ``tiny`` for the tests) and, in one place, the training config each stage derives from its
command's preset (:func:`stage_config`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from onestep.dd1.stages import DD1_PRESETS
from onestep.dd2.adapt import ADAPT_PRESETS
from onestep.dd2.train import TRAIN_PRESETS
from onestep.dd2.tune import TUNE_PRESETS
from onestep.mapkd.train import MAPKD_PRESETS
from onestep.teacher.sampling import SamplingConfig
from onestep.teacher.train import TEACHER_TRAIN_PRESETS
from onestep.tokenizer.train import VQ_TRAIN_PRESETS

# What a stage given a step count of its own (``*_steps``) derives from it, beside the step count:
SHORT_ADAPT_BATCH = 64  # stage 0: its batch size at most this
SHORT_PHASE_DIVISOR = 4  # stage 1's head-only steps, stage 2's and DD1's warm-up: at most steps // this
# the Inception reference: at least this many train images, more when a row's Inception FID scores more samples
MIN_INCEPTION_REFERENCE = 2000


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
    shipped_dd2: bool = False   # also the row dd2-1step-shipped: the shipped DD2 generator (assets/fashion-mnist/dd2),
                                # where the run's own CSD budget is too small for recognisable samples
    mapkd: bool = True          # also MapKD (onestep mapkd train): rows mapkd-1step, mapkd-jacobi-<k>step
    mapkd_preset: str = "small"
    mapkd_steps: int | None = None
    mapkd_multi: tuple = (2, 3)
    # evaluation
    n_grid: int = 50
    n_eval: int = 1000        # samples per method scored with the classifier features (every row)
    headline_methods: tuple = ("teacher", "dd1-1step", "dd1-2step", "dd1-teacher-involved", "dd2-1step",
                               "dd2-alg4-2step", "dd2-alg4-3step", "dd2-alg4-4step", "mapkd-1step",
                               "mapkd-jacobi-2step", "mapkd-jacobi-3step")  # these rows also get ...
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
        return SamplingConfig(cfg_scale=self.cfg_scale, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    @property
    def n_ref_inception(self) -> int:
        """Train images in the Inception reference (:data:`MIN_INCEPTION_REFERENCE` at least)."""
        return max(self.n_inception, MIN_INCEPTION_REFERENCE)


PIPELINE_PRESETS = {
    # the README's main command: every stage at a small budget (<= 20 min on 2 cores); CSD with K = 5 guidance
    # updates per generator step (the small preset): 40 + 12 steps cost what 60 + 20 did at K = 3
    "quick": PipelineConfig(name="quick", adapt_steps=40, adapt_max_items=10000, tune_steps=150, tune_pool=2048,
                            train_steps=40, align_steps=12, dd1_pairs=2048, dd1_steps=150, mapkd_steps=150, n_eval=1000,
                            shipped_dd2=True,
                            speed_repeats=3, n_ppl=100),
    # `onestep bench`: the figures of benchmarks/results (stage budgets of the commands' "small" presets)
    # the evaluation protocol of the DD1 / DD2 rows and the teacher: classifier FID on 10k samples, Inception FID on
    # 2k (Inception-v3 on a 2-core CPU costs ~0.12 s per image at 2 threads)
    "full": PipelineConfig(name="full", n_eval=2000, n_eval_headline=10000, n_inception=2000, publish=True),
    "tiny": PipelineConfig(name="tiny", tokenizer_preset="tiny", teacher_preset="tiny", use_assets=False, n_grid=10,
                           n_eval=100, n_ref_classifier=1000, adapt_preset="tiny", adapt_steps=2, tune_preset="tiny",
                           tune_steps=None, train_preset="tiny", train_steps=None, align_steps=1, dd1_preset="tiny",
                           dd2_multi=(2,), mapkd_preset="tiny", mapkd_multi=(2,), n_ppl=8, speed_repeats=1),
}



def _shortened(stage_cfg, steps: int, phase: str):
    """``stage_cfg`` at ``steps`` steps, its ``phase`` (a count of steps) at most ``steps // SHORT_PHASE_DIVISOR``."""
    return replace(stage_cfg, steps=steps, **{phase: min(getattr(stage_cfg, phase), steps // SHORT_PHASE_DIVISOR)})


def stage_config(cfg: PipelineConfig, stage: str, seed: int):
    """The training config of ``stage`` (tokenizer, teacher, dd2_adapt, dd2_tune, dd2_train, mapkd, dd1): the preset of its
    command that ``cfg`` names, with the pipeline's ``seed`` and, where ``cfg`` sets them, its step counts (and for
    stage 1 its pool, stage 0 its image count, DD1 its pair count). A stage given a step count also shortens what is
    counted in steps (:data:`SHORT_PHASE_DIVISOR`) and stage 0 its batch (:data:`SHORT_ADAPT_BATCH`)."""
    if stage == "tokenizer":
        out = replace(VQ_TRAIN_PRESETS[cfg.tokenizer_preset], seed=seed)
        return replace(out, steps=cfg.tokenizer_steps) if cfg.tokenizer_steps else out
    if stage == "teacher":
        out = replace(TEACHER_TRAIN_PRESETS[cfg.teacher_preset], seed=seed)
        return replace(out, steps=cfg.teacher_steps) if cfg.teacher_steps else out
    if stage == "dd2_adapt":
        out = replace(ADAPT_PRESETS[cfg.adapt_preset], seed=seed)
        if cfg.adapt_steps:
            out = replace(out, steps=cfg.adapt_steps, batch_size=min(out.batch_size, SHORT_ADAPT_BATCH))
        return replace(out, max_items=cfg.adapt_max_items) if cfg.adapt_max_items else out
    if stage == "dd2_tune":
        out = replace(TUNE_PRESETS[cfg.tune_preset], seed=seed)
        if cfg.tune_steps:
            out = _shortened(out, cfg.tune_steps, "head_only_steps")
        return replace(out, n_pool=cfg.tune_pool) if cfg.tune_pool else out
    if stage == "dd2_train":
        out = replace(TRAIN_PRESETS[cfg.train_preset], seed=seed)
        return _shortened(out, cfg.train_steps, "warmup_steps") if cfg.train_steps else out
    if stage == "mapkd":
        out = replace(MAPKD_PRESETS[cfg.mapkd_preset], seed=seed)
        return _shortened(out, cfg.mapkd_steps, "warmup_steps") if cfg.mapkd_steps else out
    if stage == "dd1":
        out = replace(DD1_PRESETS[cfg.dd1_preset], seed=seed)
        if cfg.dd1_pairs:
            out = replace(out, n_pairs=cfg.dd1_pairs)
        return _shortened(out, cfg.dd1_steps, "warmup_steps") if cfg.dd1_steps else out
    raise ValueError(f"no stage {stage!r}")


def alignment_step(cfg: PipelineConfig, train_cfg) -> int:
    """The generator step of the performance alignment: ``align_at_frac`` of stage 2's steps (step 1 at least)."""
    return max(1, int(train_cfg.steps * cfg.align_at_frac))
