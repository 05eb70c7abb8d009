"""Shared scaffolding of the partial-recompute baselines (CacheBlend, EPIC, A3, SAM-KV, random).

Each starts from the no-recompute cache (plain packets, re-rotated), chooses which document tokens
to recompute, rewrites only their K/V (``kvp.recompute``) and prefills the prompt. Subclasses
implement ``choose``; the FLOPs reported are the re-rotation, any scoring pass, the recompute of
exactly the chosen tokens, and the prompt prefill (docs/baselines.md#partial-recompute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvp.cache import ChunkKV
from kvp.flops import recompute_flops
from kvp.methods.base import Method, Prefilled, QueryContext, assemble_packets, prefill_on_assembled
from kvp.recompute import RecomputeTrace, Select, recompute


def check_ratio(ratio: float, name: str) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ValueError(f"{name}: ratio={ratio!r} is a {type(ratio).__name__}; pass a number "
                         "within [0, 1], e.g. ratio=0.3")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name}: ratio={ratio} must be within [0, 1] (fraction of document "
                         "tokens recomputed)")


@dataclass
class Choice:
    """Tokens to recompute from layer 0 (global positions), an optional per-layer ``select``, and
    the FLOPs spent choosing them."""

    idx: torch.Tensor
    select: Select | None = None
    flops: int = 0


@dataclass
class PartialRecompute(Method):
    """Base of the recompute baselines; ``choose`` is the only method a subclass must define."""

    def choose(self, ctx: QueryContext, kv: ChunkKV, token_ids: torch.Tensor,
               docs: list[tuple[int, int]]) -> Choice:
        raise NotImplementedError

    def prefill(self, ctx: QueryContext, packets) -> Prefilled:
        kv, flops, _ = assemble_packets(ctx, packets)
        token_ids = torch.cat([ctx.preamble_ids, *ctx.doc_ids])  # (S,)
        docs, pos = [], ctx.n_preamble
        for ids in ctx.doc_ids:
            docs.append((pos, pos + len(ids)))
            pos += len(ids)
        choice = self.choose(ctx, kv, token_ids, docs)
        trace = recompute(ctx.model, kv, token_ids, choice.idx, choice.select)
        flops += choice.flops + recompute_flops(ctx.arch, trace.tokens_per_layer, kv.length)
        return prefill_on_assembled(ctx, kv, flops, n_recomputed=len(choice.idx))


def doc_positions(docs: list[tuple[int, int]]) -> torch.Tensor:
    """(n_docs_tokens,) global positions of every document token."""
    return torch.cat([torch.arange(a, b) for a, b in docs])


def top_fraction(scores: torch.Tensor, positions: torch.Tensor, ratio: float) -> torch.Tensor:
    """The ``ratio`` fraction of ``positions`` with the highest ``scores`` (same length), sorted."""
    k = round(ratio * len(positions))
    return positions[scores.topk(k).indices].sort().values


def question_attention(ctx: QueryContext, kv: ChunkKV, token_ids: torch.Tensor,
                       layers: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Attention from the task prompt's tokens to every cached token, summed over heads, queries and
    ``layers`` (default all): (S,) on the CPU (it indexes CPU positions), with the FLOPs of the
    scoring pass.

    The prompt is run through a scratch copy of the cache extended by its own tokens; the real
    cache is not touched.
    """
    n_task = len(ctx.task_ids)
    pad = kv.keys.new_zeros(*kv.keys.shape[:-2], n_task, kv.keys.shape[-1])
    scratch = ChunkKV(torch.cat([kv.keys, pad], dim=-2), torch.cat([kv.values, pad], dim=-2))
    ids = torch.cat([token_ids, ctx.task_ids])
    idx = torch.arange(kv.length, kv.length + n_task)
    trace: RecomputeTrace = recompute(ctx.model, scratch, ids, idx, keep_attention=True)
    chosen = layers if layers is not None else range(len(trace.attention))
    scores = torch.stack([trace.attention[i] for i in chosen]).sum(0)[: kv.length].cpu()
    return scores, recompute_flops(ctx.arch, trace.tokens_per_layer, scratch.length)
