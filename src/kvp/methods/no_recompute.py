"""``no_recompute``: plain document caches concatenated, keys re-rotated, nothing recomputed.

The naive reuse that CacheBlend (Yao et al., EuroSys 2025) calls full KV reuse and EPIC (Hu et
al., ICML 2025) naive position-independent caching; see docs/baselines.md#no_recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvp.methods.base import Method, Prefilled, QueryContext, assemble_packets, prefill_on_assembled


@dataclass
class NoRecompute(Method):
    name = "no_recompute"

    def prefill(self, ctx: QueryContext, packets) -> Prefilled:
        kv, flops, next_pos = assemble_packets(ctx, packets)
        return prefill_on_assembled(ctx, kv, flops, next_pos=next_pos)
