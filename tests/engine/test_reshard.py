"""Hybrid-engine re-sharding: the generation copy equals the single-process model exactly and
generates what it generates; training -> generation -> training is bitwise lossless."""

import zlib

import pytest
import torch

from megarlhf.config import GenerationConfig
from megarlhf.engine.reshard import VOCAB_PARAMS, reshard_weights, source_name
from megarlhf.model.generation import generate
from megarlhf.model.gpt import GPTModel, sharding_plan
from megarlhf.parallel.sharding import shard_tensor
from megarlhf.parallel.state import build_parallel_state
from tests.dist import run_ranks
from tests.model.common import reference_model, tiny_config

PROMPTS = (
    torch.tensor([[0, 0, 5, 17, 33], [44, 3, 9, 9, 1]]),
    torch.tensor([[0, 0, 1, 1, 1], [1] * 5]),
)
GEN = GenerationConfig(max_new_tokens=8, temperature=0.9, top_k=30, seed=5)


def _worker(rank, world, family, tp_t, pp_t, tp_g):
    cfg = tiny_config(family, num_layers=4)
    train_ps = build_parallel_state(tp=tp_t, pp=pp_t)
    gen_ps = build_parallel_state(tp=tp_g, pp=1)
    train = GPTModel(cfg, train_ps, seed=7)
    gen = GPTModel(cfg, gen_ps, skip_init=True)
    reshard_weights(train, gen)
    gen_params = {n: p.detach().clone() for n, p in gen.named_parameters()}
    out = generate(gen, *PROMPTS, GEN, eos_id=None, pad_id=0)
    with torch.no_grad():  # round trip of weights no fresh init could produce
        for name, p in train.named_parameters():
            # Seeded by the tensor it mirrors, so tied embedding copies stay equal (as in training).
            seed = zlib.crc32(source_name(name, cfg).encode())
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
            if name in VOCAB_PARAMS:  # vocabulary padding rows stay zero, as in training
                rows = torch.arange(p.shape[0]) + train_ps.tp_rank * p.shape[0]
                p[rows >= cfg.vocab_size] = 0.0
    before = {n: p.detach().clone() for n, p in train.named_parameters()}
    reshard_weights(train, gen)
    with torch.no_grad():
        for p in train.parameters():
            p.zero_()
    reshard_weights(gen, train)
    lossless = all(torch.equal(before[n], p) for n, p in train.named_parameters())
    return lossless, gen_params, gen_ps.tp_rank, out.responses, out.logprobs


CASES = [("gpt2", t, p, g) for t, p in ((2, 1), (1, 2), (2, 2)) for g in (1, 2)]
CASES += [("llama", 2, 2, 1), ("llama", 1, 2, 2)]  # GQA, untied


@pytest.mark.parametrize("family,tp_t,pp_t,tp_g", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_reshard_train_to_generation(family, tp_t, pp_t, tp_g):
    cfg = tiny_config(family, num_layers=4)
    ref = reference_model(cfg)
    expect = generate(ref, *PROMPTS, GEN, eos_id=None, pad_id=0)
    ref_params = dict(ref.named_parameters())
    plan = sharding_plan(cfg, tp_g)
    for lossless, gen_params, tp_rank, responses, logprobs in run_ranks(
        _worker, 4, family, tp_t, pp_t, tp_g, timeout=180
    ):
        assert lossless, "training -> generation -> training changed a weight"
        for name, p in gen_params.items():
            full = ref_params[name].detach()
            if name in VOCAB_PARAMS:  # re-pad the reference for the generation TP size
                full = full[: cfg.vocab_size]
                pad = p.shape[0] * tp_g - cfg.vocab_size
                full = torch.nn.functional.pad(full, (0, 0, 0, pad))
            assert torch.equal(p, shard_tensor(full, plan[name], tp_rank)), name
        assert responses.tolist() == expect.responses.tolist()
        assert (logprobs - expect.logprobs).abs().max() <= 1e-5
