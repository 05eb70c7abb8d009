"""The KV Packet query step, optimised: preallocated cache, one-launch assembly, lean prompt prefill.

The plain path (``kvp.packet.assemble`` + ``kvp.generate.prefill``) concatenates the packets into a
new tensor, re-rotates the keys with several fp32 passes, copies everything again into an HF
``DynamicCache`` (whose ``update`` concatenates), and runs the prompt through the HF forward, whose
cache update copies the whole context once more. Here (same maths,
docs/method.md#query-time-assembly):

* ``KVBuffer`` — keys/values (L, H_kv, C, D) allocated once for a capacity C (context + prompt);
* ``assemble_into`` — ``[preamble][packet 1]…[packet N]`` written straight into the buffer, each
  packet's keys (all layers at once) re-rotated on the way in and compact (fp8 / int8) packets
  dequantized; with ``fused=True`` all of it is one Triton kernel launch per stored dtype
  (``kvp.kernels``): stored keys read once and written rotated (fp32 inside, exactly
  ``kvp.rope.apply_rotation``), so re-rotation costs no memory traffic beyond the copy;
* ``prompt_step`` — the prompt through every layer with the model's own weights: its K/V go into
  the buffer slots after the context and its queries attend through SDPA with a lower-right causal
  bias, so attention costs prompt × context (never context²) and nothing is copied; only the last
  position reaches the LM head. With ``fused=True`` the element-wise steps run as compiled
  kernels (RoPE + the K/V store, SiLU·up, residual add + RMSNorm) and attention is
  ``kvp.kernels.attend`` (split-KV, each KV head read once for its query group); inside
  ``with FusedProjections(model) as projections`` q/k/v and gate/up are one GEMM each (the model's
  Linear weights are views of the fused matrices until the block ends);
* ``pipelined_query`` — the same step with packets in pinned host memory or on disk: layer l's
  packets move to the device (``Staging``, a ring of layer slots; CUDA side stream and events)
  while layer l − 1 computes, and are assembled right before layer l's attention;
* ``PromptGraph`` — ``prompt_step`` captured once as a CUDA graph for one (context length, prompt
  length) and replayed, removing the per-kernel launch overhead of the short prompt.

``fused=True`` needs Triton and ``torch.compile`` (the benchmark uses it on CUDA; on the CPU the
assembly kernel runs in Triton's interpreter, for tests); ``fused=False`` runs the same maths
eagerly, which is what the CPU tests check against the plain path.
Decoding can continue from the buffer: ``kvp.cache.to_cache(buf.keys[..., :n, :], buf.values[..., :n, :])``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvp import kernels
from kvp.cache import ChunkKV, check_cache_supported, chunk_offsets
from kvp.compact import dequantize
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


class FusedProjections:
    """Every decoder layer's q/k/v and gate/up as one matrix each, inside a ``with`` block.

    ``with FusedProjections(model) as projections:`` concatenates each layer's q/k/v weights (and
    biases) and gate/up weights, and re-points the model's own ``nn.Linear`` parameters at views of
    them (layer by layer: no memory is added, and the model computes exactly as before); leaving
    the block gives every parameter its own storage back (same values, same ``Parameter``
    objects), so the model can be moved or saved again. Inside the block, do not move the model
    (``.to()`` would break the views). ``projections[i]`` is layer i's ``FusedLayer``.
    """

    def __init__(self, model):
        self.model = model
        self.layers: list[FusedLayer] = []
        self._modules: list[torch.nn.Module] = []

    @staticmethod
    def supported(model) -> bool:
        """Whether the projections are plain ``nn.Linear`` layers (not e.g. quantized ones)."""
        attn = model.model.layers[0].self_attn
        return all(type(m) is torch.nn.Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj))

    def __enter__(self) -> FusedProjections:
        if self.layers:
            raise RuntimeError("these FusedProjections are already in use: enter them once")
        if not self.supported(self.model):
            raise ValueError(f"{type(self.model.model.layers[0].self_attn.q_proj).__name__} "
                             "projections cannot be fused (quantized?); run prompt_step without "
                             "projections")
        for layer in self.model.model.layers:
            attn, mlp_ = layer.self_attn, layer.mlp
            projs = [attn.q_proj, attn.k_proj, attn.v_proj]
            qkv, bias = self._fuse(projs, all(p.bias is not None for p in projs))
            gated = getattr(getattr(mlp_, "config", None), "hidden_act", None) == "silu"
            gate_up = self._fuse([mlp_.gate_proj, mlp_.up_proj], False)[0] if gated else None
            self.layers.append(FusedLayer(qkv, bias, gate_up))
        return self

    def __exit__(self, *exc) -> None:
        for m in self._modules:  # own storage again; each fused matrix is freed with its last view
            m.weight.data = m.weight.data.clone()
            if m.bias is not None:
                m.bias.data = m.bias.data.clone()
        self.layers, self._modules = [], []

    def __getitem__(self, i: int) -> FusedLayer:
        return self.layers[i]

    def _fuse(self, linears: list[torch.nn.Module], bias: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Concatenate the weights (and biases) of ``linears``; point each module at its rows."""
        with torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in linears])
            stacked = torch.cat([m.bias.detach() for m in linears]) if bias else None
        row = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = weight[row:row + n]
            if bias:
                m.bias.data = stacked[row:row + n]
            row += n
            self._modules.append(m)
        return weight, stacked


def mlp(module: torch.nn.Module, x: torch.Tensor, fused: FusedLayer | None) -> torch.Tensor:
    """The gated MLP ``down(act(gate(x)) · up(x))``; with ``fused`` one gate·up GEMM and one
    compiled SiLU·up kernel."""
    if fused is not None and fused.gate_up is not None:
        gate, up = F.linear(x, fused.gate_up).chunk(2, dim=-1)
        return module.down_proj(kernel(silu_mul, True)(gate, up))
    return module(x)


# --------------------------------------------------------------------------- assembly
def write_chunks(keys: torch.Tensor, values: torch.Tensor, chunks: list[ChunkKV],
                 scales: list[tuple[torch.Tensor, torch.Tensor] | None], slots: list[int],
                 offsets: list[int], cos: torch.Tensor, sin: torch.Tensor, fused: bool) -> None:
    """Chunks (L', H_kv, S_i, D) into the buffer layers ``keys``/``values`` (L', H_kv, C, D) at
    their slots, keys re-rotated by their offsets, compact chunks (``scales[i]`` their key and
    value scales) dequantized. ``fused``: one Triton launch per chunk dtype; else eager ops."""
    if fused:
        groups: dict[torch.dtype, list[int]] = {}
        for i, chunk in enumerate(chunks):
            groups.setdefault(chunk.keys.dtype, []).append(i)
        for members in groups.values():
            compact = scales[members[0]] is not None
            kernels.assemble(keys, values, [chunks[i] for i in members], [slots[i] for i in members],
                             [offsets[i] for i in members], cos, sin,
                             scales=[scales[i] for i in members] if compact else None)
        return
    for chunk, scale, slot, offset in zip(chunks, scales, slots, offsets):
        k, v = chunk.keys, chunk.values
        if scale is not None:
            k, v = dequantize(k, scale[0], keys.dtype), dequantize(v, scale[1], keys.dtype)
        end = slot + chunk.length  # one batched rotation over all layers and heads of this chunk
        keys[:, :, slot:end] = apply_rotation(k, cos[offset], sin[offset])
        values[:, :, slot:end].copy_(v)


def _layout(model, buf: KVBuffer, preamble: ChunkKV, packets: list[Packet]):
    """(chunks, slots, offsets, n_cached, next position, cos, sin) of ``[preamble][packets]``."""
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
    return chunks, slots, offsets, n_cached, int(sum(spans)), cos, sin


@torch.no_grad()
def assemble_into(model, buf: KVBuffer, preamble: ChunkKV, packets: list[Packet],
                  fused: bool = False) -> tuple[int, int]:
    """``[preamble][packet 1]…[packet N]`` written into ``buf``, packet keys re-rotated to their
    global offsets on the way in and compact packets dequantized (the result of
    ``kvp.packet.assemble``, without intermediate tensors). The packets must be on the buffer's
    device (the gpu tier); ``pipelined_query`` reads them from host memory or disk.

    Returns:
        (cached tokens n, next free position); the buffer holds them at slots 0..n-1.
    """
    chunks, slots, offsets, n_cached, start, cos, sin = _layout(model, buf, preamble, packets)
    away = [i for i, p in enumerate(packets) if p.kv.keys.device != buf.keys.device]
    if away:
        raise ValueError(f"packets {away} are on {packets[away[0]].kv.keys.device}, the buffer on "
                         f"{buf.keys.device}: use pipelined_query for packets in host memory or "
                         "on disk")
    scales = [None] + [p.scales for p in packets]
    write_chunks(buf.keys, buf.values, chunks, scales, slots, offsets, cos, sin, fused)
    return n_cached, start


# --------------------------------------------------------------------------- the prompt step
@torch.no_grad()
def prompt_step(model, buf: KVBuffer, n_cached: int, input_ids: torch.Tensor,
                positions: torch.Tensor, fused: bool = False,
                projections: FusedProjections | None = None,
                before_attention: Callable[[int], None] | None = None) -> torch.Tensor:
    """Prefill the prompt against the first ``n_cached`` buffer slots; returns the last logits (V,).

    Args:
        input_ids: (T,) prompt ids on the model's device; positions: (T,) their RoPE positions.
        fused: compiled element-wise kernels and the Triton attention instead of eager ops and
            SDPA (same maths).
        projections: entered ``FusedProjections`` of the model: q/k/v and gate/up as one GEMM each.
        before_attention: called with each layer's index before its attention reads the buffer
            (``pipelined_query`` assembles that layer's packets there).
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
    bias = causal_lower_right(seq, end)  # prompt token i sees slots 0..n_cached+i (SDPA path)
    layers = inner.layers
    x = layers[0].input_layernorm(hidden)
    for i, layer in enumerate(layers):
        attn, weights = layer.self_attn, projections[i] if projections is not None else None
        q, k, v = project_qkv(attn, x, seq, (weights.qkv, weights.qkv_bias) if weights else None)
        keys, values = buf.keys[i], buf.values[i]  # (H_kv, C, hd) views
        q = store(q, k, v, cos, sin, keys[:, n_cached:end], values[:, n_cached:end])  # (H, T, hd)
        if before_attention is not None:
            before_attention(i)
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
               task_ids: torch.Tensor, fused: bool = False,
               projections: FusedProjections | None = None) -> tuple[torch.Tensor, int]:
    """The whole query step (assembly + prompt prefill) with the packets on the buffer's device:
    (first logits (V,), next free position)."""
    ids = task_ids.to(model.device)  # before any kernel is queued: a host copy waits for the GPU
    n_cached, start = assemble_into(model, buf, preamble, packets, fused)
    logits = prompt_step(model, buf, n_cached, ids, prompt_positions(model, start, len(ids)),
                         fused, projections)
    return logits, start + len(ids)


# --------------------------------------------------------------------------- pipelined transfer
RING_DEPTH = 4  # layers in flight between the host or disk and the compute (Staging's ring)


@dataclass
class Staging:
    """Where packets in host memory or on disk land, layer by layer, before assembly.

    ``keys``/``values`` (depth, n) on the device, in the packets' stored dtype: a ring of
    ``depth`` layer slots, each holding one layer of every packet back to back (packet j at
    ``at[j]``, shape (1, H_kv, S_j, D)). ``host_keys``/``host_values``: the same ring in
    page-locked host memory, for packets that are not (disk packets are read into it first);
    ``scales``: each compact packet's key and value scales (L, H_kv, 1, D) on the device.
    Allocated once for a set of packet shapes (``allocate``) and reused by every query.
    """

    keys: torch.Tensor
    values: torch.Tensor
    host_keys: torch.Tensor | None
    host_values: torch.Tensor | None
    at: list[int]
    shapes: list[tuple[int, ...]]
    scales: list[tuple[torch.Tensor, torch.Tensor]] | None
    stream: object = None

    @property
    def depth(self) -> int:
        return self.keys.shape[0]

    @classmethod
    def allocate(cls, model, packets: list[Packet], depth: int = RING_DEPTH) -> Staging:
        """A ring of ``depth`` layers (at most the model's) for packets of these shapes and dtype."""
        dtypes = {p.kv.keys.dtype for p in packets}
        if len(dtypes) != 1:
            raise ValueError(f"packets of several dtypes {sorted(map(str, dtypes))}: store them "
                             "with one packet_dtype")
        dtype, device = dtypes.pop(), model.device
        depth = max(1, min(depth, model.config.num_hidden_layers))
        shapes = [(1, *p.kv.keys.shape[1:]) for p in packets]
        sizes = [p.kv.keys[0].numel() for p in packets]
        at = chunk_offsets(sizes)
        n = sum(sizes)
        keys, values = (torch.empty(depth, n, dtype=dtype, device=device) for _ in range(2))
        pin = device.type == "cuda"
        host = (None, None)
        if pin and not all(p.kv.keys.is_pinned() for p in packets):
            host = tuple(torch.empty(depth, n, dtype=dtype, pin_memory=True) for _ in range(2))
        scales = None
        if packets[0].scales is not None:
            scales = [tuple(torch.empty_like(s, device=device) for s in p.scales) for p in packets]
        return cls(keys, values, *host, at, shapes, scales,
                   torch.cuda.Stream(device) if pin else None)

    def fits(self, packets: list[Packet]) -> bool:
        return ([(1, *p.kv.keys.shape[1:]) for p in packets] == self.shapes
                and packets[0].kv.keys.dtype == self.keys.dtype
                and (packets[0].scales is None) == (self.scales is None))

    def view(self, ring: torch.Tensor, slot: int, j: int) -> torch.Tensor:
        """Packet j's (1, H_kv, S_j, D) region of ring slot ``slot``."""
        shape = self.shapes[j]
        return ring[slot, self.at[j]:self.at[j] + math.prod(shape)].view(shape)

    def chunks(self, layer: int) -> tuple[list[ChunkKV], list]:
        """Layer ``layer``'s (1, H_kv, S_j, D) chunk of every packet (in ring slot
        ``layer % depth``) and each one's (1, H_kv, 1, D) key and value scales (None if plain)."""
        slot = layer % self.depth
        chunks = [ChunkKV(self.view(self.keys, slot, j), self.view(self.values, slot, j))
                  for j in range(len(self.shapes))]
        scales = ([(k[layer:layer + 1], v[layer:layer + 1]) for k, v in self.scales]
                  if self.scales is not None else [None] * len(chunks))
        return chunks, scales

    def plan_assembly(self, buf: KVBuffer, slots: list[int], offsets: list[int],
                      cos: torch.Tensor, sin: torch.Tensor) -> list[kernels.AssemblyLaunch]:
        """Per layer l, the Triton launch that writes every packet's layer l, from its staging
        slot, into ``buf`` at ``slots`` rotated by ``offsets`` (cos/sin (P, D) the rotation
        table): planned once, it follows whatever packets are staged when it runs."""
        launches = []
        for layer in range(buf.keys.shape[0]):
            chunks, scales = self.chunks(layer)
            launches.append(kernels.plan_assembly(
                buf.keys[layer:layer + 1], buf.values[layer:layer + 1], chunks, slots, offsets,
                cos, sin, scales=scales if self.scales is not None else None))
        return launches


@dataclass(frozen=True)
class StagedAssembly:
    """Layer l of every staged packet into the buffer in one batch of ops (dequantized,
    re-rotated, scattered to its slots), instead of a few ops per packet and layer: the eager
    assembly inside ``PipelinedGraph``, where each op is a captured kernel. Exactly
    ``write_chunks(..., fused=False)`` of the staged chunks (same element-wise maths).

    A staging slot holds the packets' (1, H_kv, S_j, D) layers back to back, i.e. R = Σ_j H_kv·S_j
    rows of D values ordered (packet, head, token). ``rows`` (R,) long: each row's row in a
    buffer layer viewed as (H_kv·C, D); ``cos``/``sin`` (R, rot) float32: each row's rotation
    (2·R·rot·4 bytes on the device, 64 MiB for 8K packet tokens of 8 KV heads with rot = 128,
    each read once a layer); ``scale_rows`` (R,) long: packet·H_kv + head, its scale row
    (compact packets), else None.
    """

    rows: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    scale_rows: torch.Tensor | None

    @classmethod
    def build(cls, staging: Staging, buf: KVBuffer, slots: list[int], offsets: list[int],
              cos: torch.Tensor, sin: torch.Tensor) -> StagedAssembly:
        """For the staging's packets at buffer ``slots``, rotated by ``offsets`` (one each);
        cos/sin (P, rot) the rotation table (``kvp.rope.rotation_table``)."""
        device, capacity = buf.keys.device, buf.capacity
        rows, by, scale_rows = [], [], []
        for j, ((_, heads, length, _), slot, offset) in enumerate(
                zip(staging.shapes, slots, offsets, strict=True)):
            head = torch.arange(heads, device=device).repeat_interleave(length)  # (H·S_j,)
            token = torch.arange(length, device=device).repeat(heads)
            rows.append(head * capacity + slot + token)
            by.append(torch.full_like(head, offset))
            scale_rows.append(j * heads + head)
        by = torch.cat(by)
        compact = staging.scales is not None
        return cls(torch.cat(rows), cos[by], sin[by], torch.cat(scale_rows) if compact else None)

    def __call__(self, staging: Staging, buf: KVBuffer, layer: int) -> None:
        """Write layer ``layer`` of the staged packets (ring slot ``layer % depth``) into ``buf``."""
        dim, slot, dtype = buf.keys.shape[-1], layer % staging.depth, buf.keys.dtype
        keys, values = staging.keys[slot].view(-1, dim), staging.values[slot].view(-1, dim)  # (R, D)
        if self.scale_rows is not None:  # each row's (D,) scales of this layer, dequantized
            key_scales, value_scales = (torch.cat([s[layer, :, 0] for s in per])[self.scale_rows]
                                        for per in zip(*staging.scales))
            keys, values = dequantize(keys, key_scales, dtype), dequantize(values, value_scales, dtype)
        keys, values = apply_rotation(keys, self.cos, self.sin), values.to(dtype)
        buf.keys[layer].view(-1, dim).index_copy_(0, self.rows, keys)
        buf.values[layer].view(-1, dim).index_copy_(0, self.rows, values)


class _Transfer:
    """Layer l of every packet onto the device, ``staging.depth`` layers ahead of the compute:
    on CUDA on a side stream, each layer's arrival and release marked by events; elsewhere the
    same steps as synchronous copies.

    ``layers_per_copy`` > 1 (a staging of every layer, no ring; packets page-locked or on the
    device's own side) moves that many layers of a packet's keys (and of its values) in one copy
    instead of one copy per layer: the host issues ``2 × packets × layers / layers_per_copy``
    copies, and each layer's arrival is its group's."""

    def __init__(self, staging: Staging, packets: list[Packet], n_layers: int,
                 arrived: list | None = None, layers_per_copy: int = 1):
        if layers_per_copy < 1:
            raise ValueError(f"layers_per_copy={layers_per_copy}: give 1 or more")
        if layers_per_copy > 1 and (staging.depth < n_layers or staging.host_keys is not None):
            raise ValueError(f"layers_per_copy={layers_per_copy} needs a staging of all "
                             f"{n_layers} layers (it has {staging.depth}) and packets in "
                             "page-locked memory; use layers_per_copy=1")
        self.staging, self.packets, self.n_layers = staging, packets, n_layers
        self.layers_per_copy = layers_per_copy
        cuda = staging.stream is not None
        self.arrived = arrived or [torch.cuda.Event() if cuda else None for _ in range(n_layers)]
        self.freed = [torch.cuda.Event() if cuda else None for _ in range(n_layers)]

    def _side(self):
        return (torch.cuda.stream(self.staging.stream) if self.staging.stream is not None
                else contextlib.nullcontext())

    def start(self) -> None:
        st = self.staging
        with self._side():
            if st.scales is not None:
                for (k, v), p in zip(st.scales, self.packets):
                    k.copy_(p.scales[0], non_blocking=True)
                    v.copy_(p.scales[1], non_blocking=True)
        if self.layers_per_copy > 1:
            for first in range(0, self.n_layers, self.layers_per_copy):
                self.issue_group(first, min(first + self.layers_per_copy, self.n_layers))
            return
        for layer in range(min(st.depth, self.n_layers)):
            self.issue(layer)

    def issue_group(self, first: int, stop: int) -> None:
        """Layers ``first..stop-1`` of every packet into their slots, one copy per packet for
        the keys and one for the values (slot l holds layer l: the staging has every layer)."""
        st = self.staging
        with self._side():
            for j, p in enumerate(self.packets):
                size = math.prod(st.shapes[j])
                for ring, source in ((st.keys, p.kv.keys), (st.values, p.kv.values)):
                    ring[first:stop, st.at[j]:st.at[j] + size].copy_(
                        source[first:stop].reshape(stop - first, size), non_blocking=True)
            for layer in range(first, stop):
                if self.arrived[layer] is not None:
                    self.arrived[layer].record(st.stream)

    def issue(self, layer: int) -> None:
        """Start moving ``layer`` into its ring slot (after the slot's previous layer is done)."""
        st, slot = self.staging, layer % self.staging.depth
        sources = [(p.kv.keys[layer:layer + 1], p.kv.values[layer:layer + 1]) for p in self.packets]
        if st.host_keys is not None:  # not page-locked (disk): read into the host ring first
            if layer >= st.depth:
                self.arrived[layer - st.depth].synchronize()  # its last copy has left the slot
            staged = []
            for j, (k, v) in enumerate(sources):
                hk, hv = st.view(st.host_keys, slot, j), st.view(st.host_values, slot, j)
                hk.copy_(k)
                hv.copy_(v)
                staged.append((hk, hv))
            sources = staged
        with self._side():
            if layer >= st.depth and self.freed[layer - st.depth] is not None:
                st.stream.wait_event(self.freed[layer - st.depth])  # assembled: the slot is free
            for j, (k, v) in enumerate(sources):
                st.view(st.keys, slot, j).copy_(k, non_blocking=True)
                st.view(st.values, slot, j).copy_(v, non_blocking=True)
            if self.arrived[layer] is not None:
                self.arrived[layer].record(st.stream)

    def chunks(self, layer: int) -> tuple[list[ChunkKV], list]:
        """After ``wait(layer)``: the packets' (1, H_kv, S_j, D) chunks of ``layer`` and scales."""
        return self.staging.chunks(layer)

    def wait(self, layer: int) -> None:
        if self.arrived[layer] is not None:
            torch.cuda.current_stream().wait_event(self.arrived[layer])

    def release(self, layer: int) -> None:
        if self.freed[layer] is not None:
            self.freed[layer].record(torch.cuda.current_stream())
        if layer + self.staging.depth < self.n_layers:
            self.issue(layer + self.staging.depth)


@torch.no_grad()
def pipelined_query(model, buf: KVBuffer, preamble: ChunkKV, packets: list[Packet],
                    task_ids: torch.Tensor, fused: bool = False,
                    projections: FusedProjections | None = None,
                    staging: Staging | None = None,
                    layers_per_copy: int = 1) -> tuple[torch.Tensor, int]:
    """The query step with the packets in host memory or on disk (any tier; packets already on
    the device are assembled in place): layer l's packet KV moves to the device while layer
    l − 1 computes, and is assembled into ``buf`` (re-rotated, dequantized) right before layer
    l's attention. See docs/method.md#packet-tiers.

    On CUDA the copies run on ``staging.stream`` (a side stream) and each layer's arrival and
    release are CUDA events; on other devices the same steps run as synchronous copies. The
    result is the resident path's (``fast_query``) exactly. ``staging``: allocated for these
    packets when None (allocate it once with ``Staging.allocate`` to reuse it across queries).
    ``layers_per_copy`` > 1 moves that many layers per copy (``_Transfer``); it needs a staging of
    every layer (``depth`` = the model's layers), allocated so when ``staging`` is None.
    Returns (first logits (V,), next free position).
    """
    ids = task_ids.to(model.device)
    chunks, slots, offsets, n_cached, start, cos, sin = _layout(model, buf, preamble, packets)
    here = [i for i, p in enumerate(packets) if p.kv.keys.device == buf.keys.device]
    moving = [i for i in range(len(packets)) if i not in here]
    resident = [0] + [i + 1 for i in here]  # the preamble and packets already on the device
    write_chunks(buf.keys, buf.values, [chunks[i] for i in resident],
                 [None] + [packets[i].scales for i in here], [slots[i] for i in resident],
                 [offsets[i] for i in resident], cos, sin, fused)
    before = None
    if moving:
        away = [packets[i] for i in moving]
        n_layers = model.config.num_hidden_layers
        if staging is None or not staging.fits(away):
            depth = n_layers if layers_per_copy > 1 else RING_DEPTH
            staging = Staging.allocate(model, away, depth=depth)
        transfer = _Transfer(staging, away, n_layers, layers_per_copy=layers_per_copy)
        transfer.start()
        at = [slots[i + 1] for i in moving]
        by = [offsets[i + 1] for i in moving]

        def before(layer: int) -> None:
            transfer.wait(layer)
            layer_chunks, scales = transfer.chunks(layer)
            write_chunks(buf.keys[layer:layer + 1], buf.values[layer:layer + 1], layer_chunks,
                         scales, at, by, cos, sin, fused)
            transfer.release(layer)

    logits = prompt_step(model, buf, n_cached, ids, prompt_positions(model, start, len(ids)),
                         fused, projections, before)
    return logits, start + len(ids)


class PipelinedGraph:
    """``pipelined_query`` for one layout (these packet shapes and preamble, this prompt length)
    as one CUDA graph: the preamble's assembly, every layer's packet assembly and the prompt step.
    See docs/method.md#packet-tiers.

    Verified on one H200 (eager assembly) and one H100 (both assemblies, bf16 and fp8 packets):
    ``tests/test_tiers.py::test_pipelined_graph_is_the_resident_query_for_every_packet_set``
    passes there, and the benchmark (``--host-graph``) finds the same logits as the GPU-resident
    step (data/benchmarks/README.md). CUDA only; a CPU has no graphs, and its tests run the eager
    ``pipelined_query``.

    The eager pipelined step is bound by the host: it launches each layer's kernels from Python
    while the copies wait. Here only the copies stay outside the graph (the packets, and so their
    addresses, change with every query): each call issues every layer's host → device copy on
    the staging stream, recording one external event per layer, then replays the graph, which
    waits on layer l's event right before assembling layer l. The staging therefore holds every
    layer (no ring: a graph cannot hand slots back to copies the host issues), i.e. the packets'
    bytes on the device, in their stored dtype. Packets must be in page-locked host memory (the
    host tier); disk packets go through ``pipelined_query``. The assembly inside the graph is,
    with ``fused_assembly`` (the default), the resident step's Triton kernel, one launch per
    layer planned once (``kvp.kernels.plan_assembly``: its table of staging addresses is built
    before the capture, so the replay reads each new packet set where it lands); without it,
    ``StagedAssembly``: one batch of eager ops per layer for all packets (same maths, slower:
    about 9 kernels per layer; for a machine without Triton).

    ``layers_per_copy``: layers of a packet moved by one host → device copy (see ``_Transfer``).
    With 1, the host issues two copies per packet and layer before the replay can start (512
    for 8 packets of a 32-layer model); a larger value issues fewer, larger copies, and the graph
    waits for each group of layers instead of each layer.
    """

    def __init__(self, model, buf: KVBuffer, preamble: ChunkKV, packets: list[Packet],
                 prompt_len: int, fused: bool = False,
                 projections: FusedProjections | None = None, warmup: int = 2,
                 layers_per_copy: int = 1, fused_assembly: bool = True):
        if buf.keys.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the buffer is on {buf.keys.device}; "
                             "use pipelined_query on other devices")
        if not all(p.kv.keys.is_pinned() and p.kv.values.is_pinned() for p in packets):
            raise ValueError("PipelinedGraph needs every packet in page-locked host memory (the "
                             "host tier); use pipelined_query for packets on disk or the device")
        n_layers = model.config.num_hidden_layers
        self.n_layers, self.layers_per_copy = n_layers, layers_per_copy
        self.staging = Staging.allocate(model, packets, depth=n_layers)
        self.arrived = [torch.cuda.Event(external=True) for _ in range(n_layers)]
        chunks, slots, offsets, n_cached, start, cos, sin = _layout(model, buf, preamble, packets)
        self.next_position = start + prompt_len  # where decoding continues after the step
        self.ids = torch.zeros(prompt_len, dtype=torch.long, device=buf.keys.device)
        positions = prompt_positions(model, start, prompt_len)
        # Everything the graph reads stays referenced: freed, its memory would be reused.
        if fused_assembly:
            launches = self.staging.plan_assembly(buf, slots[1:], offsets[1:], cos, sin)

            def assemble(layer: int) -> None:
                launches[layer]()
        else:
            staged = StagedAssembly.build(self.staging, buf, slots[1:], offsets[1:], cos, sin)

            def assemble(layer: int) -> None:
                staged(self.staging, buf, layer)
        self._read = (buf, preamble, positions, cos, sin, assemble)

        def step() -> torch.Tensor:
            write_chunks(buf.keys, buf.values, [preamble], [None], slots[:1], offsets[:1], cos, sin,
                         False)

            def before(layer: int) -> None:
                torch.cuda.current_stream().wait_event(self.arrived[layer])
                assemble(layer)

            return prompt_step(model, buf, n_cached, self.ids, positions, fused, projections, before)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (compiler, allocator, handles)
            for _ in range(warmup):
                self._issue(packets)
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize(buf.keys.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()

    def _issue(self, packets: list[Packet]) -> None:
        """Every layer of ``packets`` onto the staging (after the last step has read it)."""
        if not self.staging.fits(packets):
            raise ValueError(f"packets of shapes {[tuple(p.kv.keys.shape) for p in packets]} do "
                             f"not fit this graph's layout {self.staging.shapes}: capture a "
                             "PipelinedGraph for them")
        self.staging.stream.wait_stream(torch.cuda.current_stream())
        _Transfer(self.staging, packets, self.n_layers, self.arrived, self.layers_per_copy).start()

    def __call__(self, packets: list[Packet], input_ids: torch.Tensor) -> torch.Tensor:
        """The query step for ``packets`` (the captured shapes, in host memory) and prompt
        ``input_ids`` (prompt_len,) on the device; returns the first logits (V,) (a static
        tensor, overwritten by the next call)."""
        self.ids.copy_(input_ids)
        self._issue(packets)
        self.graph.replay()
        return self.logits


class PromptGraph:
    """``prompt_step`` for one (n_cached, prompt length, start) captured as a CUDA graph.

    The buffer's storage is part of the graph: assemble the next context into the same ``buf``
    (same n_cached) and call the graph with the new prompt ids.
    """

    def __init__(self, model, buf: KVBuffer, n_cached: int, prompt_len: int, start: int,
                 fused: bool = False, projections: FusedProjections | None = None,
                 warmup: int = 2):
        if buf.keys.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the buffer is on {buf.keys.device}; "
                             "use prompt_step directly on other devices")
        self.ids = torch.zeros(prompt_len, dtype=torch.long, device=buf.keys.device)
        self.positions = prompt_positions(model, start, prompt_len)
        args = (model, buf, n_cached, self.ids, self.positions, fused, projections)
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
