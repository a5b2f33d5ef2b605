"""Random-init transformers GPT-2 and LLaMA (GQA tied, untied with uneven heads over TP=2), vocab
300 (not a multiple of the TP alignment), converted at TP in {1, 2} x PP in {1, 2}: megarlhf logits
equal transformers logits, and greedy decoding is token-identical for 32 tokens.

One 4-rank gloo run covers every model and layout (spawning is the slow part); PP=2 logits come from
running the two stages with the hidden states sent point to point. Greedy decoding runs at PP=1 with
TP=1 and TP=2, from each layout's checkpoint re-sharded while loading.
"""

import pytest
import torch

from tests.convert._ranks import logits_and_greedy
from tests.convert.conftest import LAYOUTS, MODELS, VOCAB
from tests.dist import run_ranks

PROMPT_LEN, NEW_TOKENS = 8, 32
RTOL = 1e-5  # fp32


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, VOCAB, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(hf_models, prompt):
    """name -> (transformers logits [b, s, V], transformers greedy tokens [b, 32])."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name, path in hf_models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # decode all 32 tokens, as ours does
        model.generation_config.pad_token_id = 0
        with torch.no_grad():
            logits = model(prompt).logits
            seq = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
        assert seq.shape[1] == PROMPT_LEN + NEW_TOKENS
        out[name] = (logits, seq[:, PROMPT_LEN:])
    return out


@pytest.fixture(scope="module")
def ranks(converted, prompt):
    results = run_ranks(logits_and_greedy, 4, converted, LAYOUTS, prompt, NEW_TOKENS, timeout=360)
    merged = {}
    for r in results:
        merged.update(r)
    return merged


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"tp{lay[0]}pp{lay[1]}")
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(name, layout, ranks, reference):
    ours, ref = ranks[(name, "logits", *layout)], reference[name][0]
    assert ours.shape == ref.shape == (2, PROMPT_LEN, VOCAB)
    scale = ref.abs().max().item()
    assert scale > 1.0  # a model whose logits are all ~0 would make the check vacuous
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_transformers(name, ranks, reference):
    ref = reference[name][1]
    assert len(set(ref.flatten().tolist())) > 4  # not a degenerate repeat-one-token model
    for tp in (1, 2):
        for src in LAYOUTS:
            ours = ranks[(name, "greedy", tp, *src)]
            assert torch.equal(ours, ref), f"TP={tp} from a tp{src[0]}pp{src[1]} checkpoint"
