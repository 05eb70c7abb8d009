"""``sam_kv``: per document, the first ``initial`` and last ``local`` tokens plus the blocks of
``block`` tokens that hold the question's attention are recomputed (our reading of SAM-KV).

Block scores are the question's attention summed over the ``stable_layers`` last layers; blocks are
taken in decreasing score until they hold ``theta`` of the document's middle-token attention mass.
Large setting: 64/128/64; small: 8/16/8 (docs/baselines.md#sam_kv).

Cao et al., "Sparse Attention across Multiple-context KV Cache" (SamKV), AAAI 2026 (arXiv
2508.11661). Only its token selection is reproduced: unselected KV is kept, not evicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvp.methods.partial import Choice, PartialRecompute, question_attention


@dataclass
class SamKV(PartialRecompute):
    initial: int = 8
    local: int = 16
    block: int = 8
    theta: float = 0.9
    stable_layers: int = 4

    name = "sam_kv"

    def __post_init__(self):
        if min(self.initial, self.local) < 0 or self.block < 1 or not 0 <= self.theta <= 1:
            raise ValueError(f"sam_kv: initial={self.initial}, local={self.local} must be >= 0, "
                             f"block={self.block} >= 1 and theta={self.theta} in [0, 1]")

    def choose(self, ctx, kv, token_ids, docs) -> Choice:
        num_layers = ctx.model.config.num_hidden_layers
        layers = list(range(max(0, num_layers - self.stable_layers), num_layers))
        scores, flops = question_attention(ctx, kv, token_ids, layers)
        chosen = []
        for a, b in docs:
            head_end, tail_start = min(b, a + self.initial), max(a, b - self.local)
            chosen += [torch.arange(a, head_end), torch.arange(max(head_end, tail_start), b)]
            starts = torch.arange(head_end, max(head_end, tail_start), self.block)  # none: a short doc
            if len(starts) == 0:
                continue
            mass = torch.stack([scores[s:min(s + self.block, tail_start)].sum() for s in starts])
            order = mass.argsort(descending=True)
            cumulative = mass[order].cumsum(0) / mass.sum().clamp_min(1e-12)
            n_blocks = int((cumulative < self.theta).sum()) + 1
            chosen += [torch.arange(s, min(s + self.block, tail_start)) for s in starts[order[:n_blocks]]]
        return Choice(torch.cat(chosen).unique().sort().values, flops=flops)
