"""The flow recipe of DD2 (onestep.dd2.flowhead): a generator whose conditional is known in closed form.

What the recipe rests on, tested exactly: row i's logits read the class and eps_<i only; the push-forward of the
noise of position i through the flow map of softmax(l_i) is softmax(l_i) (the generator's conditional given its own
prefix); the loss is the KL between the teacher's conditional at the generated prefix and that closed form; n Jacobi
passes of the teacher give DD1's map exactly. Then the CLI run: train, resume, load, sample.
"""
import json

import pytest
import torch

from onestep.dd1.flow_map import ODEConfig, map_noise_to_tokens, ode_map
from onestep.dd2.flowhead import FLOW_PRESETS, FlowConfig, FlowHeadGenerator, flow_loss, refine
from onestep.teacher.sampling import SamplingConfig, teacher_log_probs

SAMPLING = SamplingConfig(cfg_scale=2.0, top_k=8)


@pytest.fixture
def table_gpt(tiny_gpt):
    """The tiny teacher with a token table (the default bench's layout)."""
    assert tiny_gpt.args.input_embedding == "table"
    return tiny_gpt


def _generator(teacher, prefix_codes: bool) -> FlowHeadGenerator:
    """The generator, with prefix codes under a random per-class prior (so that the codes path is exercised)."""
    gen = FlowHeadGenerator.from_teacher(teacher, prefix_codes=prefix_codes).eval()
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
    gen = FlowHeadGenerator.from_teacher(table_gpt).eval()
    n, C = gen.noise_shape
    g = torch.Generator().manual_seed(2)
    eps, labels = torch.randn(4, n, C, generator=g), torch.tensor([0, 3, 5, 7])
    ode = gen.ode
    loss, logs = flow_loss(gen, table_gpt, SAMPLING, eps, labels, ode, "forward")
    with torch.no_grad():
        log_q = gen.log_probs(eps, labels)
        ids = gen.sample_ids(eps, labels)
        log_p = teacher_log_probs(table_gpt, ids, labels, SAMPLING)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    assert abs(loss.item() - kl.mean().item()) < 1e-5 and abs(logs["kl"] - kl.mean().item()) < 1e-5
    rev, _ = flow_loss(gen, table_gpt, SAMPLING, eps, labels, ode, "reverse")
    q = log_q.exp()
    assert abs(rev.item() - (q * (log_q - log_p.clamp_min(-1e4))).sum(-1).mean().item()) < 1e-4
    # the gradient reaches the generator only through its logits: the prefix (sampled tokens) is a constant
    loss.backward()
    grads = [p.grad for p in gen.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # a generator whose conditionals ARE the teacher's has zero loss: the teacher itself, scored on its own map
    ids_t = map_noise_to_tokens(table_gpt, eps, labels, SAMPLING, ode)
    lp = teacher_log_probs(table_gpt, ids_t, labels, SAMPLING)
    pt = lp.exp()
    assert torch.where(pt > 0, pt * (lp - lp), torch.zeros_like(pt)).sum(-1).abs().max() == 0


def test_n_jacobi_passes_of_the_teacher_give_dd1s_map(table_gpt):
    """From any tokens, pass k fixes position k - 1 for good (its prefix is final): n passes = DD1's map exactly."""
    n, C = table_gpt.seq_len, table_gpt.code_dim
    g = torch.Generator().manual_seed(3)
    eps, labels = torch.randn(5, n, C, generator=g), torch.arange(5)
    ode = ODEConfig(n_steps=32)
    target = map_noise_to_tokens(table_gpt, eps, labels, SAMPLING, ode)
    start = torch.randint(table_gpt.vocab_size, (5, n), generator=g)
    assert torch.equal(refine(start, eps, labels, table_gpt, SAMPLING, n, ode), target)
    two = refine(start, eps, labels, table_gpt, SAMPLING, 2, ode)
    assert torch.equal(two[:, :2], target[:, :2])


def test_config_checks():
    with pytest.raises(ValueError, match="divergence"):
        FlowConfig(divergence="js")
    with pytest.raises(ValueError, match="ode_steps"):
        FlowConfig(ode_steps=1)
    with pytest.raises(ValueError, match="s_min < s_max"):
        FlowConfig(ode_s_min=2.0, ode_s_max=1.0)
    cb = torch.tensor([[0.0], [1.0], [3.0]])
    assert (FlowConfig().ode(cb).s_min, FlowConfig().ode(cb).s_max) == pytest.approx((0.2, 5.0))  # codebook_grid
    assert FlowConfig(ode_s_max=9.0).ode(cb).s_max == 9.0 and FlowConfig(ode_s_max=9.0).ode(cb).solver == "ab2log"
    assert FlowConfig(ode_s_min=3.0).ode(cb).s_min == 3.0  # one end given, the other from the codebook
    with pytest.raises(ValueError, match="solver"):
        FlowConfig(ode_solver="rk4")
    with pytest.raises(ValueError, match="needs prefix_codes"):
        FlowConfig(prefix_ode_steps=4)
    with pytest.raises(ValueError, match="at least 2"):
        FlowConfig(prefix_codes=True, prefix_ode_steps=1)


def test_flow_run_trains_resumes_and_samples(tmp_path):
    """`onestep dd2 flow` on a tiny trained teacher: a run that resumes (through `onestep dd2 train`, whose default
    recipe it is), refuses a changed config, and samples with 1 and 3 steps through the API (the same images as a
    second load); the same with prefix codes."""
    import onestep
    from onestep.cli import main
    from tests.conftest import train_tiny_tokenizer_and_teacher

    train_tiny_tokenizer_and_teacher(tmp_path)
    run = tmp_path / "flow"
    main(["dd2", "flow", "--teacher", str(tmp_path / "teacher"), "--run-dir", str(run), "--preset", "tiny"])
    cfg = json.loads((run / "final" / "config.json").read_text())
    assert cfg["kind"] == "dd2-generator" and cfg["recipe"] == "flow" and cfg["model"]["generator"] == "flow-head"
    assert json.loads((run / "metrics.json").read_text())["cpu_time_s"] > 0
    main(["dd2", "train", "--teacher", str(tmp_path / "teacher"), "--run-dir", str(run), "--preset", "tiny",
          "--steps", "3", "--extend"])  # grows the run by one step
    assert json.loads((run / "final" / "config.json").read_text())["flow"]["steps"] == 3
    with pytest.raises(SystemExit):  # the CLI's one-line error: "... holds a run with a different config (flow.lr ...)"
        main(["dd2", "flow", "--teacher", str(tmp_path / "teacher"), "--run-dir", str(run), "--preset", "tiny",
              "--steps", "3", "--lr", "5e-4"])
    gen = onestep.load(run)
    one, three = gen.sample([0, 1], steps=1, seed=0), gen.sample([0, 1], steps=3, seed=0)
    assert one.dtype == torch.uint8 and one.shape == three.shape
    assert torch.equal(one, onestep.load(run).sample([0, 1], steps=1, seed=0))
    coded = tmp_path / "flow-codes"  # with prefix codes: the running marginal is saved and loaded with the weights
    main(["dd2", "train", "--teacher", str(tmp_path / "teacher"), "--run-dir", str(coded), "--preset", "tiny",
          "--prefix-codes", "--prefix-ode-steps", "3"])
    from onestep.dd2.flowhead import load_flow

    net = load_flow(coded)[0]
    assert net.prefix_codes and not torch.allclose(net.prior, net.prior[..., :1])  # the marginal moved off uniform
    assert net.prefix_ode.n_steps == 3 and net.ode.n_steps == FLOW_PRESETS["tiny"].ode_steps == 4
    gen = onestep.load(coded)
    assert torch.equal(gen.sample([0, 1], steps=1, seed=0), onestep.load(coded).sample([0, 1], steps=1, seed=0))


@pytest.mark.parametrize("argv, message", [
    ([], "needs --teacher"),
    (["--teacher", "T", "--guidance-lr", "1e-4"], "--guidance-lr: the CSD recipe's flags"),
    (["--recipe", "flow", "--tune", "B"], "--tune is the CSD recipe's input"),
    (["--tune", "B", "--teacher", "T"], "reads --tune"),
    (["--tune", "B", "--divergence", "reverse"], "--divergence is the flow recipe's flag"),
    (["--tune", "B", "--prefix-codes"], "--prefix-codes is the flow recipe's flag"),
    (["--tune", "B", "--cfg-scale", "3"], "stage-1 run's sampling rule"),
])
def test_train_recipe_is_flow_by_default_and_refuses_the_other_recipes_flags(tmp_path, capsys, argv, message):
    """`onestep dd2 train` runs the flow recipe from --teacher, CSD from --tune; a flag of the other recipe is a
    one-line error before anything is written."""
    from onestep.cli import main

    with pytest.raises(SystemExit):
        main(["dd2", "train", "--run-dir", str(tmp_path / "r"), *argv])
    assert message in capsys.readouterr().err and not (tmp_path / "r").exists()
