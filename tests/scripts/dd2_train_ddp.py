"""DD2 stage 2 (CSD) on the tiny preset under torchrun (used by tests/test_cli.py's DDP test).

Usage: torchrun --nproc_per_node 2 dd2_train_ddp.py TUNE_DIR RUN_DIR
Each rank saves its generator, guidance network and EMA to RUN_DIR/rank{R}.pt, so the test can check that the ranks
stayed in lock-step (DDP all-reduces the gradients of both turns).
"""
import sys
from dataclasses import replace

import torch

from onestep.distributed import cleanup, setup
from onestep.dd2.train import TRAIN_PRESETS, train

tune_dir, run_dir = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
info = setup("cpu")
cfg = replace(TRAIN_PRESETS["tiny"], steps=3, guidance_steps=2, align_at=2, align_steps=1)
captured = {}
import onestep.dd2.train as t

orig = t.CSDSchedule


class Capture(orig):
    def __init__(self, dd2, wrapped=None):
        super().__init__(dd2, wrapped)
        captured["dd2"], captured["sched"] = dd2, self


t.CSDSchedule = Capture
train(run_dir, tune_dir, cfg, info)
dd2, sched = captured["dd2"], captured["sched"]
torch.save({"generator": dd2.generator.state_dict(), "guidance": dd2.guidance.state_dict(),
            "ema": sched.ema.state_dict(), "world_size": info.world_size}, f"{run_dir}/rank{info.rank}.pt")
cleanup(info)
