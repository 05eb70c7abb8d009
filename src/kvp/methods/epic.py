"""``epic``: the first ``n_tokens`` of every document recomputed in all layers (attention-sink repair).

Hu et al., "EPIC: Efficient Position-Independent Caching for Serving Large Language Models",
ICML 2025 (arXiv 2410.15332), its LegoLink algorithm. See docs/baselines.md#epic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvp.methods.partial import Choice, PartialRecompute


@dataclass
class Epic(PartialRecompute):
    n_tokens: int = 32

    name = "epic"

    def __post_init__(self):
        if isinstance(self.n_tokens, bool) or not isinstance(self.n_tokens, int):
            raise ValueError(f"epic: n_tokens={self.n_tokens!r} is a {type(self.n_tokens).__name__}; "
                             "pass a whole number >= 0, e.g. n_tokens=32")
        if self.n_tokens < 0:
            raise ValueError(f"epic: n_tokens={self.n_tokens} must be >= 0")

    def choose(self, ctx, kv, token_ids, docs) -> Choice:
        return Choice(torch.cat([torch.arange(a, min(b, a + self.n_tokens)) for a, b in docs]))
