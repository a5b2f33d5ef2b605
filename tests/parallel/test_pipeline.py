"""Pipeline schedules equal the single-process run (fp32, rel <= 1e-5).

Layouts: PP=2 (2 ranks); TP=2 x PP=2, PP=4 and PP=2 x DP=2 (one 4-rank world, three layouts built
side by side). Each case compares the loss and every parameter gradient (tied embeddings after
`sync_tied_embedding_grads`) with a TP=1/PP=1 model that sees the whole global batch in one
forward. Micro-batch size x count splits (1x4, 2x2, 4x1; fewer micro-batches than stages on PP=4)
must all reproduce it, forward_only must reproduce the per-token log-probs and leave no gradients,
and a recording model wrapper / backward_fn checks the exact 1F1B order of forwards and backwards
on every stage (hence the bound on micro-batches in flight).

The batch has a left-padded row, an ignored label, a packed row (segment_ids) and explicit
position_ids, so a schedule that forgot to pass those tensors to the later stages would differ
(llama applies RoPE from position_ids at every stage).
"""

import pytest
import torch
import torch.distributed as dist

from megarlhf.model.gpt import GPTModel
from megarlhf.model.masks import positions_from_mask
from megarlhf.parallel.mappings import gather_from_tensor_parallel_region
from megarlhf.parallel.pipeline import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_1f1b,
    get_forward_backward_func,
)
from megarlhf.parallel.state import ParallelState, build_parallel_state, single_process_state
from tests.dist import run_ranks
from tests.model.common import gather_full, reference_model, rel_err, tiny_config

B, S, TOL = 4, 12, 1e-5
SPLITS = [(1, 4), (2, 2), (4, 1)]  # (micro-batch size, number of micro-batches)


def _config(family: str, num_layers: int):
    llama = family == "llama"
    return tiny_config(
        family,
        hidden_size=32,
        num_heads=4,
        num_kv_heads=2 if llama else 0,  # GQA: 2 query heads per kv head
        ffn_hidden_size=48 if llama else 0,
        num_layers=num_layers,
        max_seq_len=16,
    )


def _global_batch(cfg, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    labels[mask == 0] = -100
    labels[2, 5] = -100  # an ignored token mid-sequence
    segment_ids = torch.zeros(B, S, dtype=torch.long)
    segment_ids[3, 7:] = 1  # row 3 packs two samples
    position_ids = positions_from_mask(mask)
    position_ids[3, 7:] = torch.arange(S - 7)
    return dict(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids,
        segment_ids=segment_ids,
        labels=labels,
    )


def _split(batch: dict, mbs: int) -> list[dict]:
    return [{k: v[i : i + mbs] for k, v in batch.items()} for i in range(0, B, mbs)]


def _token_count(pieces: list[dict]) -> int:
    return sum(int((p["labels"] != -100).sum()) for p in pieces)


def _make_loss_fn(vocab: int, n_tokens: int, tp_group):
    """Sum of token NLL / tokens of the global batch; stats carry loss and per-token log-probs."""

    def loss_fn(logits_shard, mb):
        logits = gather_from_tensor_parallel_region(logits_shard, tp_group)[..., :vocab]
        labels = mb["labels"]
        logp = torch.log_softmax(logits.float(), -1)
        tok = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * (labels != -100)
        loss = -tok.sum() / n_tokens
        return loss, {"loss": loss.detach(), "logp": tok.detach()}

    return loss_fn


def _reference(cfg, pieces: list[dict]):
    """Single-process model: summed loss over `pieces` (one backward), its grads, log-probs."""
    model = reference_model(cfg)
    loss_fn = _make_loss_fn(cfg.vocab_size, _token_count(pieces), None)
    total, logps = 0.0, []
    for p in pieces:
        logits = model(
            p["input_ids"],
            attention_mask=p["attention_mask"],
            position_ids=p["position_ids"],
            segment_ids=p["segment_ids"],
        )
        loss, st = loss_fn(logits, p)
        total = total + loss
        logps.append(st["logp"])
    total.backward()
    return total.detach(), dict(model.named_parameters()), logps


class _Recorder:
    """Wraps a stage model like DeepSpeed's engine (`.module`); logs forwards and backwards."""

    def __init__(self, model, ps):
        self.module, self.ps, self.events, self.bad = model, ps, [], []

    def __call__(self, *args, **kwargs):
        self.events.append("F")
        return self.module(*args, **kwargs)

    def backward(self, tensor, grad):
        self.events.append("B")
        if self.ps.is_last_stage and (grad is not None or tensor.numel() != 1):
            self.bad.append(f"last stage got {tuple(tensor.shape)}, grad {grad is not None}")
        if not self.ps.is_last_stage and (grad is None or grad.shape != tensor.shape):
            self.bad.append(f"stage got {tuple(tensor.shape)}, grad {grad}")
        torch.autograd.backward(tensor, grad)


class _Stash:
    """Wraps a stage model and keeps what it returns, to check that outputs are released."""

    def __init__(self, model):
        self.module, self.outputs = model, []

    def __call__(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        self.outputs.append(out)
        return out


def _full(t, spec, ps):
    return t if spec is None or ps.tp_size == 1 else gather_full(t, ps.tp_group, spec)


def _grad_errors(model, ps, cfg, ref_params) -> tuple[dict, list]:
    """Relative error of every local gradient (gathered over TP) against the reference's."""
    errors, covered = {}, []
    for name, p in model.named_parameters():
        ref_name = name
        if name == "output.weight" and cfg.tie_embeddings:
            ref_name = "embedding.word.weight"  # last stage's copy of the tied embedding
        rg = ref_params[ref_name].grad
        if p.grad is None:
            errors[name] = float("inf")
            continue
        grad = _full(p.grad, model.plan[name], ps)
        if name in ("embedding.word.weight", "output.weight"):
            grad, rg = grad[: cfg.vocab_size], rg[: cfg.vocab_size]  # padding depends on TP
        errors[name] = rel_err(grad, rg)
        covered.append(ref_name)
    return errors, covered


def _run_case(ps, cfg, pieces, *, record=False, stash=False, forward_only=False, fn=None) -> dict:
    """Run the schedule on `pieces` (the micro-batches) and compare with the reference."""
    ref_loss, ref_params, ref_logps = _reference(cfg, pieces)
    model = GPTModel(cfg, ps, seed=7)
    rec = _Recorder(model, ps) if record else None
    stash = _Stash(model) if stash else None
    fn = fn or get_forward_backward_func(ps)
    stats = fn(
        model=rec or stash or model,
        micro_batches=pieces,
        loss_fn=_make_loss_fn(cfg.vocab_size, _token_count(pieces), ps.tp_group),
        ps=ps,
        forward_only=forward_only,
        backward_fn=rec.backward if rec else None,
    )
    out = {"rank": ps.rank, "stage": ps.pp_rank, "n_mb": len(pieces), "n_stats": len(stats)}
    out["errors"], out["covered"] = {}, []
    out["ref_names"] = sorted(ref_params)
    if rec:
        out["events"], out["bad"] = "".join(rec.events), rec.bad
    if stash:
        out["output_numels"] = [t.numel() for t in stash.outputs]
    if forward_only:
        out["grads_left"] = [n for n, p in model.named_parameters() if p.grad is not None]
        if ps.is_last_stage:
            for j, (st, ref) in enumerate(zip(stats, ref_logps, strict=True)):
                out["errors"][f"logp{j}"] = rel_err(st["logp"], ref)
        return out
    model.sync_tied_embedding_grads()
    out["errors"], out["covered"] = _grad_errors(model, ps, cfg, ref_params)
    if ps.is_last_stage:
        out["errors"]["loss"] = rel_err(sum(st["loss"] for st in stats), ref_loss)
    return out


def _splits_cases(ps, cfg, batch, tag, splits=SPLITS, record=()) -> dict:
    res = {}
    for mbs, n in splits:
        res[f"{tag}/{mbs}x{n}"] = _run_case(ps, cfg, _split(batch, mbs), record=(mbs, n) in record)
    res[f"{tag}/fwd"] = _run_case(ps, cfg, _split(batch, 2), forward_only=True)
    return res


def _bf16_cast_case(ps, cfg, batch) -> dict:
    """DeepSpeed's bf16 mode: cfg says fp32 but the module was cast to bf16 (loose tolerance)."""
    pieces = _split(batch, 2)
    ref_loss, _, _ = _reference(cfg, pieces)
    model = GPTModel(cfg, ps, seed=7).to(torch.bfloat16)
    stats = forward_backward_pipelining_1f1b(
        model=model,
        micro_batches=pieces,
        loss_fn=_make_loss_fn(cfg.vocab_size, _token_count(pieces), ps.tp_group),
        ps=ps,
    )
    out = {"no_grad": [n for n, p in model.named_parameters() if p.grad is None]}
    if ps.is_last_stage:
        out["loss_rel"] = rel_err(sum(st["loss"] for st in stats), ref_loss)
    return out


def _two_rank_worker(rank, world):
    torch.manual_seed(0)
    ps = build_parallel_state(tp=1, pp=2)
    res = {}
    for family in ("gpt2", "llama"):
        cfg = _config(family, num_layers=3)  # 2 + 1 layers: uneven stages
        batch = _global_batch(cfg, seed=1)
        res.update(_splits_cases(ps, cfg, batch, f"pp2/{family}", record=[(1, 4)]))
    # Micro-batches of different sequence lengths in one global batch.
    cfg = _config("llama", num_layers=3)
    batch = _global_batch(cfg, seed=2)
    ragged = [{k: v[:2] for k, v in batch.items()}, {k: v[2:, :8] for k, v in batch.items()}]
    res["pp2/llama/ragged"] = _run_case(ps, cfg, ragged)
    res["pp2/llama/release"] = _run_case(ps, cfg, _split(batch, 1), stash=True)
    res["bf16"] = _bf16_cast_case(ps, cfg, batch)
    dist.barrier()
    return res


def _four_rank_worker(rank, world):
    torch.manual_seed(0)
    res = {}
    ps = build_parallel_state(tp=2, pp=2)
    for family in ("gpt2", "llama"):
        cfg = _config(family, num_layers=3)
        batch = _global_batch(cfg, seed=3)
        res.update(_splits_cases(ps, cfg, batch, f"tp2pp2/{family}", splits=[(1, 4), (4, 1)]))
    ps = build_parallel_state(tp=1, pp=4)
    for family in ("gpt2", "llama"):
        cfg = _config(family, num_layers=4)
        batch = _global_batch(cfg, seed=4)
        # 4 micro-batches = pp (full warm-up on stage 0); 2 and 1 < pp (truncated warm-up).
        res.update(_splits_cases(ps, cfg, batch, f"pp4/{family}", record=[(1, 4), (2, 2)]))
    ps = build_parallel_state(tp=1, pp=2)  # dp = 2: two pipelines side by side
    cfg = _config("gpt2", num_layers=3)
    batch = _global_batch(cfg, seed=100 + ps.dp_rank)  # each replica its own data
    res[f"pp2dp2/dp{ps.dp_rank}"] = _run_case(ps, cfg, _split(batch, 2))
    dist.barrier()
    return res


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_two_rank_worker, 2, timeout=180)


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(_four_rank_worker, 4, timeout=240)


def _assert_cases(results: list[dict], prefix: str, pp: int) -> None:
    """Every rank's errors <= TOL; the last stage returned stats; the pipeline covers all params."""
    cases = sorted({c for r in results for c in r if c.startswith(prefix)})
    assert cases, f"no case starts with {prefix}"
    for case in cases:
        outs = [r[case] for r in results if case in r]
        for out in outs:
            bad = {k: v for k, v in out["errors"].items() if not v <= TOL}
            assert not bad, f"{case} rank {out['rank']}: relative errors above {TOL}: {bad}"
            if out["stage"] == pp - 1:
                assert out["n_stats"] == out["n_mb"], case
                assert any(k.startswith(("loss", "logp")) for k in out["errors"]), case
            else:
                assert out["n_stats"] == 0, case
            assert not out.get("grads_left"), f"{case}: forward_only left grads"
        if not case.endswith("/fwd"):
            covered = {n for out in outs for n in out["covered"]}
            assert covered == set(outs[0]["ref_names"]), f"{case}: not every parameter compared"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pp2_loss_and_grads_match_single_process(two_ranks, family):
    # 1x4, 2x2, 4x1 splits and forward_only, each against the same reference.
    _assert_cases(two_ranks, f"pp2/{family}/", pp=2)


def test_pp2_micro_batches_of_different_lengths(two_ranks):
    _assert_cases(two_ranks, "pp2/llama/ragged", pp=2)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tp2_pp2_loss_and_grads_match_single_process(four_ranks, family):
    _assert_cases(four_ranks, f"tp2pp2/{family}/", pp=2)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pp4_loss_and_grads_match_including_fewer_micro_batches_than_stages(four_ranks, family):
    _assert_cases(four_ranks, f"pp4/{family}/", pp=4)


def test_pp2_dp2_pipelines_do_not_cross_talk(four_ranks):
    # Each DP replica ran its own batch; each must equal its own single-process reference.
    _assert_cases(four_ranks, "pp2dp2/", pp=2)
    assert {c for r in four_ranks for c in r if c.startswith("pp2dp2/")} == {
        "pp2dp2/dp0",
        "pp2dp2/dp1",
    }


def test_pp2_outputs_released_after_send(two_ranks):
    # Default backward: a non-last stage keeps only the graph of what it sent, not its data.
    _assert_cases(two_ranks, "pp2/llama/release", pp=2)
    first, last = sorted((r["pp2/llama/release"] for r in two_ranks), key=lambda o: o["stage"])
    assert first["output_numels"] == [1] * B
    assert all(n > S for n in last["output_numels"])  # logits are the loss_fn's business


def test_pp2_bf16_module_with_fp32_config(two_ranks):
    outs = [r["bf16"] for r in two_ranks]
    assert all(not o["no_grad"] for o in outs), outs
    losses = [o["loss_rel"] for o in outs if "loss_rel" in o]
    assert len(losses) == 1 and losses[0] < 2e-2, losses


def _expected_order(pp: int, stage: int, n: int) -> str:
    warmup = min(pp - stage - 1, n)
    return "F" * warmup + "FB" * (n - warmup) + "B" * warmup


ORDER_CASES = [("pp2/gpt2/1x4", 2), ("pp4/llama/1x4", 4), ("pp4/gpt2/2x2", 4)]


@pytest.mark.parametrize("case,pp", ORDER_CASES)
def test_1f1b_order_bounds_micro_batches_in_flight(two_ranks, four_ranks, case, pp):
    results = two_ranks if pp == 2 else four_ranks
    n = int(case.split("x")[-1])
    for r in results:
        out = r[case]
        assert out["events"] == _expected_order(pp, out["stage"], n), (case, out["stage"])
        assert not out["bad"], out["bad"]
        in_flight, peak = 0, 0
        for e in out["events"]:
            in_flight += 1 if e == "F" else -1
            peak = max(peak, in_flight)
        assert peak == min(pp - out["stage"], n)


# --------------------------------------------------------------------------- single process


def test_no_pipelining_matches_reference_and_selector_picks_it():
    cfg = _config("llama", num_layers=2)
    batch = _global_batch(cfg, seed=5)
    ps = single_process_state()
    assert get_forward_backward_func(ps) is forward_backward_no_pipelining
    out = _run_case(ps, cfg, _split(batch, 2))
    bad = {k: v for k, v in out["errors"].items() if not v <= TOL}
    assert not bad and "loss" in out["errors"], bad
    direct = _run_case(ps, cfg, _split(batch, 4), fn=forward_backward_pipelining_1f1b)  # pp = 1
    bad = {k: v for k, v in direct["errors"].items() if not v <= TOL}
    assert not bad and "loss" in direct["errors"], bad
    fwd = _run_case(ps, cfg, _split(batch, 1), forward_only=True)
    assert not fwd["grads_left"] and len(fwd["errors"]) == B
    assert all(v <= TOL for v in fwd["errors"].values()), fwd["errors"]


def test_selector_and_argument_errors():
    pp2 = ParallelState(pp_size=2)  # no groups: only argument checks run
    assert get_forward_backward_func(pp2) is forward_backward_pipelining_1f1b
    with pytest.raises(NotImplementedError, match="interleaved"):
        get_forward_backward_func(pp2, schedule="interleaved")
    with pytest.raises(ValueError, match="gpipe"):
        get_forward_backward_func(pp2, schedule="gpipe")
    kw = dict(model=None, loss_fn=None, backward_fn=None)
    with pytest.raises(ValueError, match="pp_size == 1"):
        forward_backward_no_pipelining(micro_batches=[], ps=pp2, **kw)
    with pytest.raises(ValueError, match="non-empty"):
        forward_backward_pipelining_1f1b(micro_batches=[], ps=pp2, **kw)
    with pytest.raises(ValueError, match=r"micro_batches\[0\]"):
        forward_backward_pipelining_1f1b(micro_batches=[{"labels": torch.zeros(1)}], ps=pp2, **kw)


def test_wrong_activation_shape_is_refused_before_sending():
    cfg = _config("gpt2", num_layers=2)
    ps = ParallelState(pp_size=2)  # stage 0 of 2; the error fires before any p2p
    model = GPTModel(cfg, ps, seed=7)

    def truncating(*a, **kw):
        return model(*a, **kw)[:, :-1]

    truncating.module = model
    batch = _split(_global_batch(cfg, seed=6), 2)
    with pytest.raises(RuntimeError, match="next stage expects"):
        forward_backward_pipelining_1f1b(model=truncating, micro_batches=batch, loss_fn=None, ps=ps)
