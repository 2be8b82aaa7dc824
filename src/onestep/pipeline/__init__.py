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

The package: :mod:`~onestep.pipeline.config` (PipelineConfig, the presets, each stage's training config),
:mod:`~onestep.pipeline.run` (the Pipeline: stages, the run, the two-worker schedule), :mod:`~onestep.pipeline.rows`
(samplers, evaluation rows, speed, PPL, the side-by-side grid), :mod:`~onestep.pipeline.tables` (cost,
metrics.json, paper-table.md, publishing).
"""
from onestep.pipeline.config import PIPELINE_PRESETS, PipelineConfig, stage_config
from onestep.pipeline.rows import EVAL_NOISE
from onestep.pipeline.run import RUN_DIRS, Pipeline, default_workers
from onestep.pipeline.tables import TABLE1, branch_prefix_s, publish, write_tables_md

__all__ = ["PIPELINE_PRESETS", "PipelineConfig", "stage_config", "EVAL_NOISE", "RUN_DIRS", "Pipeline",
           "default_workers", "TABLE1", "branch_prefix_s", "publish", "write_tables_md"]
