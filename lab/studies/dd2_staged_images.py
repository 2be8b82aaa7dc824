"""The flow recipe's generator in two stages on images: does a learnt guess of the earlier tokens beat the marginal's?

    OMP_NUM_THREADS=1 python lab/studies/dd2_staged_images.py RUN_DIR [--split 3] [--steps 600]
        # -> RUN_DIR/{generator.safetensors, train.json}, lab/results/dd2-staged-images.{json,md}

On the tabular ladder the generator's excess TV is all in telling which tokens its own prefix holds
(``dd2_prefix_oracle.py``), and a second stage that reads the codes DD1's map gives under a first stage's logits
halves it (``dd2_flow_ladder.py``, part ``staged``). This is the image analogue, built on the shipped teacher with
the prefix-code generator (``FlowHeadGenerator`` with ``prefix_codes``) split after ``--split`` of its layers: the
first layers give logits l^A through a head of their own (a copy of the teacher's norm and head); the codes DD1's map
gives eps_j under softmax(l^A_j) enter the later layers' rows j + 1 (a zero-initialised code table); the last layer's
head gives l. The same network, one more head and one more ODE map than prefix codes. Trained like the ``small``
flow preset (600 steps of batch 64, Adam at LR 1e-3 with a 20-step warm-up and a cosine to 0, clip 1), on the forward
KL of both l and l^A to the teacher's conditionals at the generated tokens. Evaluated like ``onestep eval -n 2000
--n-inception 0`` (the same labels and noise streams).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _common: provenance, write_results
from _common import provenance, write_results  # noqa: E402

from onestep import rng  # noqa: E402
from onestep.flow_map import ode_map  # noqa: E402
from onestep.mapkd.generator import MapKDGenerator as FlowHeadGenerator  # noqa: E402
from onestep.mapkd.train import MapKDConfig as FlowConfig  # noqa: E402
from onestep.mapkd.sampling import mapkd_sampler  # noqa: E402
from onestep.eval.evaluate import Evaluator  # noqa: E402
from onestep.samplers import class_labels, generate  # noqa: E402
from onestep.teacher.load import load_teacher  # noqa: E402
from onestep.teacher.sampling import SamplingConfig, teacher_log_probs  # noqa: E402
from onestep.trainer import guarded_step, set_lr, warmup_cosine  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
TEACHER = str(Path(__file__).resolve().parents[2] / "assets" / "fashion-mnist" / "teacher")


class StagedFlowHead(FlowHeadGenerator):
    """Prefix codes, then a second guess of the prefix from the first ``SPLIT`` layers' own logits."""

    SPLIT = 3

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.norm_a, self.head_a = copy.deepcopy(self.net.norm), copy.deepcopy(self.net.output)
        self.code_embed_a = torch.nn.Embedding(*self.code_embed.weight.shape)
        torch.nn.init.zeros_(self.code_embed_a.weight)
        self.log_q_a = None

    @staticmethod
    def _shifted(emb: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(emb[:, :1]), emb[:, :-1]], 1)  # row i's input row holds position i - 1

    def log_probs(self, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        net, cb = self.net, self.codebook()
        with torch.no_grad():
            codes = ode_map(eps, self.prior[labels].clamp_min(1e-12).log(), cb, self.prefix_ode)
        h = torch.cat([net.cls_embedding(labels)[:, None], net.embed_tokens(eps[:, :-1])], 1)
        h = h + self._shifted(self.code_embed(codes)).to(h.dtype)
        rope = net.rope[: h.shape[1]]
        for layer in net.layers[:self.SPLIT]:
            h = layer(h, rope)
        self.log_q_a = torch.log_softmax(self.head_a(self.norm_a(h)).float(), -1)
        with torch.no_grad():
            codes_a = ode_map(eps, self.log_q_a.detach(), cb, self.prefix_ode)
        h = h + self._shifted(self.code_embed_a(codes_a)).to(h.dtype)
        for layer in net.layers[self.SPLIT:]:
            h = layer(h, rope)
        log_q = torch.log_softmax(net.head(net.norm(h)).float(), -1)
        if self.training:
            self._update_prior(log_q.detach().exp(), labels)
        return log_q


def kl_to(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1).mean()


def train(run: Path, steps: int, cfg: FlowConfig = FlowConfig()) -> None:
    teacher, _, _ = load_teacher(TEACHER, "cpu", with_tokenizer=False)
    teacher.requires_grad_(False).eval()
    sampling = SamplingConfig(cfg_scale=2.0)
    gen = StagedFlowHead.from_teacher(teacher, cfg.ode(teacher.codebook()), prefix_codes=True)
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    g, t0, logs = torch.Generator().manual_seed(cfg.seed), time.process_time(), []
    for step in range(steps):
        gen.train()
        set_lr(opt, warmup_cosine(step, steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio))
        labels = torch.randint(teacher.num_classes, (cfg.batch_size,), generator=g)
        eps = rng.randn((cfg.batch_size, *gen.noise_shape), g)
        log_q = gen(eps, labels)
        with torch.no_grad():
            ids = ode_map(eps, log_q.detach(), gen.codebook(), gen.ode)
            log_p = teacher_log_probs(teacher, ids, labels, sampling).float()
        kl, kl_a = kl_to(log_p, log_q), kl_to(log_p, gen.log_q_a)
        guarded_step(kl + kl_a, opt, gen.parameters(), cfg.grad_clip)
        if step % 50 == 0 or step == steps - 1:
            logs.append({"step": step, "kl": round(kl.item(), 4), "kl_a": round(kl_a.item(), 4)})
            print(logs[-1], flush=True)
    state = {k: v.contiguous() for k, v in gen.state_dict().items()}
    save_file(state, str(run / "generator.safetensors"))
    (run / "train.json").write_text(json.dumps({"steps": steps, "split": StagedFlowHead.SPLIT,
                                                "cpu_s": round(time.process_time() - t0, 1), "log": logs}, indent=1))


def evaluate(run: Path, n: int = 2000) -> dict:
    teacher, tconf, tokenizer = load_teacher(TEACHER, "cpu")
    gen = StagedFlowHead.from_teacher(teacher, FlowConfig().ode(teacher.codebook()), prefix_codes=True)
    gen.load_state_dict(load_file(str(run / "generator.safetensors")))
    sampler = mapkd_sampler(gen.eval(), teacher, tokenizer, SamplingConfig(cfg_scale=2.0), 1, name="dd2-staged-1step")
    out = generate(sampler, class_labels(n, teacher.num_classes), seed=0)
    res = Evaluator("fashion-mnist").evaluate(out["images"], out["labels"], n_inception=0)
    trained = json.loads((run / "train.json").read_text())
    row = {"run": str(run), "split": trained["split"], "steps": trained["steps"], "train_cpu_s": trained["cpu_s"], **res}
    result = {**provenance(), "rows": [row], "train_log": trained["log"]}
    write_results(RESULTS / "dd2-staged-images", result, "The flow generator in two stages on Fashion-MNIST")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--split", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    a = ap.parse_args()
    torch.set_num_threads(1)
    StagedFlowHead.SPLIT = a.split
    a.run.mkdir(parents=True, exist_ok=True)
    if not (a.run / "generator.safetensors").exists():
        train(a.run, a.steps)
    print(evaluate(a.run), flush=True)


if __name__ == "__main__":
    main()
