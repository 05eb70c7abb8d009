"""The KV Packet query step, optimised: preallocated cache, fused re-rotation, lean prompt prefill.

The plain path (``kvp.packet.assemble`` + ``kvp.generate.prefill``) concatenates the packets into a
new tensor, re-rotates the keys with several fp32 passes, copies everything again into an HF
``DynamicCache`` (whose ``update`` concatenates), and runs the prompt through the HF forward, whose
cache update copies the whole context once more. Here (SPEC §2, same maths):

* ``KVBuffer`` — keys/values (L, H_kv, C, D) allocated once for a capacity C (context + prompt);
* ``assemble_into`` — ``[preamble][packet 1]…[packet N]`` copied straight into the buffer, then all
  layers' keys re-rotated in place in one batched op (with ``fused=True`` one compiled kernel reads
  the bf16 keys and writes them back rotated, fp32 inside, exactly ``kvp.rope.apply_rotation``);
* ``prompt_step`` — the prompt through every layer with the model's own modules: its K/V go into the
  buffer slots after the context and its queries attend through SDPA with a lower-right causal
  bias, so attention costs prompt × context (never context²) and nothing is copied; only the last
  position reaches the LM head;
* ``PromptGraph`` — ``prompt_step`` captured once as a CUDA graph for one (context length, prompt
  length) and replayed, removing the per-kernel launch overhead of the short prompt.

Decoding can continue from the buffer: ``kvp.cache.to_cache(buf.keys[..., :n, :], buf.values[..., :n, :])``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvp.cache import ChunkKV, check_cache_supported, chunk_offsets
from kvp.packet import Packet
from kvp.recompute import project_qkv
from kvp.rope import apply_rotation, rotary_module, rotate_half, rotation


@dataclass(frozen=True)
class KVBuffer:
    """Preallocated keys/values (L, H_kv, C, D) of one query: context then prompt, batch 1."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    @classmethod
    def allocate(cls, model, capacity: int) -> KVBuffer:
        """Empty buffer for ``capacity`` tokens in the model's dtype and device."""
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, capacity, head_dim)
        return cls(torch.empty(shape, dtype=model.dtype, device=model.device),
                   torch.empty(shape, dtype=model.dtype, device=model.device))


def _rotate_into(out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """out (…, S, D) ← keys (…, S, D) rotated by cos/sin (S, D), as ``apply_rotation``."""
    out.copy_(apply_rotation(keys, cos, sin))


_compiled_rotate_into = None


def rotate_into(out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                fused: bool = False) -> None:
    """Write the re-rotated ``keys`` into ``out`` (a buffer slice; ``out`` may be ``keys``).

    ``fused=True`` runs ``torch.compile`` (dynamic shapes: one compilation for every length and
    offset) so the cast, the rotation and the store are one kernel: the keys are read once and
    written once. The eager path makes several fp32 passes; the values are the same.
    """
    global _compiled_rotate_into
    if not fused:
        _rotate_into(out, keys, cos, sin)
        return
    if _compiled_rotate_into is None:
        _compiled_rotate_into = torch.compile(_rotate_into, dynamic=True, fullgraph=True)
    _compiled_rotate_into(out, keys, cos, sin)


@torch.no_grad()
def assemble_into(model, buf: KVBuffer, preamble: ChunkKV, packets: list[Packet],
                  fused: bool = False) -> tuple[int, int]:
    """``[preamble][packet 1]…[packet N]`` written into ``buf``, packet keys re-rotated to their
    global offsets (the same result as ``kvp.packet.assemble``, without intermediate tensors).

    Returns:
        (cached tokens n, next free position); the buffer holds them at slots 0..n-1.
    """
    check_cache_supported(model)
    chunks = [preamble] + [p.kv for p in packets]
    spans = [preamble.length] + [p.length for p in packets]
    stored = [c.length for c in chunks]
    n_cached = sum(stored)
    if n_cached > buf.capacity:
        raise ValueError(f"the context has {n_cached} cached tokens but the buffer holds "
                         f"{buf.capacity}; allocate KVBuffer with capacity >= context + prompt")
    deltas = torch.repeat_interleave(torch.tensor(chunk_offsets(spans)), torch.tensor(stored))
    cos, sin = rotation(model, deltas, device=buf.keys.device)  # (n_cached, D)
    slot = 0
    for chunk in chunks:  # plain copies: cheap launches, whatever the number of packets
        end = slot + chunk.length
        buf.keys[:, :, slot:end].copy_(chunk.keys)
        buf.values[:, :, slot:end].copy_(chunk.values)
        slot = end
    keys = buf.keys[:, :, :n_cached]
    rotate_into(keys, keys, cos, sin, fused)  # one batched (fused) rotation over all layers, in place
    return n_cached, int(sum(spans))


@torch.no_grad()
def prompt_step(model, buf: KVBuffer, n_cached: int, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """Prefill the prompt against the first ``n_cached`` buffer slots; returns the last logits (V,).

    Args:
        input_ids: (T,) prompt ids on the model's device; positions: (T,) their RoPE positions.
    The prompt's K/V are written to slots ``n_cached..n_cached+T-1`` (the decoder-layer maths of
    llama / mistral / qwen2 / qwen3, with the model's own modules, as ``kvp.recompute``).
    """
    inner = model.model
    seq = len(input_ids)
    end = n_cached + seq
    if end > buf.capacity:
        raise ValueError(f"context {n_cached} + prompt {seq} tokens exceed the buffer's capacity "
                         f"{buf.capacity}; allocate a larger KVBuffer")
    hidden = inner.embed_tokens(input_ids)  # (T, d)
    cos, sin = rotary_module(model)(hidden[None], positions[None])  # (1, T, hd)
    bias = causal_lower_right(seq, end)  # prompt token i sees slots 0..n_cached+i
    for layer_idx, layer in enumerate(inner.layers):
        attn = layer.self_attn
        q, k, v = project_qkv(attn, layer.input_layernorm(hidden), seq)  # (H, T, hd), (H_kv, T, hd) ×2
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = buf.keys[layer_idx], buf.values[layer_idx]  # (H_kv, C, hd) views
        keys[:, n_cached:end] = k
        values[:, n_cached:end] = v
        out = F.scaled_dot_product_attention(q[None], keys[None, :, :end], values[None, :, :end],
                                             attn_mask=bias, scale=attn.scaling,
                                             enable_gqa=True)[0]  # (H, T, hd)
        hidden = hidden + attn.o_proj(out.transpose(0, 1).reshape(seq, -1))  # (T, d)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden[-1:]))[0]  # (V,)


def prompt_positions(model, start: int, seq: int) -> torch.Tensor:
    return torch.arange(start, start + seq, device=model.device)


@torch.no_grad()
def fast_query(model, buf: KVBuffer, preamble: ChunkKV, packets: list[Packet],
               task_ids: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, int]:
    """The whole query step (assembly + prompt prefill): (first logits (V,), next free position)."""
    ids = task_ids.to(model.device)  # before any kernel is queued: a host copy waits for the GPU
    n_cached, start = assemble_into(model, buf, preamble, packets, fused)
    logits = prompt_step(model, buf, n_cached, ids, prompt_positions(model, start, len(ids)))
    return logits, start + len(ids)


class PromptGraph:
    """``prompt_step`` for one (n_cached, prompt length, start) captured as a CUDA graph.

    The buffer's storage is part of the graph: assemble the next context into the same ``buf``
    (same n_cached) and call the graph with the new prompt ids.
    """

    def __init__(self, model, buf: KVBuffer, n_cached: int, prompt_len: int, start: int,
                 warmup: int = 2):
        if buf.keys.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the buffer is on {buf.keys.device}; "
                             "use prompt_step directly on other devices")
        self.ids = torch.zeros(prompt_len, dtype=torch.long, device=buf.keys.device)
        self.positions = prompt_positions(model, start, prompt_len)
        args = (model, buf, n_cached, self.ids, self.positions)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (allocator, library handles)
            for _ in range(warmup):
                prompt_step(*args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = prompt_step(*args)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Replay for prompt ``input_ids`` (prompt_len,); returns the last logits (V,) (a static
        tensor, overwritten by the next replay)."""
        self.ids.copy_(input_ids)
        self.graph.replay()
        return self.logits
