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
