"""tools/plan.py: the CLI over megarlhf.perf.memory (tables, --json, exit status, bad input)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megarlhf.perf.memory import GIB
from tools import plan as tool

ROOT = Path(__file__).parents[2]
LLAMA_7B = ["--model", "llama_7b", "--nodes", "4", "--gpus-per-node", "8", "--gpu-mem", "80"]


def run_json(capsys, argv) -> tuple[int, dict]:
    code = tool.main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_llama_7b_on_32_gpus(capsys):
    code, d = run_json(capsys, [*LLAMA_7B, "--tp", "4"])
    assert code == 0 and d["fits"]
    assert d["spec"]["dp"] == 8 and d["spec"]["gen_tp"] == 4  # derived
    # LLaMA-7B has 6.74e9 parameters; at TP 4 a rank holds about a quarter (norms replicated).
    assert d["params_per_gpu"]["actor"] == pytest.approx(6.74e9 / 4, rel=0.01)
    actor = d["roles"]["actor"]
    assert actor["weights"] == 2 * d["params_per_gpu"]["actor"]  # bf16
    # fp32 master + Adam over DP 8 at ZeRO 1.
    assert actor["master"] + actor["optimizer"] == 12 * d["params_per_gpu"]["actor"] / 8
    assert d["peak"] == max(d["phases"].values())
    assert set(d["phases"]) == {"rollout", "experience", "training"}


def test_zero3_and_offload_lower_the_peak(capsys):
    _, z1 = run_json(capsys, [*LLAMA_7B, "--zero", "1"])
    _, z3 = run_json(capsys, [*LLAMA_7B, "--zero", "3"])
    assert z3["roles"]["actor"]["weights"] < z1["roles"]["actor"]["weights"]
    assert z3["generation"]["zero3_gather"] > 0
    _, off = run_json(capsys, [*LLAMA_7B, "--zero", "1", "--offload-frozen"])
    drop = z1["roles"]["reference"]["weights"] + z1["roles"]["reward"]["weights"]
    before = z1["phase_detail"]["training"]["resident"]
    assert off["phase_detail"]["training"]["resident"] == pytest.approx(before - drop)


def test_does_not_fit_exits_1_and_says_so(capsys):
    code = tool.main(["--model", "llama_70b", "--gpus-per-node", "8", "--gpu-mem", "80"])
    out = capsys.readouterr().out
    assert code == 1 and "DOES NOT FIT" in out
    assert "actor" in out and "KV cache" in out and "step time" in out


def test_overrides_and_yaml_path(capsys):
    path = str(ROOT / "configs" / "models" / "gpt2_124m.yaml")
    argv = ["--model", path, "--gpus-per-node", "1", "--dtype", "fp32", "--zero", "0"]
    _, d = run_json(capsys, [*argv, "--prompt-len", "64", "--response-len", "64"])
    _, d6 = run_json(
        capsys, [*argv, "--prompt-len", "64", "--response-len", "64", "model.num_layers=6"]
    )
    assert d6["params_per_gpu"]["actor"] < d["params_per_gpu"]["actor"]
    # fp32 at ZeRO 0: 4 + 4 + 8 bytes per parameter.
    a = d["roles"]["actor"]
    assert a["weights"] + a["grads"] + a["optimizer"] == 16 * d["params_per_gpu"]["actor"]
    assert d["capacity"] == 80 * GIB


def test_lora_flags(capsys):
    argv = ["--model", "smollm2_135m", "--gpus-per-node", "2", "--prompt-len", "256",
            "--response-len", "256", "--rollout-batch", "16"]  # fmt: skip
    _, full = run_json(capsys, argv)
    code, lora = run_json(capsys, [*argv, "--lora-rank", "8"])
    assert code == 0 and lora["spec"]["lora_rank"] == 8
    # SmolLM2-135M at r = 8 on every linear, per layer r (in + out): qkv 8 (576 + 960),
    # proj 8 (576 + 576), fc1 8 (576 + 3072: gate|up), fc2 8 (1536 + 576); 30 layers.
    adapters = 30 * 8 * ((576 + 960) + (576 + 576) + (576 + 3072) + (1536 + 576))
    assert lora["trainable_per_gpu"] == {"actor": adapters, "critic": adapters + 577}
    actor = lora["roles"]["actor"]
    assert actor["master"] + actor["optimizer"] == 12 * adapters / 2  # ZeRO 1 over DP 2
    assert actor["weights"] == 2 * (full["params_per_gpu"]["actor"] + adapters)
    assert lora["roles"]["reference"]["weights"] == 0 < full["roles"]["reference"]["weights"]
    _, qkv = run_json(capsys, [*argv, "--lora-rank", "8", "--lora-targets", "qkv"])
    assert qkv["trainable_per_gpu"]["actor"] == 30 * 8 * (576 + 960)
    assert tool.main([*argv, "--lora-rank", "8"]) == 0
    assert "trained params/GPU (LoRA): actor 2.028M" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--dp", "3"], "--dp"),
        (["--tp", "3"], "--tp/--pp"),
        (["--zero", "5"], "--zero"),
        (["--zero", "0"], "--zero"),  # bf16 needs ZeRO >= 1
        (["--colocate", "critic,reward"], "--colocate"),
        (["--dtype", "fp16"], "--dtype"),
        (["--gen-tp", "3"], "--gen-tp"),
        (["--rollout-batch", "20"], "--rollout-batch"),
        (["--response-len", "8000"], "--response-len"),
        (["--mfu", "0"], "--mfu"),
        (["--model", "llama_8b"], "--model"),
        (["model.hidden_size=100"], "--model"),
        (["ppo.kl_coef=1"], "overrides"),
        (["--lora-rank", "-2"], "--lora-rank"),
        (["--lora-rank", "8", "--lora-targets", "qkv,lm_head"], "--lora-targets"),
        (["--lora-rank", "8", "--zero", "3"], "--zero"),
    ],
)
def test_bad_input_names_the_flag(capsys, argv, flag):
    base = [*LLAMA_7B] if "--model" not in argv else LLAMA_7B[2:]
    with pytest.raises(SystemExit) as e:
        tool.main([*base, *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag}:" in err, err


def test_runs_as_a_script():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan.py"), *LLAMA_7B, "--tp", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fits"] is True
