"""DD1 (method.md section 2): the noise-to-token flow map, pairs, generator, training, sampling, baselines.

Statistical tests use fixed seeds and a chi-square p-value threshold of 1e-3 (a correct map gives a
uniform p-value, so a fresh seed would fail with probability 1e-3 per test); bins with zero teacher
probability must get exactly zero count.
"""
import argparse
import json

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from onestep.dd1 import baselines, pairs, sampling
from onestep.flow_map import ODEConfig, codebook_grid, map_noise_to_tokens, ode_map, time_grid
from onestep.dd1.model import DD1Generator, clean_mask
from onestep.dd1.train import TrajectoryConfig, TrajectorySampler, dd1_loss, fit
from onestep.teacher.sampling import SamplingConfig, sample_tokens, teacher_log_probs
from onestep.teacher.tabular import TabularTeacher, empirical_joint, total_variation

P_MIN = 1e-3
N_DRAWS = 20_000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """DD1's tests run many tiny ops: one intra-op thread (on a shared 2-core machine, 2 threads make tiny
    ops up to ~30x slower through thread synchronisation). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def _top(log_p: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Each row truncated to its k most likely codes, a few rows to fewer (padding on the support path)."""
    kth = log_p.topk(k, -1).values[:, -1:]
    out = log_p.masked_fill(log_p < kth, float("-inf"))
    few = torch.rand(log_p.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.1
    out[few] = out[few].masked_fill(out[few] < out[few].max(-1, keepdim=True).values - 0.5, float("-inf"))
    return out


def test_blocks_of_rows_and_truncated_supports_give_the_same_ids(monkeypatch):
    """The map solves its rows in blocks and, where every row's support is a small part of the codebook, on those
    codes only: the ids are those of one dense solve of every row over every code (a truncated code has weight 0)."""
    from onestep import flow_map

    V, C, N = 128, 8, 3000
    cb = _codebook(V, C, seed=3)
    g = torch.Generator().manual_seed(4)
    log_p = _top(torch.log_softmax(2 * torch.randn(N, V, generator=g), -1), 6, seed=5)
    eps = torch.randn(N, C, generator=g)
    cfg = ODEConfig(solver="ab2log", n_steps=16, s_min=codebook_grid(cb)[0], s_max=codebook_grid(cb)[1])
    assert flow_map._support(log_p) is not None and flow_map._support(log_p)[1].any()  # the support path, padded
    ids, st = ode_map(eps, log_p, cb, cfg, return_stats=True)
    top = log_p.topk(6, -1)
    explicit = ode_map(eps, top.values, cb, cfg, support=top.indices)
    wide_p = _top(torch.log_softmax(2 * torch.randn(N, V, generator=g), -1), 40, seed=6)  # above SUPPORT_FRACTION
    wide = wide_p.topk(40, -1)
    assert torch.equal(ode_map(eps, wide.values, cb, cfg, support=wide.indices), ode_map(eps, wide_p, cb, cfg))
    monkeypatch.setattr(flow_map, "BLOCK_ELEMENTS", 2 ** 40)
    monkeypatch.setattr(flow_map, "SUPPORT_FRACTION", 0.0)
    dense, st_dense = ode_map(eps, log_p, cb, cfg, return_stats=True)
    assert torch.equal(ids, dense) and torch.equal(explicit, dense)
    assert torch.allclose(st["snap_dist"], st_dense["snap_dist"], atol=1e-5)
    assert torch.isfinite(log_p.gather(1, ids[:, None])).all()  # never a truncated code


def test_the_map_on_a_support_pushes_forward_to_p():
    """Solved on a top-k support given as values and indices, the map is still exact in distribution."""
    V, C = 64, 8
    cb = _codebook(V, C, seed=6)
    p = _probs("dirichlet", V, seed=7)
    p[np.argsort(p)[:-5]] = 0.0
    p /= p.sum()
    log_p = torch.log(torch.tensor(p, dtype=torch.float32)).expand(N_DRAWS, V)
    top = log_p.topk(5, -1)
    eps = torch.randn(N_DRAWS, C, generator=torch.Generator().manual_seed(8))
    s_min, s_max = codebook_grid(cb)
    ids = ode_map(eps, top.values, cb, ODEConfig(solver="ab2log", n_steps=16, s_min=s_min, s_max=s_max),
                  support=top.indices)
    assert _chi2(torch.bincount(ids, minlength=V).numpy(), p, N_DRAWS) > P_MIN


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


@pytest.mark.parametrize("C,V,kind", [(2, 6, "dirichlet"), (8, 16, "peaked"), (8, 16, "topk")])
def test_ab2log_map_on_the_codebook_grid_pushes_forward_to_p(C, V, kind):
    """The flow recipe's map (16 AB2 steps in log s on :func:`codebook_grid`) is exact in distribution."""
    cb = _codebook(V, C, seed=C * 100 + V)
    p = _probs(kind, V, seed=V)
    log_p = torch.log(torch.tensor(p, dtype=torch.float32)).expand(N_DRAWS, V)
    eps = torch.randn(N_DRAWS, C, generator=torch.Generator().manual_seed(1))
    s_min, s_max = codebook_grid(cb)
    ids = ode_map(eps, log_p, cb, ODEConfig(solver="ab2log", n_steps=16, s_min=s_min, s_max=s_max))
    assert _chi2(torch.bincount(ids, minlength=V).numpy(), p, N_DRAWS) > P_MIN


def test_first_step_slope_is_the_derivative_of_the_denoiser_at_zero():
    """x0_hat'(0) = Cov_p(c) y (the ab2log solver's Taylor step from s = 0), against a central difference."""
    from onestep.flow_map import _Posterior

    cb = _codebook(7, 3, seed=5).double()
    log_p = torch.log_softmax(torch.randn(20, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)
    log_p[:, 2] = -float("inf")  # a truncated code
    y = torch.randn(20, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0 = _Posterior(log_p, cb, torch.float64)
    h = 1e-5
    fd = (x0(y, h) - x0(y, -h)) / (2 * h)
    assert torch.allclose(x0.slope_at_zero(y), fd, atol=1e-8)


def test_codebook_grid():
    """[0.6 / diameter, 5 / closest distinct pair]; duplicates skipped; one distinct code is an error."""
    cb = torch.tensor([[0.0], [1.0], [3.0], [3.0]])
    s_min, s_max = codebook_grid(cb)
    assert abs(s_min - 0.2) < 1e-12 and abs(s_max - 5.0) < 1e-12
    with pytest.raises(ValueError, match="two distinct codes"):
        codebook_grid(torch.ones(3, 2))


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

    def ar_steps(self):
        return self.teacher.ar_steps()

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


def test_skip_n_conditions_later_steps_on_filler_at_every_unsampled_position():
    """The parallel pass's inputs at ALL unsampled positions are filler, the first skipped step's included: with
    n_skip = 1 on 3 positions, q_2 is drawn from p(q_2 | q_0, f) with f ~ the position-1 marginal, not with code 0."""
    teacher = TabularTeacher(vocab_size=4, seq_len=3, code_dim=2, seed=3)
    N = N_DRAWS
    marg = teacher.marginals().double()
    out = baselines.skip_n(teacher, torch.zeros(N, dtype=torch.long), SamplingConfig(), 1,
                           torch.Generator().manual_seed(0), "marginal", marg)
    p0 = marg[0]
    table2 = teacher._table(2).exp().double().reshape(4, 4, 4)  # [q_0, q_1, q_2]
    exact02 = (p0[:, None] * (marg[1][None, :, None] * table2).sum(1)).flatten()
    emp02 = torch.bincount(out[:, 0] * 4 + out[:, 2], minlength=16).double() / N
    assert total_variation(emp02, exact02) < 0.03


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


# ---- stages, commands and samplers (pairs, train, sample, baselines, cost) ---------------------------------------
def test_teacher_stepping_helper_end_step_and_prefix(tiny_gpt):
    """sample_tokens with end_step draws exactly the first AR steps of the full sampler (one stepping loop)."""
    cfg = _tiny_cfg()
    labels = torch.arange(4)
    full = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(2))
    part = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(2), end_step=6)
    assert torch.equal(part[:, :6], full[:, :6]) and (part[:, 6:] == 0).all()
    nocache = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(2), use_cache=False, end_step=6)
    assert torch.equal(nocache, part)
    rest = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(3), prefix=part, start_step=6)
    assert torch.equal(rest[:, :6], part[:, :6])
    assert torch.equal(sampling.sample_window(tiny_gpt, part, labels, cfg, 6, 9, torch.Generator().manual_seed(3))[:, :9],
                       rest[:, :9])
    with pytest.raises(ValueError):
        sample_tokens(tiny_gpt, labels, cfg, end_step=tiny_gpt.seq_len + 1)


def _make_tiny_teacher_run(root):
    """A tokenizer run and a teacher run (tiny presets, random weights, no training data needed)."""
    from onestep import checkpoint as ckpt
    from onestep.teacher.llamagen import GPT, model_args
    from onestep.tokenizer.vq import VQModel, vq_config

    torch.manual_seed(0)
    tok = VQModel(vq_config("tiny"))
    ckpt.save_model(root / "tok" / "final", tok, {"kind": "tokenizer", "model": tok.config.to_dict()})
    args = model_args("tiny", vocab_size=tok.config.codebook_size, code_dim=tok.config.code_dim)
    teacher = GPT(args, codebook=tok.codebook_vectors().detach())
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ckpt.save_model(root / "teacher" / "final", teacher, {"kind": "teacher", "family": "llamagen",
                                                          "tokenizer_dir": "../tok", "model": args.to_dict()})
    return root / "teacher"


@pytest.fixture(scope="module")
def dd1_cli_run(tmp_path_factory):
    """tiny preset through the CLI: onestep dd1 pairs, then onestep dd1 train."""
    from onestep.cli import main

    root = tmp_path_factory.mktemp("dd1cli")
    teacher = _make_tiny_teacher_run(root)
    main(["dd1", "pairs", "--teacher", str(teacher), "--out", str(root / "pairs"), "--preset", "tiny", "--seed", "3"])
    main(["dd1", "train", "--pairs", str(root / "pairs"), "--teacher", str(teacher), "--run-dir", str(root / "dd1"),
          "--preset", "tiny"])
    return root


def test_cli_pairs_train_sample_smoke(dd1_cli_run, capsys):
    from onestep.cli import main
    from onestep.runs import resolve_ref

    root = dd1_cli_run
    man = json.loads((root / "pairs" / "manifest.json").read_text())
    assert man["complete"] and man["n"] == 256 and man["seed"] == 3 and man["sampling"]["cfg_scale"] == 2.0
    assert man["teacher_dir"] == "../teacher" and man["wall_s"] > 0 and man["threads"] >= 1
    assert [s["seed"] for s in man["shards"]] == [3, 4]
    run = root / "dd1"
    for f in ("config.json", "log.jsonl", "metrics.json", "final/model.safetensors", "final/config.json",
              "checkpoints/latest"):
        assert (run / f).exists(), f
    cfg = json.loads((run / "final" / "config.json").read_text())
    assert cfg["kind"] == "dd1" and cfg["sampling"] == man["sampling"] and cfg["train"]["steps"] == 20
    assert resolve_ref(cfg["teacher_dir"], run / "final").resolve() == (root / "teacher").resolve()
    assert resolve_ref(cfg["pairs_manifest"], run / "final").resolve() == (root / "pairs" / "manifest.json").resolve()
    met = json.loads((run / "metrics.json").read_text())
    assert met["pairs_wall_time_s"] == round(man["wall_s"], 2) and met["train_wall_time_s"] > 0
    assert met["total_wall_time_s"] == pytest.approx(met["pairs_wall_time_s"] + met["train_wall_time_s"], abs=0.02)
    assert 0 <= met["val_acc_1step"] <= 1 and met["n_val"] == 32 and met["nonfinite_steps"] == 0
    # re-running the finished training resumes from its last checkpoint and does no work
    lines = (run / "log.jsonl").read_text().count("\n")
    capsys.readouterr()
    main(["dd1", "train", "--pairs", str(root / "pairs"), "--teacher", str(root / "teacher"), "--run-dir", str(run),
          "--preset", "tiny"])
    assert "resumed" in capsys.readouterr().out and (run / "log.jsonl").read_text().count("\n") == lines
    assert json.loads((run / "metrics.json").read_text()) == met
    # the generator distils the pairs' sampling rule: another rule is refused with a clear message
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["dd1", "train", "--pairs", str(root / "pairs"), "--teacher", str(root / "teacher"), "--run-dir",
              str(root / "other"), "--preset", "tiny", "--cfg-scale", "1.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "onestep dd1 train: error:" in err and "differs from the one the pairs were made with" in err
    # onestep sample --method dd1 --steps 1 and 2 (same seed -> same noise: 2-step keeps 1-step's first s tokens)
    out = root / "samples"
    for k in (1, 2):
        main(["sample", "--method", "dd1", "--run", str(run), "--sampling-steps", str(k), "-n", "12", "--out", str(out)])
    one, two = np.load(out / "dd1-1step.npz"), np.load(out / "dd1-2step.npz")
    assert one["tokens"].shape == (12, 16) and one["images"].shape[0] == 12 and (out / "dd1-2step.png").exists()
    s = sampling.default_split(16)
    assert np.array_equal(one["tokens"][:, :s], two["tokens"][:, :s]) and list(one["labels"][:3]) == [0, 1, 2]


def test_a_truncated_pairs_shard_is_one_line_and_dd1_pairs_writes_it_again(dd1_cli_run, tmp_path, capsys):
    """A shard cut short (a full disk, a copy stopped half-way) is reported with one line naming it, not a
    zipfile.BadZipFile traceback; re-running `onestep dd1 pairs` with the same arguments writes it again (the same
    noise, tokens and labels)."""
    import shutil

    from onestep.cli import main

    for name in ("tok", "teacher", "pairs"):  # (the pairs record their teacher as ../teacher)
        shutil.copytree(dd1_cli_run / name, tmp_path / name)
    root, out = tmp_path, tmp_path / "pairs"
    shard = out / "shard_00001.npz"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["dd1", "train", "--pairs", str(out), "--teacher", str(root / "teacher"), "--run-dir",
              str(tmp_path / "dd1"), "--preset", "tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert f"cannot read the DD1 pairs shard {shard} (truncated or corrupt" in err[0] and "dd1 pairs" in err[0]
    main(["dd1", "pairs", "--teacher", str(root / "teacher"), "--out", str(out), "--preset", "tiny", "--seed", "3"])
    assert "shard_00001.npz" in capsys.readouterr().out  # named as it is written again
    again = pairs.read_shard(shard)
    shard.write_bytes(whole)
    assert all(np.array_equal(again[k], v) for k, v in pairs.read_shard(shard).items() if "_s" not in k)  # (times)


def test_cli_pairs_resume_after_interruption_and_resize(tmp_path, monkeypatch, capsys):
    from onestep.cli import main
    from onestep.dd1.stages import check_pairs

    teacher = _make_tiny_teacher_run(tmp_path)
    args = ["dd1", "pairs", "--teacher", str(teacher), "--preset", "tiny", "-n", "300"]
    main(args + ["--out", str(tmp_path / "ref")])
    calls = {"n": 0}
    real = pairs.map_noise_to_tokens

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "p"
    monkeypatch.setattr(pairs, "map_noise_to_tokens", interrupted)
    with pytest.raises(SystemExit) as e:  # the CLI reports the interruption (exit 130)
        main(args + ["--out", str(out)])
    assert e.value.code == 130
    assert sorted(p.name for p in out.glob("shard_*.npz")) == ["shard_00000.npz", "shard_00001.npz"]
    assert not list(out.glob(".shard_*"))  # no partial file: shards are written atomically
    with pytest.raises(Exception, match="incomplete"):
        check_pairs(out, teacher)
    monkeypatch.setattr(pairs, "map_noise_to_tokens", real)
    main(args + ["--out", str(out)])
    assert calls["n"] == 3  # the resumed run did not redo shards 0 and 1
    ref, got = pairs.load_pairs(tmp_path / "ref"), pairs.load_pairs(out)
    for k in ("eps", "ids", "labels", "index"):
        assert torch.equal(ref[k], got[k]), k
    # a larger -n extends the set: the old partial last shard is redone at full size; equal to a fresh run
    main(["dd1", "pairs", "--teacher", str(teacher), "--preset", "tiny", "-n", "400", "--out", str(out)])
    main(["dd1", "pairs", "--teacher", str(teacher), "--preset", "tiny", "-n", "400", "--out", str(tmp_path / "ref400")])
    a, b = pairs.load_pairs(out), pairs.load_pairs(tmp_path / "ref400")
    assert len(a["ids"]) == 400 and all(torch.equal(a[k], b[k]) for k in a)
    assert check_pairs(out, teacher)["n"] == 400
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["dd1", "pairs", "--teacher", str(teacher), "--preset", "tiny", "-n", "400", "--out", str(out), "--seed", "9"])
    assert e.value.code == 2 and "seed" in capsys.readouterr().err


def test_sampler_builder_dd1_and_baselines(dd1_cli_run):
    import argparse
    from types import SimpleNamespace

    from onestep.dd1.baselines import baseline_samplers
    from onestep.methods import build_sampler

    run, teacher_dir = dd1_cli_run / "dd1", dd1_cli_run / "teacher"

    def args(steps, cfg_scale=2.0):
        return argparse.Namespace(steps=steps, cfg_scale=cfg_scale, cfg_schedule="constant", temperature=1.0, top_k=0,
                                  top_p=1.0)

    labels = torch.arange(10)
    one = build_sampler("dd1", str(run), "cpu", None)
    assert one.name == "dd1-1step" and one.steps == 1 and one.info["num_classes"] == 10
    for k in (1, 2, 3, 7, 16):
        smp = build_sampler("dd1", str(run), "cpu", args(k))
        assert smp.steps == k, (k, smp.steps)
        ids = smp.sample(labels, torch.Generator().manual_seed(0))
        assert ids.shape == (10, 16) and ids.dtype == torch.long and ids.max() < 32
    ti = build_sampler("dd1", str(run), "cpu", args(7))
    assert ti.name == "dd1-teacher-involved" and ti.info["window"] == (5, 10) and ti.params > one.params
    for bad in (0, 17):
        with pytest.raises(ValueError):
            build_sampler("dd1", str(run), "cpu", args(bad))
    with pytest.raises(ValueError, match="sampling rule"):
        build_sampler("dd1", str(run), "cpu", args(3, cfg_scale=1.5))
    # the window of the benchmark teacher (49 positions): after the 2-step split s = 15, moved back to fit
    t49 = SimpleNamespace(seq_len=49, ar_steps=lambda: [(i, i + 1) for i in range(49)])
    assert sampling.default_split(49) == 15
    assert sampling.teacher_window(t49, 12) == (15, 25) and sampling.teacher_window(t49, 49) == (1, 48)
    d = sampling.dd1_samplers(str(run))
    assert {k: v.steps for k, v in d.items()} == {"dd1-1step": 1, "dd1-2step": 2,
                                                  "dd1-teacher-involved": sampling.TEACHER_INVOLVED_STEPS}
    assert all(v.name == k for k, v in d.items())
    # baselines: skip-n at ~60% / ~40% of the 16 AR steps, onestep* from (class-conditional) teacher samples
    t_ids = sample_tokens(one_teacher := _load_teacher(teacher_dir), torch.arange(200) % 10, _sampling(),
                          torch.Generator().manual_seed(0))
    t_lab = torch.arange(200) % 10
    b = baseline_samplers(str(teacher_dir), "cpu", _sampling(), (t_ids, t_lab))
    assert {k: v.steps for k, v in b.items()} == {"skip-6": 10, "skip-10": 6, "onestep*": 1}
    assert b["onestep*"].info["class_conditional"] and b["onestep*"].params == 0
    assert b["skip-6"].params == sum(p.numel() for p in one_teacher.parameters())
    star = b["onestep*"].sample(torch.full((300,), 4), torch.Generator().manual_seed(1))
    seen = torch.zeros(16, 32, dtype=torch.bool)
    seen[torch.arange(16).expand(20, 16), t_ids[t_lab == 4]] = True
    assert seen[torch.arange(16).expand(300, 16), star].all()  # class 4 draws only codes class 4 used there
    for v in b.values():
        assert v.images(labels, torch.Generator().manual_seed(0)).shape[0] == 10
    with pytest.raises(ValueError):
        baseline_samplers(str(teacher_dir), "cpu", _sampling(), t_ids[:, :5])


def _load_teacher(d):
    from onestep.teacher.load import load_teacher

    return load_teacher(d, "cpu", with_tokenizer=False)[0]


def _sampling():
    return SamplingConfig(cfg_scale=2.0)


# ---- the released LlamaGen-DD layout ------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,fixture", [("GPT-B", "dd1-llamagen-b"), ("GPT-L", "dd1-llamagen-l")])
def test_linear_input_with_conti_head_is_the_released_llamagen_dd_layout(preset, fixture):
    """input_mode "linear" + conti_head: the keys (in order), shapes, dtypes and parameter count of LlamaGen-DD."""
    from test_teacher import assert_official_layout

    from onestep.teacher.llamagen import GPT_PRESETS

    assert_official_layout(lambda: DD1Generator(GPT_PRESETS[preset], input_mode="linear", conti_head=True), fixture)


def test_conti_head_reads_the_last_block_before_the_final_norm(tiny_gpt):
    """final_layer_conti by hand: LN(h) (1 + scale) + shift -> Linear, with (shift, scale) = table rows + the class
    embedding and h the last block's output (not RMS-normed); the logits are unchanged by the extra head."""
    torch.manual_seed(0)
    m = DD1Generator.from_teacher(tiny_gpt, input_mode="linear", conti_head=True).eval()
    plain = DD1Generator.from_teacher(tiny_gpt, input_mode="linear").eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("final_layer_conti.")})
    n = m.seq_len
    ids = torch.randint(m.vocab_size, (2, n))
    eps = torch.randn(2, n, m.code_dim)
    clean = clean_mask(torch.tensor([0, 5]), n)
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        x = torch.where(clean[..., None], m.codebook()[ids], eps)
        cond = m.cls_embedding(labels)
        h = torch.cat([cond[:, None], m.tok_embeddings(x)], 1)
        h = h + m.n_d_embed(torch.cat([torch.ones(2, 1, dtype=torch.long), clean.long()], 1))
        for layer in m.layers:
            h = layer(h, m.rope[: n + 1])
        head = m.final_layer_conti
        shift, scale = head.scale_shift_table[0] + cond, head.scale_shift_table[1] + cond
        ln = torch.nn.functional.layer_norm(h, (h.shape[-1],), eps=1e-6)
        want = head.linear(ln * (1 + scale[:, None]) + shift[:, None])[:, 1:]
        torch.testing.assert_close(m.continuous(ids, eps, clean, labels), want)
        torch.testing.assert_close(m(ids, eps, clean, labels), plain(ids, eps, clean, labels))
    with pytest.raises(ValueError, match="continuous head"):
        plain.continuous(ids, eps, clean, labels)


def _tiny_var_dd():
    from onestep.dd1.var_model import VARDD1Generator
    from onestep.teacher.var import VAR, var_args
    from onestep.tokenizer.msvq import VQVAE, vqvae_config

    a = VQVAE(vqvae_config("var-tiny")).config
    var = VAR(var_args("tiny", vocab_size=a.codebook_size, code_dim=a.code_dim, patch_nums=a.patch_nums,
                       phi_index=a.phi_index))
    return VARDD1Generator(var.args, conti_head=True)


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_released_output_rule_is_argmax_codes_then_the_continuous_head(family, tiny_gpt):
    """conti_from S (LlamaGen-DD get_final_x_BLC / VAR-DD get_final_sequence): codebook[argmax logits] before S,
    the continuous head's tokens from S on, the kept prefix as given; ``predict`` is forward + continuous in one
    pass; multi-step keeps the nearest codes of the first call's vectors."""
    torch.manual_seed(0)
    m = (DD1Generator.from_teacher(tiny_gpt, input_mode="linear", conti_head=True) if family == "llamagen"
         else _tiny_var_dd()).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    n, S = m.seq_len, m.seq_len // 2
    eps, labels = torch.randn(3, n, m.code_dim), torch.tensor([0, 1, 2])
    zeros = torch.zeros(3, n, dtype=torch.long)
    no_clean = clean_mask(torch.zeros(3, dtype=torch.long), n)
    with torch.no_grad():
        logits, conti = m.predict(zeros, eps, no_clean, labels)
        torch.testing.assert_close(logits, m(zeros, eps, no_clean, labels), atol=0, rtol=0)
        torch.testing.assert_close(conti, m.continuous(zeros, eps, no_clean, labels), atol=0, rtol=0)
        want = torch.cat([m.codebook()[logits.argmax(-1)][:, :S], conti[:, S:]], 1)
        x = sampling.one_step(m, eps, labels, conti_from=S)
        torch.testing.assert_close(x, want, atol=0, rtol=0)
        torch.testing.assert_close(sampling.one_step(m, eps, labels, conti_from=n),
                                   m.codebook()[sampling.one_step(m, eps, labels)], atol=0, rtol=0)
        torch.testing.assert_close(sampling.one_step(m, eps, labels, conti_from=0), conti, atol=0, rtol=0)
        # two steps: keep k positions = the nearest codes of the first call's vectors, then the rule from k on
        k = m.ar_steps()[len(m.ar_steps()) // 2][0]
        kept = torch.cdist(x.flatten(0, 1), m.codebook()).argmin(-1).view(3, n)
        clean = clean_mask(torch.full((3,), k), n)
        lg2, c2 = m.predict(kept, eps, clean, labels)
        second = torch.where(clean, kept, lg2.argmax(-1))
        want2 = torch.where((torch.arange(n) >= S)[None, :, None] & ~clean[..., None], c2, m.codebook()[second])
        torch.testing.assert_close(sampling.two_step(m, eps, labels, k, conti_from=S), want2, atol=0, rtol=0)
    plain = (DD1Generator.from_teacher(tiny_gpt, input_mode="linear") if family == "llamagen"
             else type(m)(m.args)).eval()
    with pytest.raises(ValueError, match="continuous head"):
        sampling.one_step(plain, eps, labels, conti_from=S)
    with pytest.raises(ValueError, match="continuous head"):
        sampling.dd1_sampler(plain, None, "1step", conti_from=S)
    with pytest.raises(ValueError, match="conti_from must lie"):
        sampling.one_step(m, eps, labels, conti_from=n + 1)


def test_import_dd1_of_released_llamagen_dd_and_var_dd_files(tmp_path, capsys):
    """Released DD1 files (LlamaGen-DD under 'ema'; VAR-DD under ['trainer']['ema_parameters'] without its buffers)
    -> DD1 runs whose generators give the original's logits and sample through the CLI; a file of another shape
    fails, listing the keys."""
    from onestep import checkpoint as ckpt
    from onestep.cli import main
    from onestep.dd1.stages import load_dd1
    from onestep.dd1.var_model import VARDD1Generator
    from onestep.teacher.llamagen import GPT, model_args
    from onestep.teacher.var import VAR, var_args
    from onestep.tokenizer.msvq import VQVAE, vqvae_config
    from onestep.tokenizer.vq import VQModel, vq_config

    torch.manual_seed(0)
    vq = VQModel(vq_config("vq-16-tiny"))
    gpt = GPT(model_args("tiny", vocab_size=vq.vocab_size, code_dim=vq.code_dim), codebook=vq.codebook_vectors())
    torch.save({"model": vq.state_dict()}, tmp_path / "vq.pt")
    torch.save({"model": gpt.state_dict()}, tmp_path / "gpt.pt")
    main(["import-llamagen", "--gpt", str(tmp_path / "gpt.pt"), "--vq", str(tmp_path / "vq.pt"), "--out",
          str(tmp_path / "lg"), "--gpt-preset", "tiny", "--vq-preset", "vq-16-tiny", "--image-size", "16"])
    dd = DD1Generator(gpt.args, gpt.codebook(), input_mode="linear", conti_head=True)
    for p in dd.parameters():
        torch.nn.init.normal_(p, std=0.2)
    torch.save({"ema": dd.state_dict(), "model": {}, "steps": 7}, tmp_path / "llamagen-dd.pt")
    main(["import-dd1", "--dd1", str(tmp_path / "llamagen-dd.pt"), "--teacher", str(tmp_path / "lg" / "teacher"),
          "--run-dir", str(tmp_path / "lg" / "dd1")])
    loaded, conf, _, _ = load_dd1(tmp_path / "lg" / "dd1")
    assert conf["imported_from"]["dd1"].endswith("llamagen-dd.pt") and conf["model"]["conti_head"]
    n = dd.seq_len
    ids, eps = torch.randint(dd.vocab_size, (2, n)), torch.randn(2, n, dd.code_dim)
    clean, labels = clean_mask(torch.tensor([0, 3]), n), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, eps, clean, labels), dd.eval()(ids, eps, clean, labels), atol=0, rtol=0)
    main(["sample", "--run", str(tmp_path / "lg" / "dd1"), "--method", "dd1", "-n", "2", "--out", str(tmp_path / "s")])
    assert conf["conti_from"] is None  # n <= 80: the release's split lies past the sequence, argmax codes everywhere
    # the release's output rule, recorded by --conti-from (LlamaGen-DD's default 80 needs n > 80), used by sampling
    main(["import-dd1", "--dd1", str(tmp_path / "llamagen-dd.pt"), "--teacher", str(tmp_path / "lg" / "teacher"),
          "--run-dir", str(tmp_path / "lg" / "dd1-conti"), "--conti-from", "0"])
    from onestep.methods import build_sampler

    smp = build_sampler("dd1", str(tmp_path / "lg" / "dd1-conti"))
    out = smp.sample(torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    assert out.is_floating_point() and smp.info["conti_from"] == 0
    eps0 = sampling.draw_noise(loaded, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(out, dd.continuous(torch.zeros(2, n, dtype=torch.long), eps0,
                                                      clean_mask(torch.zeros(2, dtype=torch.long), n),
                                                      torch.tensor([1, 2])), atol=0, rtol=0)
    assert smp.images(torch.tensor([1, 2]), torch.Generator().manual_seed(0)).dtype == torch.uint8
    off = build_sampler("dd1", str(tmp_path / "lg" / "dd1-conti"), args=argparse.Namespace(steps=1, conti_from=-1))
    assert not off.sample(torch.tensor([1, 2]), torch.Generator().manual_seed(0)).is_floating_point()
    with pytest.raises(ValueError, match="does not apply"):
        build_sampler("teacher", str(tmp_path / "lg" / "teacher"), args=argparse.Namespace(conti_from=3))
    main(["sample", "--run", str(tmp_path / "lg" / "dd1-conti"), "--method", "dd1", "-n", "2", "--out",
          str(tmp_path / "s2")])
    capsys.readouterr()
    torch.save({"ema": {"head.weight": torch.zeros(3, 3)}}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit):  # a VAR-DD-like file for a LlamaGen teacher
        main(["import-dd1", "--dd1", str(tmp_path / "bad.pt"), "--teacher", str(tmp_path / "lg" / "teacher"),
              "--run-dir", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert "missing keys" in err and "final_layer_conti.linear.weight" in err and "head.weight" in err
    assert not (tmp_path / "bad" / "final").exists()

    vae = VQVAE(vqvae_config("var-tiny"))
    a = vae.config
    var = VAR(var_args("tiny", vocab_size=a.codebook_size, code_dim=a.code_dim, patch_nums=a.patch_nums,
                       phi_index=a.phi_index), vae.quantize)
    ckpt.save_model(tmp_path / "v" / "tokenizer" / "final", vae, {"kind": "tokenizer", "family": "var",
                                                                  "model": a.to_dict()})
    ckpt.save_model(tmp_path / "v" / "teacher" / "final", var, {"kind": "teacher", "family": "var",
                                                                "model": var.args.to_dict(),
                                                                "tokenizer_dir": "../tokenizer"})
    vdd = VARDD1Generator(var.args, conti_head=True)
    for p in vdd.parameters():
        torch.nn.init.normal_(p, std=0.2)
    sd = {k: v for k, v in vdd.state_dict().items() if k not in ("lvl_1L", "attn_bias_for_masking")}
    torch.save({"trainer": {"ema_parameters": sd}}, tmp_path / "var-dd.pth")
    main(["import-dd1", "--dd1", str(tmp_path / "var-dd.pth"), "--teacher", str(tmp_path / "v" / "teacher"),
          "--run-dir", str(tmp_path / "v" / "dd1")])
    vloaded = load_dd1(tmp_path / "v" / "dd1")[0]
    L = vdd.seq_len
    ids, eps = torch.randint(vdd.vocab_size, (2, L)), torch.randn(2, L, vdd.code_dim)
    clean = clean_mask(torch.tensor([0, 5]), L)
    vdd.codebook_VC.copy_(var.codebook())
    with torch.no_grad():
        torch.testing.assert_close(vloaded(ids, eps, clean, labels), vdd.eval()(ids, eps, clean, labels),
                                   atol=0, rtol=0)


def test_dd1_commands_read_the_cfg_schedule():
    """`dd1 pairs --cfg-schedule linear` makes pairs with VAR's ramp, and `dd1 train` without the flag takes the pairs'
    schedule (the rule must match the manifest's)."""
    from onestep.cli import build_parser
    from onestep.cli.dd1 import _sampling

    p = build_parser()
    pairs = p.parse_args(["dd1", "pairs", "--teacher", "T", "--out", "P", "--cfg-schedule", "linear"])
    assert _sampling(pairs).cfg_schedule == "linear"
    train = p.parse_args(["dd1", "train", "--pairs", "P", "--teacher", "T", "--run-dir", "R"])
    manifest_rule = SamplingConfig(cfg_scale=3.0, cfg_schedule="linear").to_dict()
    assert _sampling(train, manifest_rule) == SamplingConfig(cfg_scale=3.0, cfg_schedule="linear")
