"""``no_recompute``: plain document caches concatenated, keys re-rotated, nothing recomputed."""

from __future__ import annotations

from dataclasses import dataclass

from kvp.methods.base import Method, Prefilled, QueryContext, assemble_packets, prefill_on_assembled


@dataclass
class NoRecompute(Method):
    name = "no_recompute"

    def prefill(self, ctx: QueryContext, packets) -> Prefilled:
        kv, flops, next_pos = assemble_packets(ctx, packets)
        return prefill_on_assembled(ctx, kv, flops, next_pos=next_pos)
