"""TP=2 and TP=4 forward logits and every parameter gradient equal TP=1 (fp32, rel <= 1e-5)."""

import pytest
import torch
import torch.distributed as dist

from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.mappings import gather_from_tensor_parallel_region
from megarlhf.parallel.state import build_parallel_state
from tests.dist import run_ranks
from tests.model.common import gather_full, reference_model, rel_err, tiny_config


def _loss(logits_full: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # A loss that touches every real logit with a different weight, plus a softmax term.
    real = logits_full[..., : weights.shape[-1]]
    return (real * weights).sum() + real.logsumexp(-1).sum()


def _tp_vs_reference(rank, world, cfg_kw, tp):
    torch.manual_seed(0)
    cfg = tiny_config(**cfg_kw)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    weights = torch.randn(2, 11, cfg.vocab_size)

    ref = reference_model(cfg)
    ref_logits = ref(ids, attention_mask=mask)
    _loss(ref_logits, weights).backward()

    ps = build_parallel_state(tp=tp)
    model = GPTModel(cfg, ps, seed=7)
    logits = gather_from_tensor_parallel_region(model(ids, attention_mask=mask), ps.tp_group)
    _loss(logits, weights).backward()

    errors = {"logits": rel_err(logits[..., : cfg.vocab_size], ref_logits[..., : cfg.vocab_size])}
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        spec = model.plan[name]
        grad = p.grad if spec is None else gather_full(p.grad, ps.tp_group, spec)
        full = p.detach() if spec is None else gather_full(p.detach(), ps.tp_group, spec)
        rp, rg = ref_params[name].detach(), ref_params[name].grad
        if name in ("embedding.word.weight", "output.weight"):
            # Padding depends on TP; only the real vocabulary rows are comparable.
            grad, rg = grad[: cfg.vocab_size], rg[: cfg.vocab_size]
            full, rp = full[: cfg.vocab_size], rp[: cfg.vocab_size]
        errors[name] = rel_err(grad, rg)
        errors["param:" + name] = rel_err(full, rp)
    dist.barrier()
    return errors


CASES = [
    ("gpt2", 2, {}),
    ("gpt2", 4, {}),
    ("llama", 2, {}),  # GQA 8q / 4kv, untied
    ("llama", 4, {"tie_embeddings": True}),
    ("llama", 2, {"num_heads": 6, "num_kv_heads": 3, "hidden_size": 48}),  # uneven 2|1 kv heads
]


@pytest.mark.parametrize(
    "family,tp,extra", CASES, ids=[f"{f}-tp{t}-{i}" for i, (f, t, _) in enumerate(CASES)]
)
def test_tensor_parallel_matches_single_process(family, tp, extra):
    results = run_ranks(_tp_vs_reference, tp, dict(family=family, **extra), tp, timeout=240)
    for rank, errors in enumerate(results):
        bad = {k: v for k, v in errors.items() if not v <= 1e-5}
        assert not bad, f"rank {rank}: relative errors above 1e-5: {bad}"
        assert len(errors) > 10
