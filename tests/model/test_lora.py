"""LoRA in one process: adapters off equal the base bitwise, merged weights equal the adapted
forward, what trains (and reaches the optimizer), layout-independent initialization, config
validation, and dropout on the adapter input only."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megarlhf.config import ConfigError
from megarlhf.config.model import LoRAConfig
from megarlhf.engine.reshard import reshard_weights
from megarlhf.model.gpt import GPTModel, init_full_parameter, lora_sharding_plan
from megarlhf.model.lora import (
    AdaptersOffReference,
    adapters_disabled,
    base_config,
    has_adapters,
    merge_full,
)
from megarlhf.optim.adamw import param_groups
from megarlhf.parallel.sharding import shard_tensor
from megarlhf.parallel.state import single_process_state
from tests.model.common import rel_err, tiny_config

LORA = LoRAConfig(rank=4, alpha=8.0)


def lora_config(family: str, lora: LoRAConfig = LORA, **kw):
    return tiny_config(family, lora=lora, **kw)


@torch.no_grad()
def randomize_adapters(model: GPTModel, seed: int = 5) -> None:
    """Give every B a layout-independent non-zero value (B starts at 0, which would hide bugs):
    each full B from its own generator, sharded by the model's plan."""
    for name, p in model.named_parameters():
        if name.endswith(".lora.b"):
            spec = model.plan[name]
            shape = list(p.shape)
            if spec is not None:
                shape[spec.dim] = spec.full_size
            g = torch.Generator().manual_seed(seed + len(name) * 131 + int(name.split(".")[1]))
            full = torch.randn(shape, generator=g) * 0.05
            p.copy_(shard_tensor(full, spec, model.ps.tp_rank))


def _ids(cfg, b=2, s=9):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, :2] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapters_off_is_the_base_bitwise(family):
    cfg = lora_config(family)
    base = GPTModel(base_config(cfg), single_process_state(), seed=3)
    model = GPTModel(cfg, single_process_state(), seed=3)
    ids, mask = _ids(cfg)
    # B = 0 at initialization: the adapted model starts as the base, bitwise.
    assert torch.equal(model(ids, attention_mask=mask), base(ids, attention_mask=mask))
    randomize_adapters(model)
    adapted = model(ids, attention_mask=mask)
    assert not torch.allclose(adapted, base(ids, attention_mask=mask))
    with adapters_disabled(model) as m:
        assert torch.equal(m(ids, attention_mask=mask), base(ids, attention_mask=mask))
    assert torch.equal(model(ids, attention_mask=mask), adapted)  # restored
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("restored on errors too")
    assert torch.equal(model(ids, attention_mask=mask), adapted)


def test_reference_view_uses_eval_mode_and_restores():
    cfg = lora_config("gpt2", hidden_dropout=0.3)
    model = GPTModel(cfg, single_process_state(), seed=3)
    base = GPTModel(base_config(cfg), single_process_state(), seed=3).eval()
    randomize_adapters(model)
    model.train(True)
    ids, _ = _ids(cfg)
    ref = AdaptersOffReference(model)
    with torch.no_grad(), ref.use() as m:
        assert not m.training
        assert torch.equal(m(ids), base(ids))
    assert model.training and all(mod.enabled for mod in model.modules() if hasattr(mod, "a"))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        AdaptersOffReference(base)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merged_weights_equal_the_adapted_forward(family):
    """reshard_weights into a model without adapters merges W + (alpha / r) B A."""
    cfg = lora_config(family)
    model = GPTModel(cfg, single_process_state(), seed=3)
    randomize_adapters(model)
    merged = GPTModel(base_config(cfg), single_process_state(), skip_init=True)
    reshard_weights(model, merged)
    assert not has_adapters(merged)
    ids, mask = _ids(cfg)
    with torch.no_grad():
        want, got = model(ids, attention_mask=mask), merged(ids, attention_mask=mask)
    real = slice(0, cfg.vocab_size)
    assert rel_err(got[..., real], want[..., real]) < 1e-5
    # By hand for one weight: W + scale * B A.
    params = dict(model.named_parameters())
    w = "layers.1.mlp.fc2"
    expect = params[f"{w}.weight"] + LORA.scale * params[f"{w}.lora.b"] @ params[f"{w}.lora.a"]
    assert torch.allclose(dict(merged.named_parameters())[f"{w}.weight"], expect, atol=1e-6)
    assert torch.equal(
        merge_full(params[f"{w}.weight"], params[f"{w}.lora.a"], params[f"{w}.lora.b"], 2.0),
        dict(merged.named_parameters())[f"{w}.weight"],
    )


def test_only_adapters_train_and_reach_the_optimizer():
    cfg = lora_config("llama", lora=LoRAConfig(rank=2, target_modules=["qkv", "fc2"]))
    model = GPTModel(cfg, single_process_state(), seed=3)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(lora_sharding_plan(cfg, 1))
    assert {n.split(".")[3] for n in trainable} == {"qkv", "fc2"}
    in_groups = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert in_groups == {id(p) for n, p in model.named_parameters() if n in trainable}
    # A reward model / critic also trains its fresh scalar head (PEFT's modules_to_save).
    rm = GPTModel(dataclasses.replace(cfg, head="scalar"), single_process_state(), seed=3)
    heads = {n for n, p in rm.named_parameters() if p.requires_grad and not n.count(".lora.")}
    assert heads == {"head.weight", "head.bias"}
    # One backward: frozen weights get no gradient, both factors do (B = 0 still lets A's
    # gradient be 0 and B's non-zero: B's gradient is what starts the training).
    ids, _ = _ids(cfg)
    model(ids).float().logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".b"))


def test_initialization_is_the_full_tensor_sharded():
    """A from the parameter name's generator (kaiming-uniform bound 1/sqrt(in)), B = 0."""
    cfg = lora_config("gpt2")
    model = GPTModel(cfg, single_process_state(), seed=11)
    p = dict(model.named_parameters())
    a = p["layers.0.attention.proj.lora.a"]
    want = init_full_parameter("layers.0.attention.proj.lora.a", tuple(a.shape), cfg, 11)
    assert torch.equal(a, want)
    assert a.abs().max() <= 1 / cfg.hidden_size**0.5 and a.std() > 0.3 / cfg.hidden_size**0.5
    assert not torch.equal(a, p["layers.1.attention.proj.lora.a"])  # per-name generators
    assert all(t.abs().sum() == 0 for n, t in p.items() if n.endswith(".lora.b"))
    # The base is untouched by adding adapters (every tensor has its own generator).
    base = dict(GPTModel(base_config(cfg), single_process_state(), seed=11).named_parameters())
    assert all(torch.equal(base[n], t) for n, t in p.items() if n in base)


def test_dropout_is_on_the_adapter_input_only():
    cfg = lora_config("gpt2", lora=LoRAConfig(rank=4, dropout=0.5, target_modules=["fc1"]))
    model = GPTModel(cfg, single_process_state(), seed=3)
    randomize_adapters(model)
    ids, _ = _ids(cfg)
    with torch.no_grad():
        model.train(True)
        with adapters_disabled(model):
            base_train = model(ids)
        model.train(False)
        with adapters_disabled(model):
            base_eval = model(ids)
        adapted_eval = model(ids)
        model.train(True)
        adapted_train = model(ids)
    assert torch.equal(base_train, base_eval)  # dropout never touches the frozen path
    assert not torch.allclose(adapted_train, adapted_eval)  # the adapter's input was dropped


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(rank=-1), "rank"),
        (dict(rank=4, alpha=0), "alpha"),
        (dict(rank=4, dropout=1.0), "dropout"),
        (dict(rank=4, target_modules=["q_proj"]), "target_modules"),
        (dict(rank=4, target_modules=[]), "target_modules"),
        (dict(rank=4, target_modules=["qkv", "qkv"]), "target_modules"),
    ],
)
def test_bad_lora_config_names_the_key(kw, key):
    with pytest.raises(ConfigError) as e:
        LoRAConfig(**kw)
    assert e.value.key == key


def test_lora_section_loads_from_yaml_overrides(tmp_path):
    from megarlhf.config import ModelFileConfig, load_config

    path = tmp_path / "m.yaml"
    path.write_text("model:\n  lora:\n    target_modules: [qkv, fc1]\n")
    cfg = load_config(ModelFileConfig, path, ["model.lora.rank=8", "model.lora.alpha=32"]).model
    assert (cfg.lora.rank, cfg.lora.scale, cfg.lora.target_modules) == (8, 4.0, ["qkv", "fc1"])
    with pytest.raises(ConfigError, match="model.lora.rank"):
        load_config(ModelFileConfig, path, ["model.lora.rank=-2"])
