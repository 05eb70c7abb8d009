"""Partial recompute: rewrite the K/V of selected tokens, layer by layer, in an assembled cache.

This is the engine behind CacheBlend, EPIC, A3, SAM-KV and random recompute
(docs/baselines.md#partial-recompute). Only the selected tokens pass through the layers: at layer
``l`` their hidden states give fresh q/k/v (RoPE at their global positions), the fresh k/v overwrite
the cached ones in place, and their queries attend causally over the whole layer-``l`` cache (fresh
where recomputed, reused elsewhere). A ``select`` callback may shrink the token set after any layer
(CacheBlend keeps all tokens for layers 0–1, then only the most deviating ones). The FLOPs reported
are those of exactly this work.

The layer maths follows the HF decoder layer of llama / mistral / qwen2 / qwen3 (pre-norm
attention and gated MLP, optional q/k norm); it reuses the model's own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvp.cache import ChunkKV
from kvp.rope import rotary_module, rotate_half

# select(layer, idx, old_kv, new_kv) -> positions into idx to keep for the next layer, or None (all).
# old_kv / new_kv: (keys, values), each (H_kv, n, D), before / after this layer's recompute.
Select = Callable[[int, torch.Tensor, tuple, tuple], torch.Tensor | None]


@dataclass
class RecomputeTrace:
    """What a recompute did: tokens per layer and, if asked, attention (S,) summed per layer."""

    tokens_per_layer: list[int]
    attention: list[torch.Tensor] | None = None


def project_qkv(attn, x: torch.Tensor, n: int,
                fused: tuple[torch.Tensor, torch.Tensor | None] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, d) normed hidden → q (H, n, hd), k and v (H_kv, n, hd), q/k norm applied if present.

    ``fused``: (weight, bias) of q/k/v stacked (``kvp.query_step.FusedProjections``), one GEMM instead
    of the three projections."""
    hd = attn.head_dim
    if fused is None:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    else:
        n_kv = attn.k_proj.weight.shape[0]
        q, k, v = F.linear(x, *fused).split([fused[0].shape[0] - 2 * n_kv, n_kv, n_kv], -1)
    q, k, v = q.view(n, -1, hd), k.view(n, -1, hd), v.view(n, -1, hd)  # (n, H or H_kv, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)


@torch.no_grad()
def recompute(model, kv: ChunkKV, token_ids: torch.Tensor, idx: torch.Tensor,
              select: Select | None = None, keep_attention: bool = False) -> RecomputeTrace:
    """Recompute tokens ``idx`` of an assembled cache in place (all layers, or as ``select`` decides).

    Args:
        kv: assembled cache, keys/values (L, H_kv, S, D) at global positions 0..S-1; modified in place.
        token_ids: (S,) ids of every cached token (wrapper tokens cannot be recomputed from ids).
        idx: (n,) sorted global positions to recompute from layer 0.
        keep_attention: also return, per layer, the selected queries' attention probabilities
            summed over heads and queries, (S,) each (A3 / SAM-KV scoring).
    """
    inner = model.model
    rotary = rotary_module(model)
    device = kv.keys.device
    idx = idx.to(device)
    seq = kv.keys.shape[-2]
    hidden = inner.embed_tokens(token_ids.to(device)[idx])  # (n, d)
    key_pos = torch.arange(seq, device=device)
    trace = RecomputeTrace([], [] if keep_attention else None)
    for layer_idx, layer in enumerate(inner.layers):
        n = len(idx)
        trace.tokens_per_layer.append(n)
        if n == 0:
            continue
        attn = layer.self_attn
        q, k, v = project_qkv(attn, layer.input_layernorm(hidden), n)
        cos, sin = rotary(hidden[None], idx[None])  # (1, n, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = kv.keys[layer_idx], kv.values[layer_idx]  # (H_kv, S, D) views
        old = (keys[:, idx].clone(), values[:, idx].clone()) if select is not None else None
        keys[:, idx] = k.to(keys.dtype)
        values[:, idx] = v.to(values.dtype)
        allowed = key_pos[None, :] <= idx[:, None]  # (n, S): causal in global positions
        groups = q.shape[0] // keys.shape[0]
        k_all = keys.repeat_interleave(groups, dim=0).to(q.dtype)  # (H, S, D)
        v_all = values.repeat_interleave(groups, dim=0).to(q.dtype)
        if keep_attention:
            scores = (q @ k_all.transpose(-1, -2)) * attn.scaling  # (H, n, S)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            trace.attention.append(probs.sum(dim=(0, 1)).float())  # (S,)
            out = probs.to(v_all.dtype) @ v_all  # (H, n, D)
        else:
            out = F.scaled_dot_product_attention(q[None], k_all[None], v_all[None],
                                                 attn_mask=allowed[None, None],
                                                 scale=attn.scaling)[0]  # (H, n, D)
        hidden = hidden + attn.o_proj(out.transpose(0, 1).reshape(n, -1))  # (n, d)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        if select is not None:
            keep = select(layer_idx, idx, old, (k, v))
            if keep is not None:
                keep = keep.to(device).sort().values
                idx, hidden = idx[keep], hidden[keep]
    return trace
