"""Shared fixtures: the embedded default model (loaded once for the whole run) and, per module, a
random wrapper and the query context of the shared biography sample (tests/biography_docs.py)."""

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


@pytest.fixture(scope="module")
def wrapper(smollm):
    """A random 4 + 4 token wrapper for smollm2-135m (seed 1)."""
    from kvp.packet import PacketWrapper

    return PacketWrapper.init_from_embeddings(smollm.model, h=4, t=4, seed=1,
                                              model_name="smollm2-135m")


@pytest.fixture(scope="module")
def ctx(smollm, wrapper):
    """The query context of the shared biography sample (tests/biography_docs.py), wrapped."""
    from biography_docs import segments

    from kvp.methods import make_context
    from kvp.packet import PacketStore

    model, tokenizer = smollm.model, smollm.tokenizer
    store = PacketStore(model, tokenizer, "smollm2-135m")
    return make_context(model, tokenizer, store, *segments(tokenizer), wrapper=wrapper)
