"""Partial recompute rewrites exactly the chosen tokens' K/V."""

from __future__ import annotations

import torch

from kvp.methods import get_method
from kvp.methods.base import assemble_packets
from kvp.recompute import recompute


def test_recompute_rewrites_only_selected_tokens(ctx):
    method = get_method("no_recompute")
    kv, _, _ = assemble_packets(ctx, method.prepare(ctx))
    before = kv.keys.clone()
    ids = torch.cat([ctx.preamble_ids, *ctx.doc_ids])
    chosen = torch.tensor([ctx.n_preamble + 40, ctx.n_preamble + 41, ctx.n_preamble + 60])
    trace = recompute(ctx.model, kv, ids, chosen)
    changed = (kv.keys - before).abs().amax(dim=(0, 1, 3)) > 0  # (S,)
    assert changed.nonzero().flatten().tolist() == chosen.tolist()
    assert trace.tokens_per_layer == [3] * ctx.model.config.num_hidden_layers
