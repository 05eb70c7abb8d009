"""The KV Packet query step, optimised: preallocated cache, fused re-rotation, lean prompt prefill.

The plain path (``kvp.packet.assemble`` + ``kvp.generate.prefill``) concatenates the packets into a
new tensor, re-rotates the keys with several fp32 passes, copies everything again into an HF
``DynamicCache`` (whose ``update`` concatenates), and runs the prompt through the HF forward, whose
cache update copies the whole context once more. Here (SPEC §2, same maths):

* ``KVBuffer`` — keys/values (L, H_kv, C, D) allocated once for a capacity C (context + prompt);
* ``assemble_into`` — ``[preamble][packet 1]…[packet N]`` written straight into the buffer, each
  packet's keys (all layers at once) re-rotated on the way in: with ``fused=True`` one compiled
  kernel per packet reads the stored bf16 keys once and writes them rotated into their slots (fp32
  inside, exactly ``kvp.rope.apply_rotation``), so re-rotation costs no more memory traffic than
  the copy that assembly needs anyway;
* ``prompt_step`` — the prompt through every layer with the model's own projections: its K/V go
  into the buffer slots after the context and its queries attend through SDPA with a lower-right
  causal bias, so attention costs prompt × context (never context²) and nothing is copied; only the
  last position reaches the LM head. With ``fused=True`` the small element-wise steps (RMSNorm,
  RoPE, SiLU·up) run as compiled kernels, fewer launches per layer;
* ``PromptGraph`` — ``prompt_step`` captured once as a CUDA graph for one (context length, prompt
  length) and replayed, removing the per-kernel launch overhead of the short prompt.

``fused=True`` needs ``torch.compile`` (the benchmark uses it on CUDA); ``fused=False`` runs the
same maths eagerly, which is what the CPU tests check against the plain path.
Decoding can continue from the buffer: ``kvp.cache.to_cache(buf.keys[..., :n, :], buf.values[..., :n, :])``.
"""

from __future__ import annotations

from collections.abc import Callable
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


# --------------------------------------------------------------------------- element-wise kernels
def _rotate_into(out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """out (…, S, D) ← keys (…, S, D) rotated by cos/sin ((S, D) or (D,)), as ``apply_rotation``."""
    out.copy_(apply_rotation(keys, cos, sin))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(…, d) → (…, d): the RMSNorm of llama / mistral / qwen2 / qwen3 (fp32 statistics)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(H, T, D) rotated by cos/sin (T, D): HF's ``apply_rotary_pos_emb`` for one tensor."""
    return x * cos + rotate_half(x) * sin


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_compiled: dict[Callable, Callable] = {}


def kernel(fn: Callable, fused: bool) -> Callable:
    """``fn`` itself, or (``fused``) its ``torch.compile``d version, compiled once per process
    with dynamic shapes, so one compilation serves every length, offset and layer."""
    if not fused:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn]


def rotate_into(out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                fused: bool = False) -> None:
    """Write the re-rotated ``keys`` into ``out`` (a buffer slice). ``fused=True``: the cast, the
    rotation and the store are one kernel (keys read once, written once); eager makes several
    fp32 passes. The values are the same."""
    kernel(_rotate_into, fused)(out, keys, cos, sin)


def norm(module: torch.nn.Module, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """The model's RMSNorm ``module`` on x; ``fused`` runs the same maths as one compiled kernel."""
    if fused and type(module).__name__ in RMS_NORMS:
        return kernel(rms_norm, True)(x, module.weight, module.variance_epsilon)
    return module(x)


def mlp(module: torch.nn.Module, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """The gated MLP ``down(act(gate(x)) · up(x))``; ``fused`` fuses SiLU and the product."""
    if fused and getattr(getattr(module, "config", None), "hidden_act", None) == "silu":
        return module.down_proj(kernel(silu_mul, True)(module.gate_proj(x), module.up_proj(x)))
    return module(x)


# --------------------------------------------------------------------------- the query step
@torch.no_grad()
def assemble_into(model, buf: KVBuffer, preamble: ChunkKV, packets: list[Packet],
                  fused: bool = False) -> tuple[int, int]:
    """``[preamble][packet 1]…[packet N]`` written into ``buf``, packet keys re-rotated to their
    global offsets on the way in (the result of ``kvp.packet.assemble``, without intermediate
    tensors).

    Returns:
        (cached tokens n, next free position); the buffer holds them at slots 0..n-1.
    """
    check_cache_supported(model)
    chunks = [preamble] + [p.kv for p in packets]
    spans = [preamble.length] + [p.length for p in packets]
    n_cached = sum(c.length for c in chunks)
    if n_cached > buf.capacity:
        raise ValueError(f"the context has {n_cached} cached tokens but the buffer holds "
                         f"{buf.capacity}; allocate KVBuffer with capacity >= context + prompt")
    offsets = chunk_offsets(spans)
    cos, sin = rotation(model, torch.tensor(offsets), device=buf.keys.device)  # (chunks, D)
    slots = chunk_offsets([c.length for c in chunks])  # stored tokens back to back
    for i, (chunk, slot) in enumerate(zip(chunks, slots)):
        end = slot + chunk.length
        if offsets[i]:  # one batched rotation over all layers and heads of this chunk
            rotate_into(buf.keys[:, :, slot:end], chunk.keys, cos[i], sin[i], fused)
        else:
            buf.keys[:, :, slot:end].copy_(chunk.keys)
        buf.values[:, :, slot:end].copy_(chunk.values)
    return n_cached, int(sum(spans))


@torch.no_grad()
def prompt_step(model, buf: KVBuffer, n_cached: int, input_ids: torch.Tensor,
                positions: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Prefill the prompt against the first ``n_cached`` buffer slots; returns the last logits (V,).

    Args:
        input_ids: (T,) prompt ids on the model's device; positions: (T,) their RoPE positions.
        fused: compiled element-wise kernels (RMSNorm, RoPE, SiLU·up) instead of eager ops.
    The prompt's K/V are written to slots ``n_cached..n_cached+T-1`` (the decoder-layer maths of
    llama / mistral / qwen2 / qwen3, with the model's own projections, as ``kvp.recompute``).
    """
    inner = model.model
    seq = len(input_ids)
    end = n_cached + seq
    if end > buf.capacity:
        raise ValueError(f"context {n_cached} + prompt {seq} tokens exceed the buffer's capacity "
                         f"{buf.capacity}; allocate a larger KVBuffer")
    hidden = inner.embed_tokens(input_ids)  # (T, d)
    cos, sin = rotary_module(model)(hidden[None], positions[None])  # (1, T, hd)
    rotate = kernel(rope, fused)
    bias = causal_lower_right(seq, end)  # prompt token i sees slots 0..n_cached+i
    for layer_idx, layer in enumerate(inner.layers):
        attn = layer.self_attn
        q, k, v = project_qkv(attn, norm(layer.input_layernorm, hidden, fused), seq)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # (H, T, hd), (H_kv, T, hd)
        keys, values = buf.keys[layer_idx], buf.values[layer_idx]  # (H_kv, C, hd) views
        keys[:, n_cached:end] = k
        values[:, n_cached:end] = v
        out = F.scaled_dot_product_attention(q[None], keys[None, :, :end], values[None, :, :end],
                                             attn_mask=bias, scale=attn.scaling,
                                             enable_gqa=True)[0]  # (H, T, hd)
        hidden = hidden + attn.o_proj(out.transpose(0, 1).reshape(seq, -1))  # (T, d)
        hidden = hidden + mlp(layer.mlp, norm(layer.post_attention_layernorm, hidden, fused), fused)
    return model.lm_head(norm(inner.norm, hidden[-1:], fused))[0]  # (V,)


def prompt_positions(model, start: int, seq: int) -> torch.Tensor:
    return torch.arange(start, start + seq, device=model.device)


@torch.no_grad()
def fast_query(model, buf: KVBuffer, preamble: ChunkKV, packets: list[Packet],
               task_ids: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, int]:
    """The whole query step (assembly + prompt prefill): (first logits (V,), next free position)."""
    ids = task_ids.to(model.device)  # before any kernel is queued: a host copy waits for the GPU
    n_cached, start = assemble_into(model, buf, preamble, packets, fused)
    logits = prompt_step(model, buf, n_cached, ids, prompt_positions(model, start, len(ids)), fused)
    return logits, start + len(ids)


class PromptGraph:
    """``prompt_step`` for one (n_cached, prompt length, start) captured as a CUDA graph.

    The buffer's storage is part of the graph: assemble the next context into the same ``buf``
    (same n_cached) and call the graph with the new prompt ids.
    """

    def __init__(self, model, buf: KVBuffer, n_cached: int, prompt_len: int, start: int,
                 fused: bool = False, warmup: int = 2):
        if buf.keys.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the buffer is on {buf.keys.device}; "
                             "use prompt_step directly on other devices")
        self.ids = torch.zeros(prompt_len, dtype=torch.long, device=buf.keys.device)
        self.positions = prompt_positions(model, start, prompt_len)
        args = (model, buf, n_cached, self.ids, self.positions, fused)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (compiler, allocator, handles)
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
