"""``rand_recompute``: a random ``ratio`` of document tokens recomputed in all layers (a control).

A control of the KV Packet paper (arXiv 2604.13226), no paper of its own; see
docs/baselines.md#rand_recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvp.methods.partial import Choice, PartialRecompute, check_ratio, doc_positions


@dataclass
class RandRecompute(PartialRecompute):
    ratio: float = 0.15
    seed: int = 0

    name = "rand_recompute"

    def __post_init__(self):
        check_ratio(self.ratio, self.name)

    def choose(self, ctx, kv, token_ids, docs) -> Choice:
        positions = doc_positions(docs)
        gen = torch.Generator().manual_seed(self.seed)
        k = round(self.ratio * len(positions))
        return Choice(positions[torch.randperm(len(positions), generator=gen)[:k]].sort().values)
