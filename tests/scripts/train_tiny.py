"""Tiny teacher training on synthetic tokens through the shared TrainLoop (used by test_trainer.py).

Usage: python train_tiny.py RUN_DIR STEPS CKPT_EVERY [SLEEP_S [STOP_AT]]   (also under torchrun for the DDP tests)

STOP_AT > 0: exit (code 3) when step STOP_AT begins, after the checkpoint of the step before it: an interruption.
Each rank appends one draw of the loop's generator per step to RUN_DIR/draws_rank{R}.txt (its RNG stream).
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from onestep.distributed import cleanup, setup, wrap_ddp
from onestep.teacher.llamagen import GPT, model_args
from onestep.trainer import BatchSchedule, LoopConfig, TrainLoop, guarded_step, prepare_run_dir

run_dir, steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sleep = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
stop_at = int(sys.argv[5]) if len(sys.argv) > 5 else 0
torch.set_num_threads(1)
info = setup("cpu")
torch.manual_seed(0)
model = GPT(model_args("tiny"))
data_g = torch.Generator().manual_seed(123)
ids = torch.randint(16, (256, 16), generator=data_g)
labels = torch.randint(10, (256,), generator=data_g)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
ddp = wrap_ddp(model, info)
cfg = {"kind": "test", "steps": steps}
prepare_run_dir(run_dir, cfg, info)
loop = TrainLoop(run_dir, LoopConfig(steps, 16, seed=0, log_every=1, ckpt_every=every), {"model": model},
                 {"model": opt}, {"model": cfg}, info, desc="tiny")
sched = BatchSchedule(len(ids), 16, 0, info)


def step_fn(step):
    if stop_at and step == stop_at:
        sys.exit(3)
    Path(run_dir).mkdir(parents=True, exist_ok=True)  # rank 1 may get here before rank 0 has made the run dir
    with open(f"{run_dir}/draws_rank{info.rank}.txt", "a") as f:
        f.write(f"{step} {torch.rand((), generator=loop.generator).item():.9f} {torch.rand(()).item():.9f}\n")
    model.train()
    idx = sched.indices(step)
    x, y = ids[idx], model.drop_labels(labels[idx], loop.generator)
    loss = F.cross_entropy(ddp(x, y).reshape(-1, 16), x.reshape(-1))
    ok = guarded_step(loss, opt, model.parameters(), 1.0)
    if sleep:
        time.sleep(sleep)
    return {"loss": loss.item(), "nonfinite": not ok}


loop.run(step_fn)
if info.is_main:
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{run_dir}/final_rank0.pt")
if info.enabled:
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{run_dir}/final_rank{info.rank}.pt")
cleanup(info)
