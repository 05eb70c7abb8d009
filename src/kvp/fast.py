"""The KV Packet query step, optimised: preallocated cache, one-launch assembly, lean prompt prefill.

The plain path (``kvp.packet.assemble`` + ``kvp.generate.prefill``) concatenates the packets into a
new tensor, re-rotates the keys with several fp32 passes, copies everything again into an HF
``DynamicCache`` (whose ``update`` concatenates), and runs the prompt through the HF forward, whose
cache update copies the whole context once more. Here (same maths,
docs/method.md#query-time-assembly):

* ``KVBuffer`` — keys/values (L, H_kv, C, D) allocated once for a capacity C (context + prompt);
* ``assemble_into`` — ``[preamble][packet 1]…[packet N]`` written straight into the buffer, each
  packet's keys (all layers at once) re-rotated on the way in; with ``fused=True`` all of it is one
  Triton kernel launch (``kvp.kernels``): stored keys read once and written rotated (fp32 inside,
  exactly ``kvp.rope.apply_rotation``), so re-rotation costs no memory traffic beyond the copy;
* ``prompt_step`` — the prompt through every layer with the model's own weights: its K/V go into
  the buffer slots after the context and its queries attend through SDPA with a lower-right causal
  bias, so attention costs prompt × context (never context²) and nothing is copied; only the last
  position reaches the LM head. With ``fused=True``: q/k/v and gate/up are one GEMM each
  (``fused_projections``: the model's Linear weights become views of the fused matrices), the
  element-wise steps run as compiled kernels (RoPE + the K/V store, SiLU·up, residual add + RMSNorm)
  and attention is ``kvp.kernels.attend`` (split-KV, each KV head read once for its query group);
* ``PromptGraph`` — ``prompt_step`` captured once as a CUDA graph for one (context length, prompt
  length) and replayed, removing the per-kernel launch overhead of the short prompt.

``fused=True`` needs Triton and ``torch.compile`` (the benchmark uses it on CUDA; on the CPU the
assembly kernel runs in Triton's interpreter, for tests); ``fused=False`` runs the same maths
eagerly, which is what the CPU tests check against the plain path.
Decoding can continue from the buffer: ``kvp.cache.to_cache(buf.keys[..., :n, :], buf.values[..., :n, :])``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvp import kernels
from kvp.cache import ChunkKV, check_cache_supported, chunk_offsets
from kvp.packet import Packet
from kvp.recompute import project_qkv
from kvp.rope import apply_rotation, rotary_module, rotate_half, rotation_table


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


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm: (hidden + delta, rms_norm(hidden + delta)), (T, d)."""
    hidden = hidden + delta
    return hidden, rms_norm(hidden, weight, eps)


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor) -> torch.Tensor:
    """RoPE on q (H, T, hd) and k (H_kv, T, hd); k and v written to the buffer slices k_out / v_out
    (H_kv, T, hd). Returns the rotated q."""
    k_out.copy_(rope(k, cos, sin))
    v_out.copy_(v)
    return rope(q, cos, sin)


def add_norm(hidden: torch.Tensor, delta: torch.Tensor, module: torch.nn.Module, fused: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, module(hidden + delta)) for the model's RMSNorm ``module``; ``fused`` makes
    the add and the norm one compiled kernel."""
    if fused and type(module).__name__ in RMS_NORMS:
        return kernel(add_rms_norm, True)(hidden, delta, module.weight, module.variance_epsilon)
    hidden = hidden + delta
    return hidden, module(hidden)


# --------------------------------------------------------------------------- fused projections
@dataclass(frozen=True)
class FusedLayer:
    """One decoder layer's input projections as single matrices (views shared with the model).

    qkv: (H·hd + 2·H_kv·hd, d) and its bias (or None); gate_up: (2·I, d), or None when the MLP is
    not a SiLU-gated one."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor | None

    def bound_to(self, layer) -> bool:
        """Whether the model's q_proj still uses this storage (a ``.to()`` would break the views)."""
        return layer.self_attn.q_proj.weight.data_ptr() == self.qkv.data_ptr()


def _fuse(linears: list[torch.nn.Module], bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of ``linears`` and re-point each module at its rows."""
    weight = torch.cat([m.weight.detach() for m in linears])
    stacked = torch.cat([m.bias.detach() for m in linears]) if bias else None
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[row:row + n], requires_grad=False)
        if bias:
            m.bias = torch.nn.Parameter(stacked[row:row + n], requires_grad=False)
        row += n
    return weight, stacked


def fused_projections(model) -> list[FusedLayer] | None:
    """Per layer, q/k/v and gate/up as one matrix each, built once; None if the projections are
    not plain ``nn.Linear`` layers (e.g. quantized). The model's own Linear weights become views
    of the fused matrices, so no memory is added and the model computes exactly as before (to save
    the model afterwards, note that q/k/v and gate/up then share storage)."""
    layers = model.model.layers
    fused = getattr(model, "_kvp_fused_projections", None)
    if fused is not None and all(f.bound_to(layer) for f, layer in zip(fused, layers)):
        return fused
    attn0 = layers[0].self_attn
    if any(type(m) is not torch.nn.Linear for m in (attn0.q_proj, attn0.k_proj, attn0.v_proj)):
        return None
    fused = []
    for layer in layers:
        attn, mlp_ = layer.self_attn, layer.mlp
        projs = [attn.q_proj, attn.k_proj, attn.v_proj]
        qkv, bias = _fuse(projs, all(p.bias is not None for p in projs))
        gated = getattr(getattr(mlp_, "config", None), "hidden_act", None) == "silu"
        gate_up = _fuse([mlp_.gate_proj, mlp_.up_proj], False)[0] if gated else None
        fused.append(FusedLayer(qkv, bias, gate_up))
    model._kvp_fused_projections = fused
    return fused


def mlp(module: torch.nn.Module, x: torch.Tensor, fused: FusedLayer | None) -> torch.Tensor:
    """The gated MLP ``down(act(gate(x)) · up(x))``; with ``fused`` one gate·up GEMM and one
    compiled SiLU·up kernel."""
    if fused is not None and fused.gate_up is not None:
        gate, up = F.linear(x, fused.gate_up).chunk(2, dim=-1)
        return module.down_proj(kernel(silu_mul, True)(gate, up))
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
    slots = chunk_offsets([c.length for c in chunks])  # stored tokens back to back
    cos, sin = rotation_table(model, offsets[-1] + 1, buf.keys.device)  # row Δ: rotation by Δ
    if fused:
        kernels.assemble(buf.keys, buf.values, chunks, slots, offsets, cos, sin)
        return n_cached, int(sum(spans))
    for chunk, slot, offset in zip(chunks, slots, offsets):
        end = slot + chunk.length  # one batched rotation over all layers and heads of this chunk
        buf.keys[:, :, slot:end] = apply_rotation(chunk.keys, cos[offset], sin[offset])
        buf.values[:, :, slot:end].copy_(chunk.values)
    return n_cached, int(sum(spans))


@torch.no_grad()
def prompt_step(model, buf: KVBuffer, n_cached: int, input_ids: torch.Tensor,
                positions: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Prefill the prompt against the first ``n_cached`` buffer slots; returns the last logits (V,).

    Args:
        input_ids: (T,) prompt ids on the model's device; positions: (T,) their RoPE positions.
        fused: fused q/k/v and gate/up GEMMs, compiled element-wise kernels and the Triton
            attention instead of eager ops and SDPA (same maths).
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
    store = kernel(rope_store, fused)
    projections = fused_projections(model) if fused else None
    bias = causal_lower_right(seq, end)  # prompt token i sees slots 0..n_cached+i (SDPA path)
    layers = inner.layers
    x = layers[0].input_layernorm(hidden)
    for i, layer in enumerate(layers):
        attn, weights = layer.self_attn, projections[i] if projections else None
        q, k, v = project_qkv(attn, x, seq, (weights.qkv, weights.qkv_bias) if weights else None)
        keys, values = buf.keys[i], buf.values[i]  # (H_kv, C, hd) views
        q = store(q, k, v, cos, sin, keys[:, n_cached:end], values[:, n_cached:end])  # (H, T, hd)
        if fused:  # split-KV Triton attention: each KV head read once for its query group
            out = kernels.attend(q, keys, values, n_cached, attn.scaling)  # (T, H·hd)
        else:
            out = F.scaled_dot_product_attention(q[None], keys[None, :, :end], values[None, :, :end],
                                                 attn_mask=bias, scale=attn.scaling,
                                                 enable_gqa=True)[0].transpose(0, 1).reshape(seq, -1)
        out = attn.o_proj(out)  # (T, d)
        hidden, x = add_norm(hidden, out, layer.post_attention_layernorm, fused)
        next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else inner.norm
        hidden, x = add_norm(hidden, mlp(layer.mlp, x, weights), next_norm, fused)
    return model.lm_head(x[-1:])[0]  # (V,)


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
