"""The block-mask forward equals packets encoded alone and re-rotated; its mask pattern."""

from __future__ import annotations

import pytest
import torch
from biography_docs import DOCS, all_logits_after

from kvp.blockmask import block_forward, block_mask, make_layout
from kvp.packet import PacketWrapper, assemble, build_packet


@pytest.mark.parametrize("wrapped", [True, False], ids=["random-wrapper", "empty-wrapper"])
def test_rerotated_packets_equal_block_mask_forward(smollm, ctx, wrapper, wrapped):
    model, tokenizer = smollm.model, smollm.tokenizer
    w = wrapper if wrapped else PacketWrapper.empty(model.config.hidden_size)
    packets = [build_packet(model, tokenizer, d, w) for d in DOCS]
    kv, n = assemble(model, ctx.preamble_kv, packets)
    fast = all_logits_after(model, kv, ctx.task_ids)
    with torch.no_grad():
        slow, layout, _ = block_forward(model, ctx.preamble_ids, ctx.doc_ids, ctx.task_ids, w)
    assert layout.final[0] == n
    torch.testing.assert_close(fast, slow, atol=2e-3, rtol=1e-3)
    # and it is not trivially so: full attention over the same sequence differs
    with torch.no_grad():
        joint = torch.cat([ctx.preamble_ids, *ctx.doc_ids, ctx.task_ids])[None]
        full = model(joint).logits[0, -len(ctx.task_ids):]
    if not wrapped:
        assert (full - slow).abs().max() > 0.1


def test_block_mask_shape_and_pattern():
    layout = make_layout(2, [3, 2], 2, h=1, t=1)
    allowed = block_mask(layout, torch.float32)[0, 0] == 0
    assert layout.docs == [(2, 7), (7, 11)] and layout.final == (11, 13)
    assert allowed[6, 2] and not allowed[6, 1]  # doc 1 sees only itself
    assert not allowed[8, 5]  # doc 2 does not see doc 1
    assert allowed[12].all() and not allowed[11, 12]  # final block: everything, causally
