"""Packets: the store encodes each document once, wrappers check their model, assembly refuses
sliding-window caches."""

from __future__ import annotations

import pytest
import torch
from biography_docs import DOCS
from transformers import MistralConfig, MistralForCausalLM

from kvp.cache import encode
from kvp.packet import PacketStore, PacketWrapper, assemble


def test_packet_store_encodes_once_and_persists(smollm, wrapper, tmp_path):
    model, tokenizer = smollm.model, smollm.tokenizer
    store = PacketStore(model, tokenizer, "smollm2-135m", directory=tmp_path)
    a = store.get(DOCS[0], wrapper)
    b = store.get(DOCS[0], wrapper)
    assert a is b and store.n_encoded == 1
    assert store.get(DOCS[0]).n_header == 0 and store.n_encoded == 2  # plain ≠ wrapped
    fresh = PacketStore(model, tokenizer, "smollm2-135m", directory=tmp_path)
    c = fresh.get(DOCS[0], wrapper)
    assert fresh.n_encoded == 0 and torch.equal(c.kv.keys, a.kv.keys)
    assert (c.n_header, c.n_doc, c.n_trailer) == (4, a.n_doc, 4)


def test_packet_store_memory_bound_evicts_least_recently_used(smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    store = PacketStore(model, tokenizer, "smollm2-135m", max_in_memory=2)
    first = store.get(DOCS[0])
    store.get(DOCS[1])
    assert store.get(DOCS[0]) is first and store.n_encoded == 2  # a hit refreshes DOCS[0]
    store.get(DOCS[2])  # evicts DOCS[1], the least recently used
    assert store.get(DOCS[0]) is first and store.n_encoded == 3
    store.get(DOCS[1])
    assert store.n_encoded == 4 and len(store._memory) == 2


def test_wrapper_of_another_model_is_refused(wrapper, tmp_path):
    path = tmp_path / "w.safetensors"
    wrapper.save(path)
    with pytest.raises(ValueError, match="'smollm2-135m'.*'qwen2.5-coder-0.5b'"):
        PacketWrapper.load(path, model_name="qwen2.5-coder-0.5b")
    with pytest.raises(ValueError, match="d_model 576.*d_model 896"):
        PacketWrapper.load(path, d_model=896)
    loaded = PacketWrapper.load(path, model_name="smollm2-135m", d_model=576)
    assert torch.equal(loaded.header, wrapper.header.detach()) and loaded.h == 4


def test_sliding_window_cache_refused_at_assembly():
    model = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=1, vocab_size=50,
                                             sliding_window=16))
    preamble = encode(model, input_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="sliding-window"):
        assemble(model, preamble, [])
