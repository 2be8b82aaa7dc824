import os

import pytest
import torch

# Tests are sized for 2 cores; keep intra-op threads fixed so timings and results are stable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_gpt():
    """A tiny LlamaGen GPT with random (non-zero) weights and a random codebook, in eval mode."""
    from onestep.teacher.llamagen import GPT, model_args

    torch.manual_seed(0)
    args = model_args("tiny")
    m = GPT(args, codebook=torch.nn.functional.normalize(torch.randn(args.vocab_size, args.code_dim), dim=-1))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.eval()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored afterwards (tiny models on a busy machine gain nothing from more)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_tiny_tokenizer_and_teacher(root):
    """A tiny tokenizer (``root/tok``) and teacher (``root/teacher``), two training steps each, through the CLI."""
    from onestep.cli import main

    main(["train-tokenizer", "--preset", "tiny", "--steps", "2", "--run-dir", str(root / "tok"), "--seed", "1"])
    main(["train-teacher", "--preset", "tiny", "--tokenizer", str(root / "tok"), "--steps", "2",
          "--run-dir", str(root / "teacher"), "--seed", "1"])
    return root
