"""The SFT trainer under DeepSpeed gives the same training at every layout.

Two spawned worlds (1 rank and 2 ranks, real gloo) each train several 3-step runs of the tiny
config; the test process then compares what they wrote (metrics.jsonl, final checkpoints read at
any layout) against the 1-rank ZeRO-1 run with micro-batch 4 x accumulation 2, which is itself
checked against an independent plain-torch loop (AdamW, clip_grad_norm_, the same LR schedule):

* ZeRO-0/1/2/3 with DP=2 equal DP=1 for the same global batch (fp32 reduction-order tolerance);
* micro-batch x accumulation combinations (8x1, 4x2, 2x4, and 2x2 per rank at DP=2) agree;
* the global gradient norm at TP=2 and at PP=2 (ZeRO 0, 1, 2; tied embeddings) equals TP=1's, and
  clipping is active in these runs (norm > optim.clip_grad); untied PP=2 with ZeRO-2 too;
* the held-out loss is the same at DP=1 and DP=2;
* bf16 (DeepSpeed bf16, fp32 master weights) follows the fp32 run to bf16 precision.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import run_ranks
from tests.trainers.common import EXT_DIR, QUIET, ROOT, TINY, final_weights, metrics

STEPS = 3
BASE = QUIET + [
    f"sft.max_steps={STEPS}",
    "sft.global_batch_size=0",
    "checkpoint.keep_last=1",
    "optim.warmup_steps=2",
    "optim.weight_decay=0.1",
    # Adam divides by sqrt(v) + eps: an element whose gradient is at the rounding-noise level
    # (1e-9) moves by up to lr either way with eps=1e-8. eps=1e-6 keeps such elements still, so
    # the weights can be compared tightly; normal gradients (~1e-3) are unaffected.
    "optim.eps=1e-6",
]
EVAL = ["sft.eval_files=[data/sft_tiny.jsonl]"]
REFERENCE = "z1_mb4_ga2"
ONE_RANK = {
    REFERENCE: ["deepspeed.zero_stage=1", "sft.micro_batch_size=4", "sft.grad_accum=2", *EVAL],
    "z1_mb8_ga1": ["deepspeed.zero_stage=1", "sft.micro_batch_size=8", "sft.grad_accum=1"],
    "z1_mb2_ga4": ["deepspeed.zero_stage=1", "sft.micro_batch_size=2", "sft.grad_accum=4"],
    "z0_mb4_ga2": ["deepspeed.zero_stage=0", "sft.micro_batch_size=4", "sft.grad_accum=2"],
    "untied_ref": ["deepspeed.zero_stage=1", "sft.micro_batch_size=4", "sft.grad_accum=2",
                   "model.tie_embeddings=false"],
}  # fmt: skip
TWO_RANKS = {
    "z0_dp2": ["deepspeed.zero_stage=0", "sft.micro_batch_size=2", "sft.grad_accum=2"],
    "z1_dp2": ["deepspeed.zero_stage=1", "sft.micro_batch_size=2", "sft.grad_accum=2", *EVAL],
    "z2_dp2": ["deepspeed.zero_stage=2", "sft.micro_batch_size=4", "sft.grad_accum=1"],
    "z3_dp2": ["deepspeed.zero_stage=3", "sft.micro_batch_size=2", "sft.grad_accum=2"],
    "z1_tp2": ["deepspeed.zero_stage=1", "sft.micro_batch_size=4", "sft.grad_accum=2",
               "parallel.tp=2"],
    "z2_pp2": ["deepspeed.zero_stage=2", "sft.micro_batch_size=2", "sft.grad_accum=4",
               "parallel.pp=2"],
    "z1_pp2": ["deepspeed.zero_stage=1", "sft.micro_batch_size=4", "sft.grad_accum=2",
               "parallel.pp=2"],
    "z0_pp2": ["deepspeed.zero_stage=0", "sft.micro_batch_size=4", "sft.grad_accum=2",
               "parallel.pp=2"],
    "untied_z2_pp2": ["deepspeed.zero_stage=2", "sft.micro_batch_size=2", "sft.grad_accum=4",
                      "parallel.pp=2", "model.tie_embeddings=false"],
    "bf16_z2_dp2": ["deepspeed.zero_stage=2", "sft.micro_batch_size=4", "sft.grad_accum=1",
                    "model.dtype=bf16"],
}  # fmt: skip
# fp32, 3 Adam steps: summation order changes the last bits of each gradient, and Adam's
# normalized update turns a relative gradient error e into about lr * e per step.
RTOL, ATOL = 1e-4, 5e-6


def _train_runs(rank: int, world: int, runs: dict, root: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    os.chdir(ROOT)
    from megarlhf.config import load_config
    from megarlhf.config.sft import SFTRunConfig
    from megarlhf.parallel.state import build_parallel_state
    from megarlhf.trainers.sft import SFTTrainer

    for name, overrides in runs.items():
        cfg = load_config(SFTRunConfig, TINY, BASE + overrides)
        ps = build_parallel_state(cfg.parallel.tp, cfg.parallel.pp)
        SFTTrainer(cfg, ps, os.path.join(root, name)).train()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXT_DIR)
    root = tmp_path_factory.mktemp("sft_parallel")
    run_ranks(_train_runs, 1, ONE_RANK, str(root), timeout=300)
    run_ranks(_train_runs, 2, TWO_RANKS, str(root), timeout=400)
    out = {}
    for name in {**ONE_RANK, **TWO_RANKS}:
        recs = metrics(root / name)
        assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), name
        out[name] = {"metrics": recs, "weights": final_weights(root / name)}
    return out


def _assert_same_training(run, ref, rtol=RTOL, atol=ATOL):
    for key in ("loss", "grad_norm", "lr"):
        got = torch.tensor([r[key] for r in run["metrics"]], dtype=torch.float64)
        want = torch.tensor([r[key] for r in ref["metrics"]], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=key)
    assert run["weights"].keys() == ref["weights"].keys()
    for name, w in ref["weights"].items():
        torch.testing.assert_close(run["weights"][name], w, rtol=rtol, atol=atol, msg=name)


def _plain_torch_reference(steps: int):
    """The reference run re-done without DeepSpeed: full batch per step, torch AdamW."""
    from megarlhf.config import load_config
    from megarlhf.config.sft import SFTRunConfig
    from megarlhf.data.loader import build_sft_loader
    from megarlhf.data.tokenizer import load_tokenizer
    from megarlhf.model.gpt import GPTModel
    from megarlhf.optim.schedule import warmup_cosine_lr
    from megarlhf.parallel.state import single_process_state

    cfg = load_config(SFTRunConfig, TINY, BASE + ONE_RANK[REFERENCE])
    tok = load_tokenizer(ROOT / cfg.data.text.tokenizer)
    data = cfg.data
    data.train_files = [str(ROOT / f) for f in data.train_files]
    loader = build_sft_loader(data, tok, micro_batch_size=8, grad_accum=1, dp_rank=0, dp_size=1)
    model = GPTModel(cfg.model, single_process_state(), seed=cfg.sft.loop.seed)
    o = cfg.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay}]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0)
    norms, losses = [], []
    for step in range(steps):
        (mb,) = loader.next_step()
        logits = model(mb["input_ids"], position_ids=mb["position_ids"],
                       segment_ids=mb["segment_ids"])  # fmt: skip
        labels = mb["labels"]
        v = cfg.model.vocab_size
        loss = torch.nn.functional.cross_entropy(
            logits[..., :v].flatten(0, 1), labels.flatten(), ignore_index=-100
        )
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)))
        losses.append(loss.item())
        lr = warmup_cosine_lr(
            step, lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps,
            decay_steps=steps - o.warmup_steps,
        )  # fmt: skip
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, norms, weights


def test_reference_run_equals_plain_torch(runs):
    """DeepSpeed ZeRO-1 with 4x2 accumulation == one 8-row batch through torch AdamW."""
    losses, norms, weights = _plain_torch_reference(STEPS)
    ref = runs[REFERENCE]
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in ref["metrics"]]), torch.tensor(losses), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        torch.tensor([r["grad_norm"] for r in ref["metrics"]]),
        torch.tensor(norms),
        rtol=1e-5,
        atol=0,
    )
    assert min(norms) > 1.0, "clipping (optim.clip_grad=1) must be active for this test to bite"
    for name, w in weights.items():
        torch.testing.assert_close(ref["weights"][name], w, rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("name", ["z0_dp2", "z1_dp2", "z2_dp2", "z3_dp2"])
def test_zero_data_parallel_equals_single_rank(runs, name):
    _assert_same_training(runs[name], runs[REFERENCE])


@pytest.mark.parametrize("name", ["z1_mb8_ga1", "z1_mb2_ga4", "z0_mb4_ga2"])
def test_micro_batch_times_accumulation_gives_the_same_update(runs, name):
    _assert_same_training(runs[name], runs[REFERENCE])


@pytest.mark.parametrize("name", ["z1_tp2", "z0_pp2", "z1_pp2", "z2_pp2"])
def test_global_grad_norm_and_update_across_model_parallel_layouts(runs, name):
    """TP=2 and PP=2 (tied embeddings) clip by the norm of the whole model, as TP=1 does."""
    _assert_same_training(runs[name], runs[REFERENCE])


def test_untied_pipeline_with_zero2_equals_single_rank(runs):
    """Untied: ZeRO-2 keeps its per-micro-batch gradient reduction under the 1F1B schedule."""
    _assert_same_training(runs["untied_z2_pp2"], runs["untied_ref"])


def test_eval_loss_is_layout_independent(runs):
    ref, dp2 = runs[REFERENCE]["metrics"][-1], runs["z1_dp2"]["metrics"][-1]
    assert ref["eval_tokens"] == dp2["eval_tokens"] > 0
    assert ref["eval_loss"] == pytest.approx(dp2["eval_loss"], rel=1e-5)
    assert "eval_loss" not in runs[REFERENCE]["metrics"][0]  # only after the last step


def test_bf16_follows_fp32(runs):
    bf16, ref = runs["bf16_z2_dp2"], runs[REFERENCE]
    for key, rtol in (("loss", 1e-2), ("grad_norm", 5e-2)):
        got = torch.tensor([r[key] for r in bf16["metrics"]])
        want = torch.tensor([r[key] for r in ref["metrics"]])
        torch.testing.assert_close(got, want, rtol=rtol, atol=0, msg=key)
    w = bf16["weights"]["layers.0.mlp.fc1.weight"]
    assert w.dtype == torch.bfloat16
    # Moved like the fp32 run: 3 steps of ~lr each, against differences at bf16 resolution.
    moved = (ref["weights"]["layers.0.mlp.fc1.weight"] - _init("layers.0.mlp.fc1.weight")).abs()
    err = (w.float() - ref["weights"]["layers.0.mlp.fc1.weight"]).abs()
    assert float(err.mean()) < 0.2 * float(moved.mean())


def _init(name: str) -> torch.Tensor:
    from megarlhf.config import load_config
    from megarlhf.config.sft import SFTRunConfig
    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import single_process_state

    cfg = load_config(SFTRunConfig, TINY, BASE)
    model = GPTModel(cfg.model, single_process_state(), seed=cfg.sft.loop.seed)
    return dict(model.named_parameters())[name].detach()
