"""DD1 (method.md section 2): the noise-to-token flow map, pairs, generator, training, sampling, baselines.

Statistical tests use fixed seeds and a chi-square p-value threshold of 1e-3 (a correct map gives a
uniform p-value, so a fresh seed would fail with probability 1e-3 per test); bins with zero teacher
probability must get exactly zero count.
"""
import json

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from onestep.dd1 import baselines, pairs, sampling
from onestep.dd1.flow_map import ODEConfig, map_noise_to_tokens, ode_map, time_grid
from onestep.dd1.model import DD1Generator, clean_mask
from onestep.dd1.train import TrajectoryConfig, TrajectorySampler, dd1_loss, fit
from onestep.teacher.sampling import SamplingConfig, sample_tokens, teacher_log_probs
from onestep.teacher.tabular import TabularTeacher, empirical_joint, total_variation

P_MIN = 1e-3
N_DRAWS = 20_000


def _codebook(V, C, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(V, C, generator=g), dim=-1)


def _probs(name, V, seed):
    rng = np.random.default_rng(seed)
    if name == "dirichlet":
        p = rng.dirichlet(np.ones(V))
    elif name == "peaked":
        p = np.full(V, 0.03 / (V - 1))
        p[1] = 0.97
    elif name == "topk":  # top-k truncation: the smallest V - 4 codes get probability exactly 0
        p = rng.dirichlet(np.ones(V))
        p[np.argsort(p)[:-4]] = 0.0
        p /= p.sum()
    return p


def _chi2(counts, p, n):
    m = p > 0
    assert counts[~m].sum() == 0, "a code with zero probability was reached"
    return chisquare(counts[m], n * p[m] / p[m].sum()).pvalue


@pytest.mark.parametrize("C,V,kind", [(2, 6, "dirichlet"), (2, 4, "peaked"), (2, 6, "topk"),
                                      (8, 16, "dirichlet"), (8, 16, "peaked"), (8, 16, "topk")])
def test_ode_map_pushforward_matches_p(C, V, kind):
    cb = _codebook(V, C, seed=C * 100 + V)
    p = _probs(kind, V, seed=V)
    log_p = torch.log(torch.tensor(p, dtype=torch.float32)).expand(N_DRAWS, V)
    eps = torch.randn(N_DRAWS, C, generator=torch.Generator().manual_seed(1))
    ids, st = ode_map(eps, log_p, cb, ODEConfig(), return_stats=True)
    counts = torch.bincount(ids, minlength=V).numpy()
    assert _chi2(counts, p, N_DRAWS) > P_MIN
    assert (st["snap_dist"] > 1e-3).float().mean() < 1e-3  # the ODE ends on codes


def test_euler_in_s_is_euler_on_dx_dt_velocity_and_solvers_agree():
    """solver="euler" in (s, y) coordinates is the plain Euler step of dx/dt = flow.velocity in t."""
    from onestep import flow

    cb = _codebook(8, 3, seed=0)
    log_p = torch.log_softmax(torch.randn(500, 8, generator=torch.Generator().manual_seed(0)), -1).double()
    eps = torch.randn(500, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = ODEConfig(solver="euler", n_steps=40, dtype="float64")
    t = 1.0 / (1.0 + time_grid(cfg))
    x = eps.clone()
    for i in range(len(t) - 1):
        x = x + (t[i + 1] - t[i]).item() * flow.velocity(x, t[i].item(), log_p, cb.double())
    ids_x = flow.log_weights(x, t[-1].item(), log_p, cb.double()).argmax(-1)
    assert torch.equal(ids_x, ode_map(eps, log_p, cb, cfg))
    ref = ode_map(eps, log_p, cb, ODEConfig(n_steps=400))
    for solver, n in [("ab2", 200), ("heun", 100)]:
        assert (ode_map(eps, log_p, cb, ODEConfig(solver=solver, n_steps=n)) != ref).float().mean() < 0.01


def test_time_grid():
    s = time_grid(ODEConfig(n_steps=10))
    assert s[0] == 0 and len(s) == 11 and torch.all(s[1:] > s[:-1]) and abs(s[-1].item() - 5e2) < 1e-6
    s = time_grid(ODEConfig(n_steps=10, grid="uniform_t"))
    assert s[0] == 0 and torch.all(s[1:] > s[:-1])


def _tiny_cfg():
    return SamplingConfig(cfg_scale=2.0, top_k=8, temperature=1.0)


def test_map_deterministic_batch_independent_and_consistent(tiny_gpt):
    g = torch.Generator().manual_seed(0)
    n, C = tiny_gpt.seq_len, tiny_gpt.code_dim
    eps = torch.randn(6, n, C, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    cfg = _tiny_cfg()
    ode = ODEConfig(n_steps=32)
    a = map_noise_to_tokens(tiny_gpt, eps, labels, cfg, ode)
    assert torch.equal(a, map_noise_to_tokens(tiny_gpt, eps, labels, cfg, ode))
    parts = torch.cat([map_noise_to_tokens(tiny_gpt, eps[:2], labels[:2], cfg, ode),
                       map_noise_to_tokens(tiny_gpt, eps[2:], labels[2:], cfg, ode)])
    assert torch.equal(a, parts)
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    assert torch.equal(a[perm], map_noise_to_tokens(tiny_gpt, eps[perm], labels[perm], cfg, ode))
    # the KV-cache path with CFG doubling gives the teacher-forcing p: re-mapping with it reproduces ids
    logp = teacher_log_probs(tiny_gpt, a, labels, cfg)
    assert torch.equal(ode_map(eps, logp, tiny_gpt.codebook(), ode), a)
    # top-k: only the 8 most likely codes can be reached
    assert torch.isfinite(logp.gather(-1, a[..., None])).all()
    # a prefix kept from step 3 on: the first 3 tokens are fed, not mapped
    pre = torch.randint(0, tiny_gpt.vocab_size, (6, n), generator=g)
    b = map_noise_to_tokens(tiny_gpt, eps, labels, cfg, ode, prefix=pre, start_step=3)
    assert torch.equal(b[:, :3], pre[:, :3])
    logp_b = teacher_log_probs(tiny_gpt, b, labels, cfg)
    assert torch.equal(ode_map(eps[:, 3:], logp_b[:, 3:], tiny_gpt.codebook(), ode), b[:, 3:])


@pytest.mark.parametrize("cfg", [SamplingConfig(), SamplingConfig(top_k=3, temperature=0.8)])
def test_tabular_joint_of_mapped_sequences_is_exact(cfg):
    teacher = TabularTeacher(vocab_size=4, seq_len=3, code_dim=2, seed=3)
    seqs = teacher.all_sequences()
    exact = teacher_log_probs(teacher, seqs, torch.zeros(len(seqs), dtype=torch.long), cfg).gather(
        -1, seqs[..., None]).squeeze(-1).sum(-1).exp().double()
    eps = torch.randn(N_DRAWS, 3, 2, generator=torch.Generator().manual_seed(7))
    ids = map_noise_to_tokens(teacher, eps, torch.zeros(N_DRAWS, dtype=torch.long), cfg)
    emp = empirical_joint(teacher.flat_index(ids), len(exact))
    counts = (emp * N_DRAWS).round().numpy()
    p = exact.numpy()
    assert counts[p == 0].sum() == 0
    big = p * N_DRAWS >= 5  # pool the rare sequences into one bin for the chi-square test
    rare = (~big) & (p > 0)
    obs, exp_ = counts[big], p[big] * N_DRAWS
    if rare.any():
        obs, exp_ = np.append(obs, counts[rare].sum()), np.append(exp_, p[rare].sum() * N_DRAWS)
    assert chisquare(obs, exp_ * obs.sum() / exp_.sum()).pvalue > P_MIN
    assert total_variation(emp, exact) < 0.03  # sampling error of 20k draws over 64 cells is ~0.01


def test_pairs_sharded_resumable_manifest(tmp_path):
    teacher = TabularTeacher(vocab_size=4, seq_len=3, code_dim=2, seed=3)
    out = tmp_path / "pairs"
    ode = ODEConfig(n_steps=16)
    man = pairs.generate_pairs(teacher, 50, out, shard_size=16, seed=5, ode=ode, progress=False, map_batch=7)
    files = sorted(p.name for p in out.glob("shard_*.npz"))
    assert files == [f"shard_{i:05d}.npz" for i in range(4)]
    assert man["complete"] and man["n"] == 50 and man["ode"]["n_steps"] == 16 and man["eps_dtype"] == "float16"
    assert [s["seed"] for s in man["shards"]] == [5, 6, 7, 8] and man["wall_s"] > 0
    assert json.loads((out / "manifest.json").read_text())["sampling"] == SamplingConfig().to_dict()
    before = {f: dict(np.load(out / f)) for f in files}
    (out / files[1]).unlink()
    pairs.generate_pairs(teacher, 50, out, shard_size=16, seed=5, ode=ode, progress=False)
    for f in files:
        after = dict(np.load(out / f))
        for k in ("eps", "ids", "labels", "index", "seeds"):
            assert np.array_equal(before[f][k], after[k]), (f, k)
    assert before["shard_00001.npz"]["eps"].dtype == np.float16
    # pairs are consistent: the stored (float16) noise maps to the stored tokens
    data = pairs.load_pairs(out)
    assert data["eps"].shape == (50, 3, 2) and torch.equal(data["index"], torch.arange(50))
    assert torch.equal(map_noise_to_tokens(teacher, data["eps"], data["labels"], SamplingConfig(), ode), data["ids"])
    ds = pairs.PairShards(out, cache_shards=2)
    assert len(ds) == 50 and torch.equal(ds[37]["ids"], data["ids"][37])
    idx = torch.tensor([49, 0, 17, 33, 16])
    assert torch.equal(ds.batch(idx)["eps"], data["eps"][idx])
    seen = torch.cat([b["index"] for b in pairs.iter_pair_batches(out, 8, seed=1, shards_in_memory=2, drop_last=False)])
    assert sorted(seen.tolist()) == list(range(50))
    with pytest.raises(ValueError):
        pairs.generate_pairs(teacher, 50, out, shard_size=16, seed=6, ode=ode, progress=False)


def test_model_trajectory_points_and_teacher_init(tiny_gpt):
    model = DD1Generator.from_teacher(tiny_gpt).eval()
    n, C, V = tiny_gpt.seq_len, tiny_gpt.code_dim, tiny_gpt.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (3, n), generator=g)
    eps = torch.randn(3, n, C, generator=g)
    labels = torch.tensor([1, 2, 3])
    m = clean_mask(torch.tensor([0, 5, n]), n)
    assert m.sum(1).tolist() == [0, 5, n] and m[1, :5].all() and not m[1, 5:].any()
    with torch.no_grad():
        # all clean + zero-initialised flags: aligned output i = the teacher's next-token logits at i + 1
        full = model(ids, eps, torch.ones(3, n, dtype=torch.bool), labels)
        assert torch.allclose(full[:, :-1], tiny_gpt(ids, labels)[:, 1:], atol=1e-5)
        # the flag embedding is applied (row 1 clean/class, row 0 noise) and changes the output
        model.n_d_embed.weight.normal_()
        k = torch.tensor([4, 4, 4])
        out = model(ids, eps, clean_mask(k, n), labels)
        # ids at noise positions are ignored; eps at clean positions is ignored
        ids2, eps2 = ids.clone(), eps.clone()
        ids2[:, 4:] = (ids2[:, 4:] + 1) % V
        eps2[:, :4] += 1.0
        assert torch.allclose(out, model(ids2, eps2, clean_mask(k, n), labels), atol=1e-5)
        # causal + aligned: output i depends on eps_<=i only
        eps3 = eps.clone()
        eps3[:, 9] += 1.0
        out3 = model(ids, eps3, clean_mask(k, n), labels)
        assert torch.allclose(out3[:, :9], out[:, :9], atol=1e-5) and not torch.allclose(out3[:, 9], out[:, 9])
    lin = DD1Generator.from_teacher(tiny_gpt, input_mode="linear")
    assert lin(ids, eps, m, labels).shape == (3, n, V)


def test_training_loss_decreases_and_sampling(tiny_gpt, tmp_path):
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    out = tmp_path / "p"
    pairs.generate_pairs(tiny_gpt, 256, out, shard_size=128, seed=0, sampling_cfg=cfg, ode=ODEConfig(n_steps=24),
                         progress=False, eps_dtype="float32")
    data = pairs.load_pairs(out)
    model = DD1Generator.from_teacher(tiny_gpt)
    s = TrajectorySampler(TrajectoryConfig(), tiny_gpt.seq_len)
    m = s(1000, torch.Generator().manual_seed(0))
    assert (m == 0).float().mean().item() == pytest.approx(0.5, abs=0.05) and m.max() < tiny_gpt.seq_len
    hist = fit(model, data, steps=60, batch_size=32, lr=2e-3, seed=0)
    first = np.mean([h["loss"] for h in hist[:5]])
    last = np.mean([h["loss"] for h in hist[-5:]])
    assert last < 0.8 * first, (first, last)
    loss, logs = dd1_loss(model, {k: data[k][:8] for k in ("eps", "ids", "labels")})
    assert torch.isfinite(loss) and 0 <= logs["acc_x1"] <= 1
    # sampling shapes; 2-step keeps the first s tokens of step 1
    eps, labels = data["eps"][:5], data["labels"][:5]
    one = sampling.one_step(model, eps, labels)
    assert one.shape == (5, tiny_gpt.seq_len) and one.dtype == torch.long
    s_ = sampling.default_split(tiny_gpt.seq_len)
    assert s_ == 5 and sampling.default_split(256) == 80
    two = sampling.two_step(model, eps, labels)
    assert torch.equal(two[:, :s_], one[:, :s_])
    assert torch.equal(sampling.multi_step(model, eps, labels, [s_]), two)
    ti = sampling.teacher_involved(model, tiny_gpt, eps, labels, cfg, (4, 8), "sample", torch.Generator().manual_seed(0))
    assert torch.equal(ti[:, :4], one[:, :4]) and ti.shape == one.shape
    smp = sampling.dd1_sampler(model, None, "2step")
    assert smp.steps == 2 and smp.sample(labels, torch.Generator().manual_seed(0)).shape == one.shape
    assert sampling.dd1_sampler(model, None, "teacher", teacher=tiny_gpt, cfg=cfg, window=(4, 8)).steps == 2 + 4


class _OracleGenerator(torch.nn.Module):
    """A perfect DD1 generator: the flow map itself from any trajectory point (for testing the samplers)."""

    def __init__(self, teacher, cfg, ode):
        super().__init__()
        self.teacher, self.cfg, self.ode = teacher, cfg, ode
        self.seq_len, self.code_dim, self.dummy = teacher.seq_len, teacher.code_dim, torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, eps, clean, labels):
        k = int(clean[0].sum())
        assert (clean.sum(1) == k).all() and clean[:, :k].all()
        q = map_noise_to_tokens(self.teacher, eps, labels, self.cfg, self.ode, prefix=ids, start_step=k)
        return torch.nn.functional.one_hot(q, self.teacher.vocab_size).float()


def test_samplers_reset_to_the_same_noise(tiny_gpt):
    """With a perfect generator, every DD1 sampler reproduces the flow map of the initial noise."""
    cfg, ode = _tiny_cfg(), ODEConfig(n_steps=24)
    oracle = _OracleGenerator(tiny_gpt, cfg, ode)
    g = torch.Generator().manual_seed(3)
    eps = sampling.draw_noise(oracle, 4, g)
    labels = torch.tensor([0, 3, 6, 9])
    target = map_noise_to_tokens(tiny_gpt, eps, labels, cfg, ode)
    assert torch.equal(sampling.one_step(oracle, eps, labels), target)
    assert torch.equal(sampling.two_step(oracle, eps, labels, s=7), target)
    for window in [(4, 9), (0, 6), (5, tiny_gpt.seq_len)]:
        assert torch.equal(sampling.teacher_involved(oracle, tiny_gpt, eps, labels, cfg, window, "map", ode=ode), target)


def test_skip0_is_teacher_sampling_and_skip_n_shapes(tiny_gpt):
    cfg = _tiny_cfg()
    labels = torch.arange(6)
    ref = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(11))
    assert torch.equal(baselines.skip_n(tiny_gpt, labels, cfg, 0, torch.Generator().manual_seed(11)), ref)
    marg = baselines.estimate_marginals(ref, tiny_gpt.vocab_size, smoothing=1.0)
    for fill in ("marginal", "last"):
        out = baselines.skip_n(tiny_gpt, labels, cfg, 5, torch.Generator().manual_seed(11), fill, marg)
        assert out.shape == ref.shape
        n_pref = tiny_gpt.seq_len - 5 - 1  # the first K - n - 1 AR steps are sampled exactly as the teacher
        assert torch.equal(out[:, :n_pref], ref[:, :n_pref])


def test_skip_n_first_skipped_step_is_exact_on_tabular():
    teacher = TabularTeacher(vocab_size=4, seq_len=3, code_dim=2, seed=3)
    cfg = SamplingConfig()
    N = N_DRAWS
    labels = torch.zeros(N, dtype=torch.long)
    marg = teacher.marginals().double()
    out = baselines.skip_n(teacher, labels, cfg, 1, torch.Generator().manual_seed(0), "marginal", marg)
    # (q_0, q_1) come from 1 ancestral step + the first (exact) step of the parallel pass
    exact01 = teacher.exact_joint().reshape(4, 4, 4).sum(-1).flatten()
    emp01 = torch.bincount(out[:, 0] * 4 + out[:, 1], minlength=16).double() / N
    assert total_variation(emp01, exact01) < 0.03


def test_onestep_star_marginals():
    teacher = TabularTeacher(vocab_size=4, seq_len=3, code_dim=2, seed=3)
    ids = torch.tensor([[0, 1, 2], [0, 3, 2], [1, 1, 2], [0, 1, 3]])
    m = baselines.estimate_marginals(ids, 4)
    assert torch.allclose(m, torch.tensor([[.75, .25, 0, 0], [0, .75, 0, .25], [0, 0, .75, .25]], dtype=torch.float64))
    samples = sample_tokens(teacher, torch.zeros(N_DRAWS, dtype=torch.long), SamplingConfig(), torch.Generator().manual_seed(0))
    est = baselines.estimate_marginals(samples, 4)
    assert (est - teacher.marginals().double()).abs().max() < 0.015
    draws = baselines.sample_marginals(est, N_DRAWS, torch.Generator().manual_seed(1))
    assert draws.shape == (N_DRAWS, 3)
    assert (baselines.estimate_marginals(draws, 4) - est).abs().max() < 0.015
