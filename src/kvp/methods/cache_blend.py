"""``cache_blend``: layers 0–1 recomputed for every document token; the ``ratio`` of tokens whose
layer-1 KV deviates most from the reused cache continue through layers 2..L.

Yao et al., "CacheBlend: Fast Large Language Model Serving for RAG with Cached Knowledge
Fusion", EuroSys 2025 (arXiv 2405.16444). See docs/baselines.md#cache_blend.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvp.methods.partial import Choice, PartialRecompute, check_ratio, doc_positions


@dataclass
class CacheBlend(PartialRecompute):
    ratio: float = 0.15
    check_layer: int = 1

    name = "cache_blend"

    def __post_init__(self):
        check_ratio(self.ratio, self.name)

    def choose(self, ctx, kv, token_ids, docs) -> Choice:
        ratio, check_layer = self.ratio, self.check_layer

        def select(layer, idx, old, new):
            if layer != check_layer:
                return None
            dev = sum(((n.float() - o.float()) ** 2).sum(dim=(0, 2)) for o, n in zip(old, new))
            k = round(ratio * len(idx))
            return dev.topk(k).indices  # (k,) positions into idx

        return Choice(doc_positions(docs), select)
