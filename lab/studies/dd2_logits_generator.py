"""CSD on a tabular teacher with a code-logits generator instead of the MLP head's continuous output.

    python lab/studies/dd2_logits_generator.py --positions 1 --steps 1200                   # straight-through
    python lab/studies/dd2_logits_generator.py --positions 1 --steps 1200 --residual        # + residual psi
    python lab/studies/dd2_logits_generator.py --positions 1 --steps 1200 --mode soft --tau 0.3

The generator reads eps_<i through the tabular causal MLP backbone and eps_i through a 3-layer MLP that returns
logits over the V codes. Its output is either the argmax code in the forward pass with the gradient of the
softmax-expected code (``st``), or the softmax-expected code itself at temperature ``tau`` (``soft``). psi comes from
stage 1 (GTS, as in TabularRunConfig), or is the teacher's closed form plus a zero-initialised residual. Prints one
JSON line; lab/results/dd2-logits-generator.{json,md} collect the single-mixture runs."""
import argparse
import copy, dataclasses, json, math, time
import torch
from torch import nn
from onestep.dd2.csd import DD2, CSDConfig, CSDSchedule
from onestep.dd2.losses import gts_loss
from pathlib import Path
import sys
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: lab.*
from lab.tabular import TabularRunConfig, build_model, generator_tv, CausalMLPBackbone
from onestep.teacher.sampling import SamplingConfig, sample_tokens, teacher_log_probs
from onestep.teacher.tabular import TabularTeacher
from onestep.trainer import make_optimizer


class LogitsGen(nn.Module):
    def __init__(self, teacher, width=64, gain=8.0, head_gain=5.0, tau=1.0, mode="st"):
        super().__init__()
        self.backbone = CausalMLPBackbone(teacher.seq_len, teacher.code_dim, teacher.num_classes, width, gain)
        self.head = nn.Sequential(nn.Linear(width + teacher.code_dim, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                  nn.Linear(128, teacher.vocab_size))
        self.head_gain, self.tau, self.mode = head_gain, tau, mode
        self.register_buffer("cb", teacher.codebook().clone())
        self.generator_t = 1.0

    def generate(self, eps, labels):
        f = self.backbone.features(eps, labels)
        logits = self.head(torch.cat([f, eps * self.head_gain], -1))
        w = torch.softmax(logits / self.tau, -1)
        soft = w @ self.cb
        if self.mode == "soft":
            return soft
        hard = self.cb[logits.argmax(-1)]
        return soft + (hard - soft).detach()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=4); p.add_argument("--positions", type=int, default=1)
    p.add_argument("--code-dim", type=int, default=2); p.add_argument("--tseed", type=int, default=1)
    p.add_argument("--seed", type=int, default=0); p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=2e-3); p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--mode", default="st"); p.add_argument("--residual", action="store_true")
    p.add_argument("--n-eval", type=int, default=200000); p.add_argument("--min-temp", type=float, default=None)
    a = p.parse_args()
    kw = {} if a.min_temp is None else {"min_temp": a.min_temp, "max_temp": a.min_temp}
    teacher = TabularTeacher(a.vocab, a.positions, a.code_dim, seed=a.tseed, **kw)
    cfg = TabularRunConfig(seed=a.seed, n_eval=a.n_eval)
    sampling = SamplingConfig()
    torch.manual_seed(a.seed); g = torch.Generator().manual_seed(a.seed)
    model = build_model(teacher, cfg)
    labels = torch.zeros(cfg.tune_batch, dtype=torch.long); cb = teacher.codebook()
    opt = make_optimizer(torch.optim.Adam, model.parameters(), lr=cfg.tune_lr)
    t0 = time.time()
    for step in range(cfg.tune_steps):
        for gr in opt.param_groups:
            gr["lr"] = cfg.tune_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.tune_steps))
        ids = sample_tokens(teacher, labels, sampling, g)
        log_p = teacher_log_probs(teacher, ids, labels, sampling)
        loss, _ = gts_loss(model, cb[ids], labels, log_p, cb, m=cfg.tune_m, generator=g, t_min=cfg.tune_t_min)
        opt.zero_grad(); loss.backward(); opt.step()
    tune_s = time.time() - t0
    gen = LogitsGen(teacher, tau=a.tau, mode=a.mode)
    csd = CSDConfig(**{**cfg.csd.to_dict(), "steps": a.steps, "lr": a.lr})
    dd2 = DD2(gen, copy.deepcopy(model), teacher, sampling, csd,
              dataclasses.replace(cfg.ablation, guidance_residual=a.residual))
    sched = CSDSchedule(dd2)
    t1 = time.time(); curve = []
    tv0 = generator_tv(dd2.generator, teacher, 20000, a.seed + 1)
    for step in range(csd.total_steps):
        sched.step(step, lambda n: torch.zeros(n, dtype=torch.long), g)
        if (step + 1) % max(1, csd.total_steps // 6) == 0:
            curve.append((step + 1, round(generator_tv(dd2.generator, teacher, 20000, a.seed + 1), 4),
                          round(generator_tv(sched.ema, teacher, 20000, a.seed + 1), 4)))
    csd_s = time.time() - t1
    ids = sample_tokens(teacher, torch.zeros(a.n_eval, dtype=torch.long), sampling, torch.Generator().manual_seed(a.seed + 7))
    from lab.tabular import tv_of_ids
    out = {"args": vars(a), "tv_start": tv0, "curve": curve,
           "tv_raw": generator_tv(dd2.generator, teacher, a.n_eval, a.seed + 1),
           "tv_ema": generator_tv(sched.ema, teacher, a.n_eval, a.seed + 1),
           "floor": tv_of_ids(teacher, ids), "tune_s": round(tune_s, 1), "csd_s": round(csd_s, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
