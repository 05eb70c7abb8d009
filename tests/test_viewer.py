"""The attention viewer's pictures as plain functions of captured maps, without any widget."""

from __future__ import annotations

import pytest
import torch

from kvp import attention as A
from kvp.attention import plain_view
from kvp.methods import make_context
from kvp.packet import PacketStore, PacketWrapper
from kvp.viewer import (attention_matrix, draw_difference, draw_map, draw_segments, png,
                        segment_of, token_labels, token_panel)

SAMPLE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "Answer the question using the documents below.\n",
          ["Alice Moreau was born in Lyon and works for Nestle.\n",
           "Bruno Keller was born in Graz and lives in Zurich.\n"],
          "Where was Bruno Keller born?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def maps(smollm):
    """(tokenizer, kv_packet map with a 2 + 1 wrapper, no_recompute map) of SAMPLE."""
    model, tokenizer = smollm.model, smollm.tokenizer
    wrapper = PacketWrapper.init_from_embeddings(model, h=2, t=1, seed=0)
    ctx = make_context(model, tokenizer, PacketStore(model, tokenizer, "m"), *SAMPLE,
                       wrapper=wrapper)
    return tokenizer, A.capture(ctx, "kv_packet"), A.capture(ctx, "no_recompute")


def test_token_labels_and_segments(smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    wrapper = PacketWrapper.init_from_embeddings(model, h=2, t=1, seed=0)
    preamble, docs, task = SAMPLE
    ctx = make_context(model, tokenizer, PacketStore(model, tokenizer, "m"), preamble, docs, task,
                       wrapper=wrapper)
    amap = A.capture(ctx, "kv_packet")
    labels = token_labels(tokenizer, amap)
    lay = amap.layout
    assert labels[lay.headers[1][0]] == "[H1]" and labels[lay.trailers[0][0]] == "[T1]"
    assert "".join(labels[slice(*lay.bodies[0])]) == docs[0]
    assert segment_of(lay, lay.headers[1][0]) == "doc 2 header"
    assert segment_of(lay, lay.bodies[1][0]) == "doc 2"
    assert segment_of(lay, lay.final[0]) == "prompt"
    plain, plain_layout = plain_view(amap, amap.probs[0, 0])
    n_plain = lay.length - 2 * (2 + 1)
    assert plain.shape == (n_plain, n_plain) and plain_layout.length == n_plain
    torch.testing.assert_close(plain[-1], amap.probs[0, 0, -1][amap.token_ids >= 0])

def test_map_and_difference_draw_the_matrices_they_return(maps):
    _, packet, plain = maps
    fig, matrix, layout = draw_map(packet, 3, None, packet.layout.length - 1)
    torch.testing.assert_close(matrix, packet.probs[3].float().mean(0), equal_nan=True)
    assert layout is packet.layout and png(fig)[:4] == b"\x89PNG"
    assert torch.equal(attention_matrix(packet, 3, 1), packet.probs[3, 1].float())
    same, diff, _ = draw_difference(packet, packet, 3, 1, 0)
    assert torch.nan_to_num(diff).abs().max() == 0  # a map minus itself
    _, diff, shared = draw_difference(packet, plain, 3, None, 0)  # wrapped vs plain: shared tokens
    a, _ = plain_view(packet, attention_matrix(packet, 3, None))
    assert shared.length == plain.layout.length == diff.shape[0]
    torch.testing.assert_close(diff, a - attention_matrix(plain, 3, None), equal_nan=True)
    assert png(draw_segments(packet, plain, 3, None))[:4] == b"\x89PNG"


def test_token_panel_names_the_query_and_its_top_key(maps):
    tokenizer, packet, _ = maps
    matrix = attention_matrix(packet, 3, None)
    q = packet.layout.length - 1
    panel = token_panel(token_labels(tokenizer, packet), packet, matrix, packet.layout, q)
    top = int(matrix[q].nan_to_num(0).abs().argmax())
    assert f"<b>query {q}</b>" in panel and f"<li>{top} " in panel and "(prompt)" in panel
    reused = matrix.clone()
    reused[0] = float("nan")  # a row a cache-reusing method does not compute
    assert "computes no attention row" in token_panel(token_labels(tokenizer, packet), packet,
                                                      reused, packet.layout, 0)
