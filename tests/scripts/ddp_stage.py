"""One distillation stage on its tiny preset under torchrun (used by tests/test_cli.py's DDP test).

Usage: torchrun --nproc_per_node 2 ddp_stage.py STAGE RUN_DIR INPUT...
  dd2-tune   RUN_DIR ADAPT_DIR           stage 1 (GTS) from a stage-0 teacher
  dd2-train  RUN_DIR TUNE_DIR            stage 2 (CSD, with a performance-alignment phase)
  dd1-train  RUN_DIR PAIRS_DIR TEACHER   DD1 on its pairs
After training, every rank saves the state_dicts of the loop's modules to RUN_DIR/rank{R}.pt, so the test can check
that the ranks stayed in lock-step (DDP all-reduces the gradients).
"""
import sys
from dataclasses import replace

import torch

from onestep import trainer
from onestep.distributed import cleanup, setup

stage, run_dir, inputs = sys.argv[1], sys.argv[2], sys.argv[3:]
torch.set_num_threads(1)
info = setup("cpu")
run = trainer.TrainLoop.run


def run_and_dump(self, *a, **k):
    out = run(self, *a, **k)
    torch.save({"modules": {n: m.state_dict() for n, m in self.modules.items()}, "world_size": info.world_size,
                "step": self.step}, f"{run_dir}/rank{info.rank}.pt")
    return out


trainer.TrainLoop.run = run_and_dump
if stage == "dd2-tune":
    from onestep.dd2.tune import TUNE_PRESETS, tune
    from onestep.teacher.sampling import SamplingConfig

    tune(run_dir, inputs[0], TUNE_PRESETS["tiny"], SamplingConfig(), info)
elif stage == "dd2-train":
    from onestep.dd2.train import TRAIN_PRESETS, train

    train(run_dir, inputs[0], replace(TRAIN_PRESETS["tiny"], steps=3, guidance_steps=2, align_at=2, align_steps=1), info)
elif stage == "dd1-train":
    from onestep.dd1.stages import DD1_PRESETS, train_dd1

    train_dd1(run_dir, inputs[0], inputs[1], replace(DD1_PRESETS["tiny"], steps=4), info)
else:
    raise SystemExit(f"unknown stage {stage}")
cleanup(info)
