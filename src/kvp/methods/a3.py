"""``a3``: the ``ratio`` of document tokens that the question attends to most are recomputed.

Scores: attention probabilities from the task prompt's tokens to each cached document token,
summed over heads, prompt tokens and layers, computed on the reused (no-recompute) cache.

Zhou et al., "A³: Attention-Aware Accurate KV Cache Fusion for Fast Large Language Model
Serving", arXiv 2511.17560, 2025 (our reading). See docs/baselines.md#a3.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvp.methods.partial import (Choice, PartialRecompute, check_ratio, doc_positions,
                                 question_attention, top_fraction)


@dataclass
class A3(PartialRecompute):
    ratio: float = 0.15

    name = "a3"

    def __post_init__(self):
        check_ratio(self.ratio, self.name)

    def choose(self, ctx, kv, token_ids, docs) -> Choice:
        scores, flops = question_attention(ctx, kv, token_ids)
        positions = doc_positions(docs)
        return Choice(top_fraction(scores[positions], positions, self.ratio), flops=flops)
