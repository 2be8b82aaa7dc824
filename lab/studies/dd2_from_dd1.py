"""CSD started from a trained DD1 generator on the image teacher.

    python lab/studies/dd2_from_dd1.py --dd1 runs/exp/dd1-s300 --out runs/exp/dd1csd-s300-a --steps 60 --warmup 20 \
        --batch 32 --lr 3e-5 --glr 1e-3 --K 5
    onestep eval --run runs/exp/dd1csd-s300-a --method dd1 -n 2000 --n-inception 0 --out runs/exp/dd1csd-s300-a.json

The generator is the DD1 generator (teacher-initialised transformer, logits head). Its output for CSD is the argmax
code in the forward pass with the gradient of the softmax-expected code (``--mode st``), or the softmax-expected code
at temperature ``--tau`` (``--mode soft``). psi is the teacher's closed-form denoiser plus a zero-initialised
residual head on a copy of the teacher's backbone. Prefix conditions are snapped to codes, which the table-input
teacher reads as ids, so neither stage 0 nor stage 1 is needed. OUT/final is written as a DD1 run (the same
architecture), so that ``onestep eval --method dd1`` scores it by its argmax codes."""
import argparse, copy, json, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: lab.*
import torch
from torch import nn
from onestep import checkpoint as ckpt
from onestep.dd1.stages import load_dd1
from onestep.dd1.model import clean_mask
from lab.csd_variants import CSDAblation, VariantDD2
from onestep.dd2.csd import CSDConfig, CSDSchedule
from onestep.dd2.model import ARDiffusion, MLPHead
from onestep.teacher.sampling import SamplingConfig
from tqdm import tqdm


class LogitsGenerator(nn.Module):
    def __init__(self, dd1, tau=1.0, mode="st"):
        super().__init__()
        self.dd1, self.tau, self.mode = dd1, tau, mode
        self.generator_t = 1.0

    def generate(self, eps, labels):
        B, n, _ = eps.shape
        ids = torch.zeros(B, n, dtype=torch.long, device=eps.device)
        logits = self.dd1(ids, eps, clean_mask(torch.zeros(B, dtype=torch.long, device=eps.device), n), labels)
        cb = self.dd1.codebook_VC
        w = torch.softmax(logits.float() / self.tau, -1)
        soft = w @ cb
        if self.mode == "soft":
            return soft
        hard = cb[logits.argmax(-1)]
        return soft + (hard - soft).detach()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dd1", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--glr", type=float, default=1e-3)
    p.add_argument("--K", type=int, default=5)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--mode", default="st")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    model, config, teacher, tok = load_dd1(a.dd1)
    sampling = SamplingConfig(**config["sampling"])
    gen = LogitsGenerator(copy.deepcopy(model).train(), a.tau, a.mode)
    backbone = copy.deepcopy(teacher)
    head = MLPHead(teacher.code_dim, teacher.feature_dim)
    psi = ARDiffusion(backbone, head).train()
    cfg = CSDConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, guidance_lr=a.glr, guidance_steps=a.K, m_noise=2,
                    warmup_steps=min(10, a.steps // 4), lr_schedule="cosine", guidance_warmup=a.warmup,
                    condition_on_codes=True, seed=a.seed)
    dd2 = VariantDD2(gen, psi, teacher, sampling, cfg, CSDAblation(guidance_residual=True))
    gen.requires_grad_(True); psi.requires_grad_(True)
    sched = CSDSchedule(dd2)
    g = torch.Generator().manual_seed(a.seed)
    lab = lambda n: torch.randint(teacher.num_classes, (n,), generator=g)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    log = open(out / "log.jsonl", "a")
    for step in tqdm(range(cfg.total_steps), desc="csd-from-dd1"):
        lg = sched.step(step, lab, g)
        if step % 10 == 0 or step == cfg.total_steps - 1:
            log.write(json.dumps({"step": step, **{k: (float(v) if torch.is_tensor(v) else v) for k, v in lg.items()}}) + "\n"); log.flush()
    cpu = time.process_time() - c0
    for name, m in (("final", sched.ema.dd1), ("raw", gen.dd1)):
        d = out / name
        ckpt.save_model(d, m.eval(), {**config, "csd_from_dd1": vars(a), "csd_cpu_s": cpu})
    # the DD1 config's relative teacher ref is relative to final/: keep the depth the same as the source run
    print(json.dumps({"cpu_s": cpu, "wall_s": time.time() - t0}))


if __name__ == "__main__":
    main()
