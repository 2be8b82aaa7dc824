"""Variants of DD2's flow recipe on the shipped Fashion-MNIST teacher: learning rate, divergence, ODE steps, k steps.

    OMP_NUM_THREADS=1 python lab/studies/dd2_flow_variants.py train RUN STEPS [lr=1e-3] [div=forward|reverse]
                             [evals=150,300,600] [batch=64] [ode=32]
    OMP_NUM_THREADS=1 python lab/studies/dd2_flow_variants.py sample RUN/gen-STEP.pt OUT.npz [ode=200] [passes=0]
    onestep eval --images OUT.npz -n 2000 --n-inception 0 --out OUT.json

The generator here is the flow recipe with DD1's input layer: the DD1 generator built from the teacher
(``DD1Generator.from_teacher``: a linear noise projection in place of the token table), read at the teacher's own
next-token rows, so that row i sees the class and eps_<i. The product (``onestep dd2 flow``) uses an MLP input layer
(``FlowHeadGenerator``); both are trained by :func:`onestep.mapkd.train.mapkd_loss`'s loss on the teacher's
conditionals at the generated prefix. ``train`` writes RUN/log.txt (forward KL per position, CPU seconds),
RUN/gen-<step>.pt and RUN/samples-<step>.npz (2000 samples, 200 ODE steps) at the ``evals`` steps; ``sample`` samples
a checkpoint with ``ode`` ODE steps and ``passes`` teacher passes of :func:`onestep.multistep.jacobi`.
The evaluations are in lab/results/dd2-flow-variants/ (lab/dd2-convergence.md, section 7).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from onestep.data import to_uint8
from onestep.flow_map import ODEConfig, ode_map
from onestep.dd1.model import DD1Generator
from onestep.multistep import jacobi
from onestep.paths import assets_dir
from onestep.teacher.load import load_teacher
from onestep.teacher.sampling import SamplingConfig, teacher_log_probs

SAMPLING = SamplingConfig(cfg_scale=2.0)  # the shipped teacher's rule (the bench's)


def logits(gen: DD1Generator, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, n, V): the DD1 generator's hidden states at rows 0..n-1 (row i: class + eps_<i) through the teacher's head."""
    n = eps.shape[1]
    h, _ = gen.hidden(torch.zeros(eps.shape[:2], dtype=torch.long), eps, torch.zeros(eps.shape[:2], dtype=torch.bool),
                      labels)
    return gen.output(gen.norm(h[:, :n]))


@torch.no_grad()
def samples(gen, teacher, tok, out: Path, ode_steps: int = 200, passes: int = 0, n: int = 2000) -> None:
    g = torch.Generator().manual_seed(123)
    imgs, labs = [], []
    for k in range(0, n, 250):
        lab = torch.arange(k, k + 250) % 10
        eps = torch.randn(250, teacher.seq_len, teacher.code_dim, generator=g)
        ode = ODEConfig(n_steps=ode_steps)
        ids = ode_map(eps, torch.log_softmax(logits(gen, eps, lab).float(), -1), teacher.codebook(), ode)
        ids = jacobi(ids, eps, lab, teacher, SAMPLING, passes + 1, ode)
        imgs.append(to_uint8(tok.decode_ids(ids).float()))
        labs.append(lab)
    np.savez(out, images=torch.cat(imgs).numpy(), labels=torch.cat(labs).numpy())


def train(run: Path, steps: int, kv: dict) -> None:
    B, lr = int(kv.get("batch", 64)), float(kv.get("lr", 1e-3))
    ode, div = ODEConfig(n_steps=int(kv.get("ode", 32))), kv.get("div", "forward")
    evals = [int(s) for s in kv.get("evals", str(steps)).split(",")]
    torch.manual_seed(0)
    teacher, _, tok = load_teacher(assets_dir() / "fashion-mnist" / "teacher")
    teacher.requires_grad_(False).eval()
    gen = DD1Generator.from_teacher(teacher)
    opt = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.9, 0.95))
    run.mkdir(parents=True, exist_ok=True)
    log, g, t0 = open(run / "log.txt", "a"), torch.Generator().manual_seed(1), time.process_time()
    for step in range(1, steps + 1):
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        labels = torch.randint(10, (B,), generator=g)
        eps = torch.randn(B, teacher.seq_len, teacher.code_dim, generator=g)
        log_q = torch.log_softmax(logits(gen, eps, labels).float(), -1)
        with torch.no_grad():
            ids = ode_map(eps, log_q.detach(), teacher.codebook(), ode)
            log_p = teacher_log_probs(teacher, ids, labels, SAMPLING).float()
            p = log_p.exp()
        kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
        loss = kl.mean() if div == "forward" else (log_q.exp() * (log_q - log_p.clamp_min(-1e4))).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            print(json.dumps({"step": step, "kl": round(kl.mean().item(), 4), "kl_pos0": round(kl[:, 0].mean().item(), 4),
                              "kl_last": round(kl[:, -8:].mean().item(), 4),
                              "cpu_s": round(time.process_time() - t0, 1)}), file=log, flush=True)
        if step in evals:
            print(json.dumps({"eval": step, "train_cpu_s": round(time.process_time() - t0, 1)}), file=log, flush=True)
            gen.eval()
            samples(gen, teacher, tok, run / f"samples-{step}.npz")
            gen.train()
            torch.save(gen.state_dict(), run / f"gen-{step}.pt")


def main(argv: list[str]) -> None:
    cmd, a, b, kv = argv[0], argv[1], argv[2], dict(x.split("=") for x in argv[3:])
    if cmd == "train":
        train(Path(a), int(b), kv)
    elif cmd == "sample":
        teacher, _, tok = load_teacher(assets_dir() / "fashion-mnist" / "teacher")
        gen = DD1Generator.from_teacher(teacher)
        gen.load_state_dict(torch.load(a, weights_only=True))
        samples(gen.eval(), teacher.eval(), tok, Path(b), int(kv.get("ode", 200)), int(kv.get("passes", 0)))
    else:
        raise SystemExit(f"unknown command {cmd!r}: train or sample")


if __name__ == "__main__":
    main(sys.argv[1:])
