"""Session-scoped fixtures: the embedded default model is loaded once for the whole test run."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer, spec) of the default embedded model, fp32 on CPU, SDPA attention."""
    from kvp.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def smollm_eager():
    """The default model with eager attention (attention weights available)."""
    from kvp.models import load_model

    return load_model("smollm2-135m", device="cpu", attn_implementation="eager")
