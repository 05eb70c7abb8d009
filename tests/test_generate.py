"""Greedy decoding against an assembled cache equals HF `generate` on the joint prompt; batched
decoding equals decoding each sequence alone."""

from __future__ import annotations

import pytest
import torch

from kvp.adapters import load_adapter
from kvp.data import load_dataset
from kvp.data.prompts import stop_strings
from kvp.evaluate import sample_context
from kvp.cache import to_cache
from kvp.generate import GenerationConfig, batch_cache
from kvp.methods import METHODS, get_method, run_method, run_methods
from kvp.packet import PacketStore
from kvp.params import method_grid


def test_full_recompute_matches_hf_generate(smollm, ctx):
    model = smollm.model
    result = run_method(get_method("full_recompute"), ctx, GenerationConfig(max_new_tokens=16))
    joint = torch.cat([ctx.preamble_ids, *ctx.doc_ids, ctx.task_ids])[None]
    hf = model.generate(joint, attention_mask=torch.ones_like(joint), max_new_tokens=16,
                        do_sample=False)[0, joint.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    hf = hf[: next((i for i, t in enumerate(hf) if t in eos), len(hf))]
    assert result.token_ids == hf
    assert "Gothenburg" in result.answer


def test_batched_decoding_gives_every_method_the_tokens_of_decoding_it_alone(smollm):
    """``run_methods`` (query steps one by one, answers decoded in one batch) against
    ``run_method`` per method, on real samples with the shipped adapter: the same greedy tokens."""
    model, tokenizer = smollm.model, smollm.tokenizer
    methods = method_grid(list(METHODS), [0.1, 0.5], [16])
    wrapper = load_adapter("smollm2-135m", "biography")
    store = PacketStore(model, tokenizer, "smollm2-135m")
    config = GenerationConfig(max_new_tokens=12, stop_strings=tuple(stop_strings(tokenizer)))
    lengths = set()
    for sample in load_dataset("biography", "test", 2, 42, num_docs=3):
        ctx = sample_context(model, tokenizer, store, sample, wrapper)
        alone = [run_method(method, ctx, config) for method in methods]
        together = run_methods(methods, ctx, config)
        for a, b in zip(alone, together, strict=True):
            assert (b.method, b.setting, b.token_ids, b.answer) == (a.method, a.setting,
                                                                    a.token_ids, a.answer)
            assert b.context_tokens == a.context_tokens and b.flops == a.flops
        lengths |= {len(r.token_ids) for r in alone}
    assert min(lengths) < max(lengths) == 12  # rows left the batch before the budget ended


def test_batch_cache_refuses_caches_of_different_lengths():
    short, long = (to_cache(torch.zeros(2, 1, n, 4), torch.zeros(2, 1, n, 4)) for n in (3, 4))
    assert batch_cache([short, short]).layers[1].keys.shape == (2, 1, 3, 4)
    with pytest.raises(ValueError, match=r"caches of lengths \[3, 4\]"):
        batch_cache([short, long])
