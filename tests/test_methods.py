"""Every reuse method against the ends of its range: full recompute and no recompute."""

from __future__ import annotations

import pytest
import torch
from biography_docs import segments

from kvp.generate import GenerationConfig
from kvp.methods import get_method, make_context, run_method
from kvp.packet import PacketStore, PacketWrapper


def first_logits(ctx, name, **kw):
    method = get_method(name, **kw)
    return method.prefill(ctx, method.prepare(ctx))


@pytest.mark.parametrize("name,kw", [("cache_blend", {"ratio": 1.0}), ("epic", {"n_tokens": 10_000}),
                                     ("rand_recompute", {"ratio": 1.0}), ("a3", {"ratio": 1.0})])
def test_recompute_everything_equals_full_recompute(ctx, name, kw):
    ref = first_logits(ctx, "full_recompute")
    out = first_logits(ctx, name, **kw)
    assert out.next_pos == ref.next_pos
    torch.testing.assert_close(out.first_logits, ref.first_logits, atol=2e-3, rtol=1e-3)


def test_partial_recompute_differs_from_both_ends(ctx):
    ref, none = first_logits(ctx, "full_recompute"), first_logits(ctx, "no_recompute")
    half = first_logits(ctx, "cache_blend", ratio=0.5)
    assert (half.first_logits - ref.first_logits).abs().max() > 1e-3
    assert (half.first_logits - none.first_logits).abs().max() > 1e-3
    assert half.flops < ref.flops


def test_kv_packet_with_empty_wrapper_equals_no_recompute(smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    store = PacketStore(model, tokenizer, "smollm2-135m")
    empty = PacketWrapper.empty(model.config.hidden_size)
    c = make_context(model, tokenizer, store, *segments(tokenizer), wrapper=empty)
    torch.testing.assert_close(first_logits(c, "kv_packet").first_logits,
                               first_logits(c, "no_recompute").first_logits)


def test_every_method_answers_and_reports(ctx):
    cfg = GenerationConfig(max_new_tokens=4)
    for name, kw in [("no_cache", {}), ("no_recompute", {}), ("kv_packet", {}),
                     ("cache_blend", {"ratio": 0.3}), ("epic", {"n_tokens": 8}), ("a3", {"ratio": 0.3}),
                     ("sam_kv", {}), ("rand_recompute", {"ratio": 0.3})]:
        r = run_method(get_method(name, **kw), ctx, cfg)
        assert r.ttft_s > 0 and r.flops > 0 and r.answer, name
        assert (r.n_recomputed > 0) == (name not in ("no_cache", "no_recompute", "kv_packet")), name


def test_bad_inputs_get_clear_errors(smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    store = PacketStore(model, tokenizer, "smollm2-135m")
    pre, docs, task = segments(tokenizer)
    with pytest.raises(ValueError, match="empty document"):
        make_context(model, tokenizer, store, pre, docs + ["  "], task)
    with pytest.raises(ValueError, match="empty question"):
        make_context(model, tokenizer, store, pre, docs, "")
    with pytest.raises(ValueError, match=r"has \d+ tokens, more than the model's context of 8192"):
        make_context(model, tokenizer, store, pre, ["word " * 9000], task)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="ratio=1.5"):
        get_method("cache_blend", ratio=1.5)


def test_sam_kv_recomputes_all_of_a_document_shorter_than_its_ends(smollm):
    # a document of fewer tokens than initial + local (e.g. the last chunk of a NIAH haystack) is
    # recomputed whole, with no middle blocks to score
    model, tokenizer = smollm.model, smollm.tokenizer
    pre, docs, task = segments(tokenizer)
    c = make_context(model, tokenizer, PacketStore(model, tokenizer, "smollm2-135m"), pre,
                     [*docs, "The end of the file."], task)
    method = get_method("sam_kv", initial=8, local=16)
    short = len(c.doc_ids[-1])
    assert short < 8 + 16
    kv = method.prepare(c)
    out = method.prefill(c, kv)
    assert out.n_recomputed >= short and out.next_pos == first_logits(c, "full_recompute").next_pos
