"""MapKD (onestep.mapkd), the project's own method: a generator whose conditional is known in closed form.

What the method rests on, tested exactly: row i's logits read the class and eps_<i only; the push-forward of the
noise of position i through the flow map of softmax(l_i) is softmax(l_i) (the generator's conditional given its own
prefix); the loss is the KL between the teacher's conditional at the generated prefix and that closed form; n Jacobi
passes of the teacher give DD1's map exactly. Then the CLI run: train, resume, load, sample.
"""
import json

import pytest
import torch

from onestep.flow_map import ODEConfig, map_noise_to_tokens, ode_map
from onestep.mapkd.generator import MapKDGenerator
from onestep.mapkd.train import MAPKD_PRESETS, MapKDConfig, mapkd_loss
from onestep.multistep import alg4, jacobi
from onestep.teacher.sampling import SamplingConfig, teacher_log_probs

SAMPLING = SamplingConfig(cfg_scale=2.0, top_k=8)


@pytest.fixture
def table_gpt(tiny_gpt):
    """The tiny teacher with a token table (the default bench's layout)."""
    assert tiny_gpt.args.input_embedding == "table"
    return tiny_gpt


def _generator(teacher, prefix_codes: bool) -> MapKDGenerator:
    """The generator, with prefix codes under a random per-class prior (so that the codes path is exercised)."""
    gen = MapKDGenerator.from_teacher(teacher, prefix_codes=prefix_codes).eval()
    if prefix_codes:
        gen.prior.copy_(torch.softmax(3 * torch.randn(gen.prior.shape, generator=torch.Generator().manual_seed(5)), -1))
    return gen


@pytest.mark.parametrize("prefix_codes", [False, True])
def test_row_i_reads_the_class_and_the_noise_of_earlier_positions_only(table_gpt, prefix_codes):
    gen = _generator(table_gpt, prefix_codes)
    n, C = gen.noise_shape
    g = torch.Generator().manual_seed(0)
    eps, labels = torch.randn(3, n, C, generator=g), torch.tensor([0, 1, 2])
    with torch.no_grad():
        base = gen.log_probs(eps, labels)
        for j in (0, n // 2, n - 1):
            moved = eps.clone()
            moved[:, j] += 1.0
            out = gen.log_probs(moved, labels)
            assert torch.allclose(out[:, : j + 1], base[:, : j + 1], atol=1e-5)  # rows <= j do not see eps_j
            if j < n - 1:
                assert (out[:, j + 1:] - base[:, j + 1:]).abs().max() > 1e-3  # later rows do
        other = gen.log_probs(eps, torch.tensor([3, 1, 2]))
        assert (other[0] - base[0]).abs().max() > 1e-3 and torch.allclose(other[1:], base[1:], atol=1e-5)


@pytest.mark.parametrize("prefix_codes", [False, True])
def test_the_generators_conditional_is_softmax_of_its_logits(table_gpt, prefix_codes):
    """Fix the prefix noise eps_<i, redraw eps_i: the tokens at position i follow softmax(l_i) (push-forward of the
    flow map, method.md section 1), up to the sampling error of 40k draws."""
    gen = _generator(table_gpt, prefix_codes)
    n, C = gen.noise_shape
    g = torch.Generator().manual_seed(1)
    N, i = 40000, 5
    eps = torch.randn(1, n, C, generator=g).expand(N, n, C).clone()
    eps[:, i] = torch.randn(N, C, generator=g)
    labels = torch.full((N,), 4)
    with torch.no_grad():  # row i is the same for every draw (it does not read eps_i: the test above)
        log_q = gen.log_probs(eps[:64], labels[:64])[:, i]
    assert torch.allclose(log_q, log_q[:1].expand_as(log_q), atol=1e-5)
    ids = ode_map(eps[:, i], log_q[:1].expand(N, -1), gen.codebook(), gen.ode)  # sample_ids at position i
    q = log_q[0].exp()
    freq = torch.bincount(ids, minlength=q.numel()).double() / N
    tv = 0.5 * (freq - q.double()).abs().sum().item()
    assert tv < 0.02, tv


def test_top_k_draws_from_the_k_most_likely_codes(table_gpt):
    """With ``top_k`` the map draws from softmax(l_i) truncated to its k most likely codes: the ids are DD1's map
    under the truncated conditional; the knob is saved in the config (absent when 0, as in older runs)."""
    gen = MapKDGenerator.from_teacher(table_gpt, top_k=3).eval()
    n, C = gen.noise_shape
    eps, labels = torch.randn(8, n, C, generator=torch.Generator().manual_seed(9)), torch.arange(8)
    with torch.no_grad():
        log_q = gen.log_probs(eps, labels)
        kth = log_q.topk(3, -1).values[..., -1:]
        ids = gen.sample_ids(eps, labels)
    assert torch.equal(ids, ode_map(eps, log_q.masked_fill(log_q < kth, float("-inf")), gen.codebook(), gen.ode))
    assert (log_q.gather(-1, ids[..., None]) >= kth).all()
    assert gen.config()["top_k"] == 3 and MapKDGenerator.from_config(gen.config(), table_gpt).top_k == 3
    assert "top_k" not in MapKDGenerator.from_teacher(table_gpt).config()
    with pytest.raises(ValueError, match="top_k"):
        MapKDGenerator.from_teacher(table_gpt, top_k=-1)


def test_prefix_codes_are_the_map_under_the_running_marginal(table_gpt):
    """With prefix codes, row i also reads the teacher's embedding of the code DD1's map gives eps_j (j < i) under the
    prior of the class at position j; a training forward moves the prior of each class in the batch toward the batch's
    mean softmax(l) (an EMA), and leaves the other classes' prior as it was."""
    gen = _generator(table_gpt, True)
    n, C = gen.noise_shape
    eps, labels = torch.randn(4, n, C, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 0, 1, 1])
    assert torch.equal(gen.code_embed.weight, table_gpt.tok_embeddings.weight)  # initialised from the teacher's table
    with torch.no_grad():
        codes = ode_map(eps, gen.prior[labels].log(), gen.codebook(), gen.ode)
        moved = eps.clone()
        moved[:, 2] = gen.codebook()[codes[:, 2]] * 50  # deep inside code codes_2's cell: the same code
        assert torch.equal(ode_map(moved, gen.prior[labels].log(), gen.codebook(), gen.ode), codes)
        gen.code_embed.weight.add_(torch.randn(gen.code_embed.weight.shape, generator=torch.Generator().manual_seed(3)))
        a, b = gen.log_probs(eps, labels), gen.log_probs(moved, labels)
        assert torch.allclose(a[:, :3], b[:, :3], atol=1e-5) and (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3
        before = gen.prior.clone()
        log_q = gen.train().log_probs(eps, labels)
        d = gen.PRIOR_DECAY
        for y in (0, 1):
            want = d * before[y] + (1 - d) * log_q[labels == y].exp().mean(0)
            assert torch.allclose(gen.prior[y], want, atol=1e-6)
        assert torch.equal(gen.prior[2:], before[2:])


def test_loss_is_the_kl_from_the_teachers_conditional_at_the_generated_prefix(table_gpt):
    gen = MapKDGenerator.from_teacher(table_gpt).eval()
    n, C = gen.noise_shape
    g = torch.Generator().manual_seed(2)
    eps, labels = torch.randn(4, n, C, generator=g), torch.tensor([0, 3, 5, 7])
    ode = gen.ode
    loss, logs = mapkd_loss(gen, table_gpt, SAMPLING, eps, labels, ode, 0.0)
    with torch.no_grad():
        log_q = gen.log_probs(eps, labels)
        ids = gen.sample_ids(eps, labels)
        log_p = teacher_log_probs(table_gpt, ids, labels, SAMPLING)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    assert abs(loss.item() - kl.mean().item()) < 1e-5 and abs(logs["kl"] - kl.mean().item()) < 1e-5
    rev, rlogs = mapkd_loss(gen, table_gpt, SAMPLING, eps, labels, ode, 1.0)
    q = log_q.exp()
    rkl = (q * (log_q - log_p.clamp_min(-1e4))).sum(-1).mean().item()
    assert abs(rev.item() - rkl) < 1e-4 and abs(rlogs["reverse_kl"] - rkl) < 1e-4
    # the mixture is the weighted sum of the two: w = 0.5 is half the Jeffreys divergence
    mix, _ = mapkd_loss(gen, table_gpt, SAMPLING, eps, labels, ode, 0.25)
    assert abs(mix.item() - (0.75 * kl.mean().item() + 0.25 * rkl)) < 1e-4
    # the gradient reaches the generator only through its logits: the prefix (sampled tokens) is a constant
    loss.backward()
    grads = [p.grad for p in gen.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # a generator whose conditionals ARE the teacher's has zero loss: the teacher itself, scored on its own map
    ids_t = map_noise_to_tokens(table_gpt, eps, labels, SAMPLING, ode)
    lp = teacher_log_probs(table_gpt, ids_t, labels, SAMPLING)
    pt = lp.exp()
    assert torch.where(pt > 0, pt * (lp - lp), torch.zeros_like(pt)).sum(-1).abs().max() == 0


def test_the_reverse_weight_follows_the_divergence_and_its_schedule():
    assert MapKDConfig().reverse_weight_at(7) == 0.0
    assert MapKDConfig(divergence="reverse").reverse_weight_at(7) == 1.0
    assert MapKDConfig(divergence="mixture", reverse_weight=0.3).reverse_weight_at(7) == 0.3
    sched = MapKDConfig(steps=11, divergence="mixture", reverse_weight=0.0, reverse_weight_end=1.0)
    assert [sched.reverse_weight_at(k) for k in (0, 5, 10)] == [0.0, 0.5, 1.0]


def test_n_jacobi_passes_of_the_teacher_give_dd1s_map(table_gpt):
    """From any tokens, pass k fixes position k - 1 for good (its prefix is final): n passes = DD1's map exactly."""
    n, C = table_gpt.seq_len, table_gpt.code_dim
    g = torch.Generator().manual_seed(3)
    eps, labels = torch.randn(5, n, C, generator=g), torch.arange(5)
    ode = ODEConfig(n_steps=32)
    target = map_noise_to_tokens(table_gpt, eps, labels, SAMPLING, ode)
    start = torch.randint(table_gpt.vocab_size, (5, n), generator=g)
    assert torch.equal(jacobi(start, eps, labels, table_gpt, SAMPLING, n + 1, ode), target)  # 1 step + n passes
    two = jacobi(start, eps, labels, table_gpt, SAMPLING, 3, ode)
    assert torch.equal(two[:, :2], target[:, :2])


def test_alg4_resamples_only_the_last_ar_steps(table_gpt):
    """Algorithm 4 with k steps keeps the one-step tokens of every AR step but the last k - 1, and with the same
    generator state draws what the teacher's own sampler draws from that prefix."""
    from onestep.teacher.sampling import sample_tokens

    n = table_gpt.seq_len
    g = torch.Generator().manual_seed(4)
    start, labels = torch.randint(table_gpt.vocab_size, (3, n), generator=g), torch.arange(3)
    out = alg4(start, labels, table_gpt, SAMPLING, 4, torch.Generator().manual_seed(9))
    assert torch.equal(out[:, :n - 3], start[:, :n - 3])
    ref = sample_tokens(table_gpt, labels, SAMPLING, torch.Generator().manual_seed(9), prefix=start, start_step=n - 3)
    assert torch.equal(out, ref)
    assert torch.equal(alg4(start, labels, table_gpt, SAMPLING, 1), start)


def test_config_checks():
    with pytest.raises(ValueError, match="divergence"):
        MapKDConfig(divergence="js")
    with pytest.raises(ValueError, match="reverse_weight"):
        MapKDConfig(divergence="mixture", reverse_weight=1.5)
    with pytest.raises(ValueError, match="needs divergence='mixture'"):
        MapKDConfig(reverse_weight_end=1.0)
    with pytest.raises(ValueError, match="ode_steps"):
        MapKDConfig(ode_steps=1)
    with pytest.raises(ValueError, match="s_min < s_max"):
        MapKDConfig(ode_s_min=2.0, ode_s_max=1.0)
    cb = torch.tensor([[0.0], [1.0], [3.0]])
    assert (MapKDConfig().ode(cb).s_min, MapKDConfig().ode(cb).s_max) == pytest.approx((0.2, 5.0))  # codebook_grid
    assert MapKDConfig(ode_s_max=9.0).ode(cb).s_max == 9.0 and MapKDConfig(ode_s_max=9.0).ode(cb).solver == "ab2log"
    assert MapKDConfig(ode_s_min=3.0).ode(cb).s_min == 3.0  # one end given, the other from the codebook
    with pytest.raises(ValueError, match="solver"):
        MapKDConfig(ode_solver="rk4")
    with pytest.raises(ValueError, match="needs prefix_codes"):
        MapKDConfig(prefix_ode_steps=4)
    with pytest.raises(ValueError, match="at least 2"):
        MapKDConfig(prefix_codes=True, prefix_ode_steps=1)


def test_mapkd_run_trains_resumes_and_samples(tmp_path):
    """`onestep mapkd train` on a tiny trained teacher: a run that resumes, refuses a changed config, and samples with
    1 and 3 steps (Jacobi, the default, and Alg. 4) through the API (the same images as a second load); the same with
    prefix codes."""
    import onestep
    from onestep.cli import main
    from tests.conftest import train_tiny_tokenizer_and_teacher

    train_tiny_tokenizer_and_teacher(tmp_path)
    run = tmp_path / "mapkd"
    main(["mapkd", "train", "--teacher", str(tmp_path / "teacher"), "--run-dir", str(run), "--preset", "tiny"])
    cfg = json.loads((run / "final" / "config.json").read_text())
    assert cfg["kind"] == "mapkd" and cfg["model"]["generator"] == "mapkd" and cfg["mapkd"]["steps"] == 2
    assert json.loads((run / "metrics.json").read_text())["cpu_time_s"] > 0
    main(["mapkd", "train", "--teacher", str(tmp_path / "teacher"), "--run-dir", str(run), "--preset", "tiny",
          "--steps", "3", "--extend"])  # grows the run by one step
    assert json.loads((run / "final" / "config.json").read_text())["mapkd"]["steps"] == 3
    with pytest.raises(SystemExit):  # the CLI's one-line error: "... holds a run with a different config (mapkd.lr ...)"
        main(["mapkd", "train", "--teacher", str(tmp_path / "teacher"), "--run-dir", str(run), "--preset", "tiny",
              "--steps", "3", "--lr", "5e-4"])
    gen = onestep.load(run)
    assert gen.method == "mapkd"
    one, three = gen.sample([0, 1], steps=1, seed=0), gen.sample([0, 1], steps=3, seed=0)
    alg = gen.sample([0, 1], steps=3, seed=0, multistep="alg4")
    assert one.dtype == torch.uint8 and one.shape == three.shape == alg.shape
    assert torch.equal(one, onestep.load(run).sample([0, 1], steps=1, seed=0))
    with pytest.raises(ValueError, match="does not apply"):
        gen.sample([0, 1], steps=3, multistep="dd1")
    coded = tmp_path / "mapkd-codes"  # with prefix codes: the running marginal is saved and loaded with the weights
    main(["mapkd", "train", "--teacher", str(tmp_path / "teacher"), "--run-dir", str(coded), "--preset", "tiny",
          "--prefix-codes", "--prefix-ode-steps", "3"])
    from onestep.mapkd.sampling import load_mapkd

    net = load_mapkd(coded)[0]
    assert net.prefix_codes and not torch.allclose(net.prior, net.prior[..., :1])  # the marginal moved off uniform
    assert net.prefix_ode.n_steps == 3 and net.ode.n_steps == MAPKD_PRESETS["tiny"].ode_steps == 4
    gen = onestep.load(coded)
    assert torch.equal(gen.sample([0, 1], steps=1, seed=0), onestep.load(coded).sample([0, 1], steps=1, seed=0))
    topk = tmp_path / "mapkd-topk"  # the generator samples under the top-k of the rule it is trained under
    main(["mapkd", "train", "--teacher", str(tmp_path / "teacher"), "--run-dir", str(topk), "--preset", "tiny",
          "--top-k", "5"])
    assert load_mapkd(topk)[0].top_k == 5
    _check_the_older_names_load(run, tmp_path / "old")


def _check_the_older_names_load(run, old):
    """A MapKD run written before the method had its name (kind "dd2-generator", generator "flow-head", section
    "flow") loads as MapKD, with the same images as the run under the current names; DD2's loader refuses it."""
    import shutil

    import onestep

    shutil.copytree(run / "final", old / "final")
    cfg = json.loads((old / "final" / "config.json").read_text())
    cfg = {**{k: v for k, v in cfg.items() if k != "mapkd"}, "kind": "dd2-generator", "stage": "dd2-flow",
           "recipe": "flow", "flow": cfg["mapkd"], "model": {**cfg["model"], "generator": "flow-head"}}
    (old / "final" / "config.json").write_text(json.dumps(cfg))
    gen = onestep.load(old)
    assert gen.method == "mapkd"
    assert torch.equal(gen.sample([0, 1], seed=0), onestep.load(run).sample([0, 1], seed=0))
    with pytest.raises(ValueError, match="is a mapkd run"):
        onestep.load(old, method="dd2")


@pytest.mark.parametrize("argv", [
    ["dd2", "train", "--teacher", "T"],                    # DD2's stage 2 reads a stage-1 run, not a teacher
    ["dd2", "train", "--tune", "B", "--divergence", "reverse"],  # MapKD's flag
    ["dd2", "train", "--tune", "B", "--cfg-scale", "3"],  # the rule is stage 1's
    ["dd2", "flow", "--teacher", "T"],                     # MapKD has its own group
    ["mapkd", "train", "--teacher", "T", "--tune", "B"],   # DD2's flag
])
def test_each_method_has_its_own_command_group(tmp_path, capsys, argv):
    """`onestep dd2 ...` is the paper's recipe and `onestep mapkd train` the own method: a flag of the other is a
    usage error before anything is written."""
    from onestep.cli import main

    with pytest.raises(SystemExit):
        main([*argv, "--run-dir", str(tmp_path / "r")])
    assert "error" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_the_mixture_weight_flags_take_the_closed_unit_interval(capsys):
    """A schedule may start from the forward KL (w = 0); a weight outside [0, 1] is a one-line usage error."""
    from onestep.cli import build_parser

    a = build_parser().parse_args(["mapkd", "train", "--teacher", "T", "--divergence", "mixture",
                                   "--reverse-weight", "0", "--reverse-weight-end", "0.5"])
    assert (a.reverse_weight, a.reverse_weight_end) == (0.0, 0.5)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mapkd", "train", "--teacher", "T", "--reverse-weight", "1.5"])
    assert "must lie in [0, 1], got 1.5" in capsys.readouterr().err
