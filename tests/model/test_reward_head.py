"""Scalar (reward / value) head: TP=2 scores and gradients equal TP=1; last-token reading."""

import torch

from megarlhf.algos.ranking import last_token_scores
from megarlhf.model.gpt import GPTModel, stage_param_names
from megarlhf.parallel.state import build_parallel_state
from tests.dist import run_ranks
from tests.model.common import gather_full, reference_model, rel_err, tiny_config


def _scores(rank, world, family):
    torch.manual_seed(0)
    cfg = tiny_config(family, head="scalar", num_head_outputs=2)
    ids = torch.randint(0, cfg.vocab_size, (3, 9))
    weights = torch.randn(3, 9, 2)
    ref = reference_model(cfg)
    (ref(ids) * weights).sum().backward()
    ps = build_parallel_state(tp=world)
    model = GPTModel(cfg, ps, seed=7)
    out = model(ids)
    (out * weights).sum().backward()
    errs = {"scores": rel_err(out, ref(ids))}
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        spec = model.plan[name]
        grad = p.grad if spec is None else gather_full(p.grad, ps.tp_group, spec)
        errs[name] = rel_err(grad, ref_params[name].grad)
    return errs


def test_scalar_head_tp2_equals_tp1():
    for family in ("gpt2", "llama"):
        for rank, errs in enumerate(run_ranks(_scores, 2, family, timeout=120)):
            bad = {k: v for k, v in errs.items() if not v <= 1e-5}
            assert not bad, (family, rank, bad)
            assert "head.weight" in errs


def test_scalar_head_names_and_shapes():
    cfg = tiny_config("llama", head="scalar")
    names = stage_param_names(cfg, 1, 0)
    assert "head.weight" in names and "head.bias" in names and "output.weight" not in names
    out = reference_model(cfg)(torch.randint(0, 100, (2, 5)))
    assert out.shape == (2, 5, 1)


def test_last_token_scores_left_and_right_padding():
    values = torch.arange(12.0).view(2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    assert last_token_scores(values, mask).tolist() == [2.0, 11.0]
    multi = torch.arange(24.0).view(2, 6, 2)
    assert last_token_scores(multi, mask).tolist() == [[4.0, 5.0], [22.0, 23.0]]
