"""A few DDP training steps of the tiny multi-scale VQVAE with forced dead-code restarts (used by test_var.py).

Usage: torchrun --nproc_per_node 2 train_vqvae_ddp.py OUT_DIR
"""
import sys

import torch
import torch.nn.functional as F

from onestep.distributed import cleanup, setup, wrap_ddp
from onestep.tokenizer.msvq import VQVAE, vqvae_config
from onestep.trainer import guarded_step

out = sys.argv[1]
torch.set_num_threads(1)
info = setup("cpu")
torch.manual_seed(0)
model = VQVAE(vqvae_config("var-tiny", restart_below=0.5))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
ddp = wrap_ddp(model, info)
g = torch.Generator().manual_seed(100 + info.rank)  # different data and picks on every rank
restarted = 0.0
for step in range(4):
    x = torch.rand(4, 1, 28, 28, generator=g) * 2 - 1
    rec, ids, losses = ddp(x, g)
    restarted += float(losses["restarted"])
    guarded_step(F.mse_loss(rec, x) + losses["vq"], opt, model.parameters(), 1.0)
torch.save({"state": {k: v.clone() for k, v in model.state_dict().items()}, "restarted": restarted},
           f"{out}/rank{info.rank}.pt")
cleanup(info)
