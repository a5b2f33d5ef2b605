"""The peer side of the throughput benchmark: TRL's PPO (trl.experimental.ppo, trl==1.12.0) built
at our configuration, timed iteration by iteration.

TRL runs in two settings: fp32, and its best setting here, bf16 autocast (`bf16=True` with
`ACCELERATE_MIXED_PRECISION=bf16` and `use_cpu=True`: under transformers 5 TRL's PPOTrainer builds
its own `Accelerator`, which reads the precision from the environment only). Accelerate keeps its
state in process-wide singletons, so the two settings run one after the other in the same process
(`reset_accelerate` between them), each alternating with our iterations.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from megarlhf.perf.bench import hf_config_of


def word_level_tokenizer(vocab: int, pad_id: int, eos_id: int):
    """A transformers tokenizer over ids only ("t0".."t{vocab-1}"): what TRL needs from a
    tokenizer here is pad / EOS ids and padding in its collator."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    unk = next(w for w, i in words.items() if i not in (pad_id, eos_id))
    tok = Tokenizer(models.WordLevel(words, unk_token=unk))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=f"t{pad_id}", eos_token=f"t{eos_id}", unk_token=unk
    )


class IterationTimer:
    """Wall time of each TRL PPO iteration, from the start of `train()` (on_train_begin) or the
    previous iteration's end to this iteration's on_step_end (TRL calls it once per rollout + PPO
    epochs, after its metrics logging). Mixed into a TrainerCallback by `build_trl_ppo`."""

    def __init__(self):
        self.times: list[float] = []
        self._t = 0.0

    def on_train_begin(self, *args, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self._t)
        self._t = now


def _trl_models(cfg, pad_id: int, eos_id: int, seed: int, eos_rate: float = 0.0):
    """Random-init policy, reference (the policy's weights), value and reward models of `cfg`;
    with `eos_rate` the policy emits EOS with about that probability per token."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    hf_cfg = hf_config_of(cfg, pad_id, eos_id)
    policy = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    if eos_rate > 0:
        from megarlhf.perf.eos_rate import set_eos_rate

        t = policy.transformer
        set_eos_rate(t.wte.weight, t.ln_f.bias, eos_id, eos_rate, cfg.vocab_size)
    ref = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    ref.load_state_dict(policy.state_dict())
    value = AutoModelForSequenceClassification.from_config(hf_cfg, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_config(hf_cfg, dtype=torch.float32)
    policy.generation_config.pad_token_id = pad_id
    return policy, ref, value, reward


def build_trl_ppo(
    cfg,
    prompts: list[list[int]],
    *,
    response_len: int,
    ppo_epochs: int,
    num_minibatches: int,
    lr: float,
    kl_coef: float,
    seed: int,
    output_dir: str | Path,
    pad_id: int = 0,
    eos_id: int = 3,
    bf16: bool = False,
    eos_rate: float = 0.0,
):
    """TRL's PPOTrainer (trl.experimental.ppo) at our configuration, one process on CPU.

    Policy, reference (a separate model, so a separate reference forward as ours), value and
    reward models are random-init transformers models of `cfg`'s dims (value and reward as
    AutoModelForSequenceClassification with one label), fp32 weights; `bf16` runs them under
    bf16 autocast. Without `eos_rate` there is no stop token: every response is exactly
    `response_len` tokens; with it the policy emits EOS at that rate per token, TRL stops there
    and pads (its forwards and updates still cover `response_len` positions). Batch =
    len(prompts), one micro-batch per minibatch, rollout forwards over the whole batch at once.

    Returns:
        (trainer, IterationTimer registered on it).
    """
    import datasets
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if bf16 else "no"
    policy, ref, value, reward = _trl_models(cfg, pad_id, eos_id, seed, eos_rate)
    batch = len(prompts)
    args = PPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch // num_minibatches,
        gradient_accumulation_steps=1,
        num_mini_batches=num_minibatches,
        num_ppo_epochs=ppo_epochs,
        response_length=response_len,
        local_rollout_forward_batch_size=batch,
        stop_token="eos" if eos_rate > 0 else None,
        missing_eos_penalty=None,
        total_episodes=batch * 1_000_000,
        num_sample_generations=0,
        temperature=1.0,
        kl_coef=kl_coef,
        kl_estimator="k1",
        learning_rate=lr,
        bf16=bf16,
        fp16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
    )
    data = datasets.Dataset.from_dict({"input_ids": prompts})
    timer = type("IterationTimerCallback", (IterationTimer, TrainerCallback), {})()
    trainer = PPOTrainer(
        args=args,
        processing_class=word_level_tokenizer(cfg.vocab_size, pad_id, eos_id),
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=data,
        eval_dataset=data,
        value_model=value,
        callbacks=[timer],
    )
    trainer.remove_callback(PrinterCallback)
    return trainer, timer


def run_trl_iterations(trainer, timer: IterationTimer, n: int) -> list[float]:
    """Run n PPO iterations of a `build_trl_ppo` trainer; their wall times."""
    start = len(timer.times)
    trainer.args.num_total_batches = n
    trainer.train()
    return timer.times[start:]


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so a trainer of another precision can be built."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
