"""Analytic FLOPs of the query step (docs/protocol.md#flops-model).

Per layer, for ``s`` query tokens attending to ``k`` keys (cache included):
* q/k/v/o projections: ``2·s·d·(H·hd) + 2·2·s·d·(H_kv·hd) + 2·s·(H·hd)·d``
* RoPE on q and k: ``3·s·(H + H_kv)·rope_dim``
* attention: ``4·s·k·hd·H`` (QKᵀ and AV, the full rectangle as SDPA computes it)
* MLP (gated): ``6·s·D·I``
plus the LM head ``2·d·V`` per position whose logits are computed (1 in a prefill).
Re-rotating ``seq`` cached keys costs ``(4 + 3·H_kv)·seq·rope_dim`` per layer.
Matmul terms are what ``torch.utils.flop_counter.FlopCounterMode`` counts; tests compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvp.models import head_dim


@dataclass(frozen=True)
class Arch:
    """Architecture facts needed for FLOPs."""

    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_dim: int

    @classmethod
    def from_config(cls, config) -> Arch:
        width = head_dim(config)
        rope = getattr(config, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, width, config.intermediate_size,
                   config.vocab_size, int(width * factor))


def layer_flops(arch: Arch, s: int, keys: int) -> int:
    """One decoder layer: ``s`` query tokens attending to ``keys`` keys."""
    q_dim, kv_dim = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    proj = 2 * s * arch.d_model * (q_dim + 2 * kv_dim) + 2 * s * q_dim * arch.d_model
    rope = 3 * s * (arch.num_heads + arch.num_kv_heads) * arch.rope_dim
    attn = 4 * s * keys * arch.head_dim * arch.num_heads
    mlp = 6 * s * arch.d_model * arch.intermediate
    return proj + rope + attn + mlp


def lm_head_flops(arch: Arch, positions: int = 1) -> int:
    return 2 * positions * arch.d_model * arch.vocab


def prefill_flops(arch: Arch, s: int, cache: int, lm_head_positions: int = 1) -> int:
    """All layers: prefill ``s`` tokens against a cache of ``cache`` tokens (keys = s + cache)."""
    return arch.num_layers * layer_flops(arch, s, s + cache) + lm_head_flops(arch, lm_head_positions)


def rerotation_flops(arch: Arch, seq: int) -> int:
    """Re-rotating ``seq`` cached keys in every layer: ``L·(4 + 3·H_kv)·seq·rope_dim``."""
    return arch.num_layers * (4 + 3 * arch.num_kv_heads) * seq * arch.rope_dim


def recompute_flops(arch: Arch, tokens_per_layer: list[int], keys: int) -> int:
    """Partial recompute: ``tokens_per_layer[l]`` tokens pass layer l, each attending to ``keys``."""
    return sum(layer_flops(arch, n, keys) for n in tokens_per_layer if n)
