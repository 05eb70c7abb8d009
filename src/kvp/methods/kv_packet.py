"""``kv_packet``: wrapped packets concatenated, keys re-rotated (the paper's method).

Chen et al., "KV Packet: Recomputation-Free Context-Independent KV Caching for LLMs", arXiv
2604.13226, 2026. See docs/baselines.md#kv_packet and docs/method.md#query-time-assembly.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvp.methods.base import Method, Prefilled, QueryContext, assemble_packets, prefill_on_assembled


@dataclass
class KVPacket(Method):
    """Uses the context's wrapper (``QueryContext.wrapper``); without one it is refused."""

    name = "kv_packet"

    def prepare(self, ctx: QueryContext):
        if ctx.wrapper is None:
            raise ValueError("kv_packet needs a PacketWrapper: pass wrapper= to make_context "
                             "(a trained adapter from data/adapters/, or PacketWrapper.load(path))")
        return [ctx.store.get(d, ctx.wrapper) for d in ctx.documents]

    def prefill(self, ctx: QueryContext, packets) -> Prefilled:
        kv, flops, next_pos = assemble_packets(ctx, packets)
        return prefill_on_assembled(ctx, kv, flops, next_pos=next_pos)
