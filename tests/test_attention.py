"""Attention capture: block mask ≡ independent encoding + re-rotation (Figure 2), segment scores
(Figure 5) and the KV / attention shift measures of notebook 01, on the embedded model."""

from __future__ import annotations

import pytest
import torch

from kvp import attention as A
from kvp.methods import get_method, make_context
from kvp.packet import PacketStore, PacketWrapper

PREAMBLE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "Answer the question using the documents below.\n")
DOCUMENTS = ["Alice Moreau was born in Lyon. She studied chemistry and works for Nestle.\n",
             "Bruno Keller was born in Graz in 1971. He studied history at the University of Vienna "
             "and now lives in Zurich.\n",
             "Carla Diaz grew up in Seville and works as a nurse in Madrid.\n"]
TASK = "Where was Bruno Keller born?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ctx(smollm_eager):
    model, tokenizer = smollm_eager.model, smollm_eager.tokenizer
    wrapper = PacketWrapper.init_from_embeddings(model, h=4, t=3, seed=0)
    store = PacketStore(model, tokenizer, "smollm2-135m")
    return make_context(model, tokenizer, store, PREAMBLE, DOCUMENTS, TASK, wrapper=wrapper)


@pytest.fixture(scope="module")
def maps(ctx):
    return {name: A.joint_attention(ctx, name) for name in A.JOINT_METHODS}


@pytest.mark.parametrize("name", ["no_recompute", "kv_packet"])
def test_block_mask_rows_equal_independent_encoding(ctx, maps, name):
    """Figure 2: the final block's attention in the block-mask forward equals its attention
    against documents encoded alone, assembled and re-rotated."""
    rows, scores, layout = A.cached_attention(ctx, get_method(name))
    joint = maps[name]
    assert layout == joint.layout
    assert rows.shape == joint.final_probs.shape
    torch.testing.assert_close(rows, joint.final_probs, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(scores, joint.scores, atol=2e-3, rtol=1e-4)


def test_full_recompute_cached_rows_equal_the_causal_forward(ctx, maps):
    rows, scores, _ = A.cached_attention(ctx, get_method("full_recompute"))
    torch.testing.assert_close(rows, maps["full_recompute"].final_probs, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(scores, maps["full_recompute"].scores, atol=2e-3, rtol=1e-4)


def test_block_mask_differs_from_full_attention_after_layer_0(maps):
    full, block = maps["full_recompute"].final_probs, maps["no_recompute"].final_probs
    assert full.shape == block.shape  # same tokens, same layout without wrappers
    # Layer 0 keys come from embeddings and positions only: the final rows still agree there.
    torch.testing.assert_close(block[0], full[0], atol=2e-5, rtol=1e-4)
    deep = (block[1:] - full[1:]).abs().amax(dim=(1, 2, 3))  # (L-1,)
    assert (deep > 1e-2).all(), deep
    # The context rows differ too: documents no longer see the preamble or earlier documents.
    a, b = maps["no_recompute"].layout.bodies[1]
    assert maps["no_recompute"].probs[:, :, a:b, :a].abs().max() == 0
    assert maps["full_recompute"].probs[2, :, a:b, :a].sum() > 0.1


def test_cache_blend_at_ratio_one_matches_full_recompute(ctx, maps):
    amap = A.capture(ctx, get_method("cache_blend", ratio=1.0))
    start = amap.layout.final[0]
    assert torch.isnan(amap.probs[:, :, :start]).all()
    torch.testing.assert_close(amap.final_probs, maps["full_recompute"].final_probs,
                               atol=1e-4, rtol=1e-3)
    partial = A.capture(ctx, "cache_blend")
    assert (partial.final_probs - amap.final_probs).abs().max() > 1e-3


def test_scores_are_the_pre_softmax_of_the_captured_attention(maps):
    for amap in maps.values():
        c = amap.layout.final[0]
        ctx_probs = amap.final_probs[..., :c]
        torch.testing.assert_close(ctx_probs / ctx_probs.sum(-1, keepdim=True),
                                   amap.scores.softmax(-1), atol=1e-5, rtol=1e-3)


def test_attention_rows_are_distributions(maps):
    for amap in maps.values():
        torch.testing.assert_close(amap.probs.sum(-1), torch.ones(amap.probs.shape[:-1]),
                                   atol=1e-4, rtol=0)


def test_capture_switches_a_sdpa_model_to_eager_and_back(smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    store = PacketStore(model, tokenizer, "smollm2-135m")
    small = make_context(model, tokenizer, store, PREAMBLE, DOCUMENTS[:1], TASK)
    amap = A.capture(small, "no_recompute")
    assert amap.probs.shape[-1] == amap.layout.length
    assert model.config._attn_implementation == "sdpa"
    assert all(not layer.self_attn._forward_pre_hooks for layer in model.model.layers)


def test_segment_scores_frame(maps):
    amap = maps["kv_packet"]
    df = A.segment_scores(amap, n_bins=50)
    assert list(df.columns) == ["layer", "segment", "position_bin", "score", "method"]
    n_pre = amap.layout.preamble[1]
    assert len(df) == amap.n_layers * (n_pre + 4 + 50 + 3)
    assert set(df["segment"]) == set(A.SEGMENTS)
    assert df.groupby("segment")["position_bin"].max().to_dict() == {
        "preamble": n_pre - 1, "header": 3, "document": 49, "trailer": 2}
    assert df["score"].notna().all() and set(df["method"]) == {"kv_packet"}
    # Without wrappers there are no header/trailer segments.
    plain = A.segment_scores(maps["no_recompute"], n_bins=10)
    assert set(plain["segment"]) == {"preamble", "document"}
    # The preamble bins are the per-token mean over heads and queries.
    expect = amap.scores[7].mean(dim=(0, 1))[:n_pre]
    got = df[(df.layer == 7) & (df.segment == "preamble")]["score"].to_numpy()
    torch.testing.assert_close(torch.tensor(got), expect)


def test_segment_profiles_reject_a_bad_head(maps):
    with pytest.raises(ValueError, match="head=99"):
        A.segment_profiles(maps["kv_packet"], head=99)


def test_kv_deviation(ctx):
    df = A.kv_deviation(ctx)
    assert set(df.columns) == {"layer", "segment", "document", "kind", "cosine", "rel_l2"}
    n_layers = ctx.model.config.num_hidden_layers
    assert len(df) == 2 * n_layers * (1 + len(DOCUMENTS))
    # Layer 0 K/V depend only on token and position: identical after re-rotation.
    assert df[df.layer == 0]["rel_l2"].max() < 1e-5
    # The preamble is encoded at the same positions with the same context in both.
    assert df[df.segment == "preamble"]["rel_l2"].max() < 1e-5
    docs = df[(df.segment == "document") & (df.layer > 0)]
    assert docs["rel_l2"].min() > 1e-2 and docs["cosine"].max() < 0.9999
    by_layer = df[df.segment == "document"].groupby("layer")["rel_l2"].mean()
    assert by_layer.iloc[n_layers // 2:].mean() > by_layer.iloc[1]  # drift grows with depth


def test_attention_mass_and_spread(maps):
    mass = A.attention_mass(maps["no_recompute"], n_first=2)
    assert set(mass["segment"]) == {"preamble", "prompt", "first", "body"}
    totals = mass.groupby("layer")["mass"].sum()
    assert ((totals - 1).abs() < 1e-4).all()
    wrapped = A.attention_mass(maps["kv_packet"])
    assert {"header", "trailer"} <= set(wrapped["segment"])
    spread = A.document_spread(mass)
    assert len(spread) == maps["no_recompute"].n_layers
    assert spread["entropy"].between(0, 1).all() and spread["top_share"].between(1 / 3, 1).all()
    with pytest.raises(ValueError, match="n_first=0"):
        A.attention_mass(maps["no_recompute"], n_first=0)


def test_kv_packet_needs_a_wrapper(smollm_eager):
    model, tokenizer = smollm_eager.model, smollm_eager.tokenizer
    plain = make_context(model, tokenizer, PacketStore(model, tokenizer, "smollm2-135m"), PREAMBLE,
                         DOCUMENTS[:1], TASK)
    with pytest.raises(ValueError, match="PacketWrapper"):
        A.capture(plain, "kv_packet")
    with pytest.raises(ValueError, match="no joint forward"):
        A.joint_attention(plain, "epic")
