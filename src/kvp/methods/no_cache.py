"""``no_cache``: closed book — the preamble and the prompt only (the floor).

A control of the KV Packet paper (arXiv 2604.13226), no paper of its own; see
docs/baselines.md#no_cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvp.methods.base import Method, Prefilled, QueryContext, prefill_on_assembled


@dataclass
class NoCache(Method):
    name = "no_cache"

    def prepare(self, ctx: QueryContext):
        return None

    def prefill(self, ctx: QueryContext, prepared) -> Prefilled:
        return prefill_on_assembled(ctx, ctx.preamble_kv.slice(0, ctx.n_preamble), flops=0)
