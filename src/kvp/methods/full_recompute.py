"""``full_recompute``: preamble cached; all documents and the prompt prefilled jointly (the ceiling).

The ordinary prefix-cached prefill, no paper of its own; the reference of agreement. See
docs/baselines.md#full_recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvp.cache import to_cache
from kvp.flops import prefill_flops
from kvp.generate import prefill
from kvp.methods.base import Method, Prefilled, QueryContext


@dataclass
class FullRecompute(Method):
    name = "full_recompute"

    def prepare(self, ctx: QueryContext):
        return None

    def prefill(self, ctx: QueryContext, prepared) -> Prefilled:
        cache = to_cache(ctx.preamble_kv.keys, ctx.preamble_kv.values)
        ids = torch.cat([*ctx.doc_ids, ctx.task_ids])  # (n_docs_tokens + T,)
        logits = prefill(ctx.model, cache, ids, ctx.n_preamble)
        flops = prefill_flops(ctx.arch, len(ids), ctx.n_preamble)
        return Prefilled(cache, logits, ctx.n_preamble + len(ids), flops, ctx.n_docs_tokens)
