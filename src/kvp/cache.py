"""KV operations on the public HF ``Cache`` API: encode a chunk, stack, concatenate, positions.

A chunk's KV is kept as two stacked tensors ``keys, values`` of shape (L, H_kv, S, D) (batch 1):
one tensor per side lets re-rotation and concatenation run as single batched ops over all layers.
``to_cache`` turns them into an HF ``DynamicCache`` through ``Cache.update``; ``from_cache`` reads one
back through ``cache.layers[i].keys / .values``. Nothing else of the cache internals is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvp.models import check_supported


@dataclass(frozen=True)
class ChunkKV:
    """Per-layer keys/values of one chunk, stacked: keys/values (L, H_kv, S, D), positions 0..S-1."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def slice(self, start: int, stop: int) -> ChunkKV:
        """Tokens ``start:stop`` of every layer (a view)."""
        return ChunkKV(self.keys[..., start:stop, :], self.values[..., start:stop, :])


def check_cache_supported(model) -> None:
    """Refuse models whose layers are not all full attention (sliding windows cannot be concatenated)."""
    check_supported(model.config)


def to_cache(keys: torch.Tensor, values: torch.Tensor) -> DynamicCache:
    """(L, H_kv, S, D) stacked keys/values → a ``DynamicCache`` of batch 1 (one ``update`` per layer)."""
    cache = DynamicCache()
    for layer in range(keys.shape[0]):
        cache.update(keys[layer][None], values[layer][None], layer)  # (1, H_kv, S, D)
    return cache


def from_cache(cache, start: int = 0, stop: int | None = None) -> ChunkKV:
    """Stack the keys/values of every cache layer, tokens ``start:stop`` → ChunkKV (L, H_kv, S, D)."""
    keys = torch.stack([layer.keys[0, :, start:stop] for layer in cache.layers])  # (L, H, S, D)
    values = torch.stack([layer.values[0, :, start:stop] for layer in cache.layers])
    return ChunkKV(keys, values)


@torch.no_grad()
def encode(model, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
           start: int = 0) -> ChunkKV:
    """Prefill one chunk on its own at positions ``start..start+S-1`` and return its KV.

    Args:
        input_ids: (S,) token ids, or
        inputs_embeds: (S, d_model) embeddings (e.g. header + document + trailer).
    Returns:
        ChunkKV with keys/values (L, H_kv, S, D).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids.to(model.device))
    seq = inputs_embeds.shape[0]
    if seq == 0:
        raise ValueError("cannot encode an empty chunk")
    positions = torch.arange(start, start + seq, device=model.device)[None]  # (1, S)
    cache = DynamicCache()
    model.model(inputs_embeds=inputs_embeds[None].to(model.dtype), position_ids=positions,
                past_key_values=cache, use_cache=True)
    return from_cache(cache)


def concat(chunks: list[ChunkKV]) -> ChunkKV:
    """Concatenate chunks along the sequence axis (one copy per side)."""
    return ChunkKV(torch.cat([c.keys for c in chunks], dim=-2),
                   torch.cat([c.values for c in chunks], dim=-2))


def chunk_offsets(lengths: list[int], start: int = 0) -> list[int]:
    """Global start position of each chunk laid out back to back from ``start``."""
    offsets, pos = [], start
    for n in lengths:
        offsets.append(pos)
        pos += n
    return offsets
