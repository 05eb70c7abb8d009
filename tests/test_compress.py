"""Packets compressed by kvpress presses (SPEC §4 Figure 4): budgets, protection, equivalences."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pandas as pd
import pytest
import torch
from kvpress import AdaKVPress, KeyRerotationPress, KnormPress, StreamingLLMPress
from kvpress.utils import compute_n_kept

from kvp.compress import (PRESSES, CompressedStore, JointCompressed, JointGroup, OnStore,
                          ProtectedPress, compress_packet, compress_packets, compression_runs,
                          make_press, min_tokens, press_summary)
from kvp.data import Sample
from kvp.data.prompts import build_segments, segment_ids
from kvp.evaluate import EvalSettings, evaluate
from kvp.generate import GenerationConfig
from kvp.methods import get_method, make_context, run_method
from kvp.methods.base import timed_step
from kvp.packet import PacketStore, PacketWrapper, assemble, build_packet, tokenize_document
from kvp.results import read_rows, resume_path

DOCS = [
    "Marie Dubois was born on 4 May 1987 in Lyon. She studied chemistry at the University of "
    "Geneva, where she wrote a thesis on catalysts for clean fuels. Today she lives in Oslo and "
    "works for Equinor as a senior research engineer, leading a team of twelve people.",
    "The lighthouse on Skerry Point was built in 1874 from granite quarried on the island. Its "
    "lamp was converted to electricity in 1951 and automated in 1989, after which the last keeper "
    "left. The tower is 31 metres tall and its light can be seen from 22 nautical miles away.",
]
PREAMBLE = "<|im_start|>user\nAnswer the question using the documents below.\n"
TASK = "Where does Marie Dubois live?<|im_end|>\n<|im_start|>assistant\n"
RATIO = 0.3


@pytest.fixture(scope="module")
def wrapper(smollm):
    return PacketWrapper.init_from_embeddings(smollm.model, h=8, t=8, seed=0, model_name="smollm2-135m")


@pytest.fixture(scope="module")
def full_packet(smollm, wrapper):
    model, tok = smollm.model, smollm.tokenizer
    return build_packet(model, tok, DOCS[0], wrapper)


def rows_found(subset: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """(L, H, K) bools: is each row of ``subset`` (L, H, K, D) bit-identical to a row of ``full``
    (L, H, S, D) of the same layer and head?"""
    dist = torch.cdist(subset, full, compute_mode="donot_use_mm_for_euclid_dist")  # (L, H, K, S)
    nearest = full.gather(2, dist.argmin(-1)[..., None].expand_as(subset))  # (L, H, K, D)
    return (nearest == subset).all(-1)


def pairs(packet) -> torch.Tensor:
    """(L, H, S, 2D): each token's key and value side by side, so rows match as (k, v) pairs."""
    return torch.cat([packet.kv.keys, packet.kv.values], dim=-1)


@pytest.mark.parametrize("name", list(PRESSES))
def test_packet_keeps_budget_span_and_original_rows(smollm, wrapper, full_packet, name):
    model, tok = smollm.model, smollm.tokenizer
    packet = compress_packet(model, tok, DOCS[0], make_press(name, RATIO), wrapper)
    n = full_packet.kv.length
    assert packet.kv.length == compute_n_kept(n, RATIO)
    assert abs(packet.kv.length - (1 - RATIO) * n) <= 1
    assert packet.span == packet.length == full_packet.length == n
    # every kept (key, value) is the uncompressed packet's, unrotated; no duplicates
    assert rows_found(pairs(packet), pairs(full_packet)).all()
    assert all(torch.unique(pairs(packet)[layer, head], dim=0).shape[0] == packet.kv.length
               for layer in (0, 29) for head in range(3))


@pytest.mark.parametrize("name", list(PRESSES))
def test_protected_packet_keeps_header_and_trailer(smollm, wrapper, full_packet, name):
    model, tok = smollm.model, smollm.tokenizer
    packet = compress_packet(model, tok, DOCS[0], make_press(name, RATIO), wrapper,
                             protect_wrapper=True)
    assert packet.kv.length == compute_n_kept(full_packet.kv.length, RATIO)  # same budget
    wrapped = torch.cat([pairs(full_packet)[..., :8, :], pairs(full_packet)[..., -8:, :]], dim=2)
    assert rows_found(wrapped, pairs(packet)).all()


def test_protection_changes_what_is_kept(smollm, wrapper, full_packet):
    """StreamingLLM evicts the tokens after its 4 sinks, i.e. header tokens 4..7, unless protected."""
    model, tok = smollm.model, smollm.tokenizer
    header = pairs(full_packet)[..., :8, :]
    plain = compress_packet(model, tok, DOCS[0], StreamingLLMPress(RATIO), wrapper)
    assert not rows_found(header, pairs(plain))[..., 4:].any()
    kept = compress_packet(model, tok, DOCS[0], StreamingLLMPress(RATIO), wrapper, True)
    assert rows_found(header, pairs(kept)).all()


@pytest.mark.parametrize("name", list(PRESSES))
def test_ratio_zero_is_the_uncompressed_packet(smollm, wrapper, full_packet, name):
    model, tok = smollm.model, smollm.tokenizer
    packet = compress_packet(model, tok, DOCS[0], make_press(name, 0.0), wrapper, True)
    assert torch.equal(packet.kv.keys, full_packet.kv.keys)
    assert torch.equal(packet.kv.values, full_packet.kv.values)
    assert packet.length == full_packet.length


def test_assembled_compressed_packets_keep_global_rotation(smollm, wrapper):
    """Compressed packets re-rotated by offsets from their spans give exactly the rows of the
    assembled uncompressed context (the second packet's offset depends on the first's span)."""
    model, tok = smollm.model, smollm.tokenizer
    preamble = build_packet(model, tok, PREAMBLE).kv
    full = [build_packet(model, tok, d, wrapper) for d in DOCS]
    small = [compress_packet(model, tok, d, KnormPress(0.5), wrapper) for d in DOCS]
    kv_full, pos_full = assemble(model, preamble, full)
    kv_small, pos_small = assemble(model, preamble, small)
    assert pos_small == pos_full
    assert kv_small.length == preamble.length + sum(p.kv.length for p in small) < kv_full.length
    assert rows_found(kv_small.keys, kv_full.keys).all()
    # a first packet occupying only its kept tokens would shift the second one's keys
    wrong, _ = assemble(model, preamble, [replace(small[0], span=small[0].kv.length), small[1]])
    assert not rows_found(wrong.keys[..., -small[1].kv.length:, :], kv_full.keys).any()


def test_kv_packet_runs_on_compressed_store(smollm, wrapper):
    model, tok = smollm.model, smollm.tokenizer
    plain = PacketStore(model, tok, "smollm2-135m")
    zero = CompressedStore(model, tok, "smollm2-135m", press=KnormPress(0.0), protect_wrapper=True)
    method = get_method("kv_packet")
    reference = method.prefill(ctx := make_context(model, tok, plain, PREAMBLE, DOCS, TASK, wrapper),
                               method.prepare(ctx))
    ctx0 = make_context(model, tok, zero, PREAMBLE, DOCS, TASK, wrapper)
    out0 = method.prefill(ctx0, method.prepare(ctx0))
    assert torch.equal(out0.first_logits, reference.first_logits)
    assert zero.n_encoded == 2

    store = CompressedStore(model, tok, "smollm2-135m", press=KnormPress(RATIO))
    ctx = make_context(model, tok, store, PREAMBLE, DOCS, TASK, wrapper)
    result = run_method(method, ctx, GenerationConfig(max_new_tokens=4))
    assert result.token_ids and result.context_tokens == reference.next_pos  # positions kept
    assert result.flops < reference.flops  # fewer tokens re-rotated
    # the same documents again come from the store; no_recompute gets compressed plain packets
    run_method(get_method("no_recompute"), ctx, GenerationConfig(max_new_tokens=1))
    assert store.n_encoded == 4
    assert store.get(DOCS[0]).kv.length == compute_n_kept(store.get(DOCS[0]).length, RATIO)


def test_joint_baseline(smollm):
    model, tok = smollm.model, smollm.tokenizer
    ctx = make_context(model, tok, PacketStore(model, tok, "smollm2-135m"), PREAMBLE, DOCS, TASK)
    full = get_method("full_recompute").prefill(ctx, None)
    zero = JointCompressed(KnormPress(0.0))
    out0 = zero.prefill(ctx, zero.prepare(ctx))
    torch.testing.assert_close(out0.first_logits, full.first_logits, atol=1e-4, rtol=1e-4)
    assert out0.next_pos == full.next_pos
    joint = JointCompressed(KnormPress(RATIO))
    out = joint.prefill(ctx, None)
    n_context = ctx.n_preamble + ctx.n_docs_tokens
    assert out.cache.get_seq_length() == compute_n_kept(n_context, RATIO) + len(ctx.task_ids)
    assert out.next_pos == full.next_pos
    assert joint.setting == "press=KnormPress(compression_ratio=0.3)"


def test_joint_group_gives_every_press_the_cache_of_its_own_prefill(smollm, monkeypatch):
    """One joint prefill for several presses (``JointGroup``) against each press's own joint
    prefill: the same first logits and cache, bit for bit; the shared prefill runs once per
    context and its time is part of every member's TTFT."""
    model, tok = smollm.model, smollm.tokenizer
    ctx = make_context(model, tok, PacketStore(model, tok, "smollm2-135m"), PREAMBLE, DOCS, TASK)
    presses = [make_press(name, ratio) for name in ("knorm", "snapkv", "streaming_llm")
               for ratio in (0.2, 0.5)]
    group = JointGroup(presses)
    members = [JointCompressed(p, _group=group) for p in presses]
    assert members[0].setting == JointCompressed(presses[0]).setting
    steps = [timed_step(m, ctx) for m in members]
    assert all(seconds >= group.seconds > 0 for _, seconds in steps)
    monkeypatch.setattr("kvp.compress.encode", lambda *a, **k: pytest.fail("prefilled again"))
    members[0].prepare(ctx)  # the same context: nothing is prefilled again
    monkeypatch.undo()
    for press, (out, _) in zip(presses, steps, strict=True):
        alone = JointCompressed(press).prefill(ctx, None)
        assert torch.equal(out.first_logits, alone.first_logits), press
        assert out.cache.get_seq_length() == alone.cache.get_seq_length()
        for a, b in zip(out.cache.layers, alone.cache.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_refusals(smollm, wrapper):
    model, tok = smollm.model, smollm.tokenizer
    for press in (AdaKVPress(KnormPress(RATIO)), KeyRerotationPress(KnormPress(RATIO))):
        with pytest.raises(ValueError, match="not supported"):
            compress_packet(model, tok, DOCS[0], press, wrapper)
    with pytest.raises(ValueError, match="unknown press"):
        make_press("h2o", RATIO)
    with pytest.raises(ValueError, match="memory only"):
        CompressedStore(model, tok, "smollm2-135m", directory="packets", press=KnormPress(RATIO))
    with pytest.raises(ValueError, match="n_first"):
        ProtectedPress(KnormPress(RATIO), n_first=-1)


def test_short_documents(smollm, wrapper):
    model, tok = smollm.model, smollm.tokenizer
    short = "Paris."
    n = 16 + len(tokenize_document(tok, short))
    snap = make_press("snapkv", RATIO)
    assert min_tokens(snap) == 65 and min_tokens(make_press("knorm", RATIO)) == 1
    with pytest.raises(ValueError, match=rf"packet of {n} tokens .* 65 tokens"):
        compress_packet(model, tok, short, snap, wrapper)
    with pytest.warns(UserWarning, match="kept uncompressed"):
        packet = compress_packet(model, tok, short, snap, wrapper, allow_short=True)
    assert packet.kv.length == packet.length == n
    # 8 + 8 protected tokens fit the budget int(S * 0.7) only from S = 23 on
    assert min_tokens(ProtectedPress(KnormPress(RATIO), 8, 8)) == 23 > n
    with pytest.raises(ValueError, match="shorter than the 23 tokens"):
        compress_packet(model, tok, short, KnormPress(RATIO), wrapper, protect_wrapper=True)


def test_compression_sweep_table(smollm, wrapper):
    model, tok = smollm.model, smollm.tokenizer
    samples = [Sample("marie", DOCS, "Where does Marie Dubois live?", ["Oslo"], {"dataset": "jsonl"})]
    settings = EvalSettings("smollm2-135m", max_new_tokens=2, progress=False)
    runs = compression_runs(model, tok, samples, ["knorm"], [0.0, 0.5], wrapper, settings)
    table = press_summary(runs, n_boot=10)
    assert list(table.columns) == ["model", "dataset", "method", "setting", "n", "f1_micro",
                                   "ci_low", "ci_high", "agree_f1", "retention", "ttft_ms",
                                   "flops", "press", "ratio", "variant", "kv_tokens"]
    assert len(table) == 6 and (table.n == 1).all()
    kv = table.set_index(["ratio", "variant"]).kv_tokens
    n_task = len(segment_ids(tok, build_segments(tok, samples[0]))[2])
    positions = runs.set_index(["ratio", "variant"]).context_tokens - n_task  # before the prompt
    assert kv[0.0, "packet"] == kv[0.0, "packet_protected"] == positions[0.0, "packet"]
    assert kv[0.0, "joint"] == positions[0.0, "joint"] == kv[0.0, "packet"] - 16 * len(DOCS)
    assert (positions[0.5] == positions[0.0]).all()  # compressed packets keep their positions
    assert kv[0.5, "packet"] == kv[0.5, "packet_protected"] < kv[0.0, "packet"]
    assert kv[0.5, "joint"] < kv[0.0, "joint"]
    for (ratio, variant), row in runs.set_index(["ratio", "variant"]).iterrows():
        press = make_press("knorm", ratio)  # each setting evaluated alone, on a fresh store
        method = (JointCompressed(press) if variant == "joint" else OnStore(
            get_method("kv_packet"), CompressedStore(model, tok, "smollm2-135m", press=press,
                                                     protect_wrapper=variant == "packet_protected")))
        alone = evaluate(model, tok, samples, [method], settings, wrapper).iloc[0]
        assert (row.raw_answer, row.flops, row.context_tokens) == (
            alone.raw_answer, alone.flops, alone.context_tokens)
    with pytest.raises(ValueError, match="packet_protected"):
        compression_runs(model, tok, samples, ["knorm"], [0.5], None, settings)


def test_compression_runs_resume_from_their_checkpoint(smollm, wrapper, tmp_path, monkeypatch):
    model, tok = smollm.model, smollm.tokenizer
    samples = [Sample(f"s{i}", DOCS, q, [a], {"dataset": "jsonl"}) for i, (q, a) in
               enumerate([("Where does Marie Dubois live?", "Oslo"), ("Who lives in Oslo?", "Marie")])]
    settings = EvalSettings("smollm2-135m", max_new_tokens=2, progress=False)
    grid = (["knorm", "snapkv"], [0.5], ["packet", "joint"])
    path = resume_path(tmp_path)
    first = compression_runs(model, tok, samples, *grid[:2], wrapper, settings, grid[2],
                             checkpoint=path)
    assert read_rows(path).sample_id.nunique() == 2

    def no_model_calls(*args, **kwargs):
        raise AssertionError("a checkpointed sample was evaluated again")
    monkeypatch.setattr("kvp.evaluate.run_methods", no_model_calls)
    monkeypatch.setattr("kvp.compress.compress_packets", no_model_calls)  # kv_tokens: counted
    again = compression_runs(model, tok, samples, *grid[:2], wrapper, settings, grid[2],
                             checkpoint=path)
    columns = ["sample_id", "press", "ratio", "variant", "setting", "raw_answer", "kv_tokens"]
    pd.testing.assert_frame_equal(again[columns], first[columns])
    # each setting's rows are its own: a smaller grid takes them from the same file
    knorm = compression_runs(model, tok, samples, ["knorm"], [0.5], wrapper, settings, grid[2],
                             checkpoint=path)
    pd.testing.assert_frame_equal(knorm[columns], first[first.press == "knorm"][columns]
                                  .reset_index(drop=True))


def test_kv_length_of_a_packet_never_built_is_the_built_packets(smollm, wrapper):
    """What a resumed sweep reports as kept tokens without building the packet: the length the
    built packet has, for every press, ratio and protection, and for a packet too short to press."""
    model, tok = smollm.model, smollm.tokenizer
    for name in PRESSES:
        for ratio in (0.1, 0.5):
            for protect in (False, True):
                stores = [CompressedStore(model, tok, "smollm2-135m", press=make_press(name, ratio),
                                          protect_wrapper=protect, allow_short=True)
                          for _ in range(2)]
                for doc in (DOCS[0], "Paris."):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # "Paris." stays uncompressed for some
                        counted = stores[0].kv_length(doc, wrapper)
                        built = stores[1].get(doc, wrapper).kv.length
                    assert counted == built, (name, ratio, protect, doc)
                assert stores[0].n_encoded == 0


def test_one_prefill_gives_every_press_the_packet_of_its_own_prefill(smollm, wrapper):
    """``compress_packets`` (all presses on one prefill) against kvpress's own ``with press(model)``
    prefill per press, protected or not: the same kept keys and values, bit for bit."""
    model, tok = smollm.model, smollm.tokenizer
    settings = [(make_press(name, 0.3), protect) for name in PRESSES for protect in (False, True)]
    together = compress_packets(model, tok, DOCS[0], settings, wrapper)
    for (press, protect), packet in zip(settings, together, strict=True):
        alone = ProtectedPress(press, wrapper.h, wrapper.t) if protect else press
        with alone(model):
            expected = build_packet(model, tok, DOCS[0], wrapper)
        assert packet.span == expected.length and packet.kv.length < expected.length
        assert torch.equal(packet.kv.keys, expected.kv.keys), (press, protect)
        assert torch.equal(packet.kv.values, expected.kv.values), (press, protect)
