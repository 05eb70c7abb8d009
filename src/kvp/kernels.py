"""Triton kernels of the fused KV Packet query step (``kvp.query_step`` with ``fused=True``).

``assemble`` — the whole assembly in one launch (or one per layer, when packets arrive layer by
layer from host memory or disk), dequantizing compact packets (fp8 / int8 with per-channel
scales, ``kvp.compact``) on the way. ``kvp.query_step.assemble_into`` writes
``[preamble][packet 1]…[packet N]`` into a preallocated buffer; done chunk by chunk that is at
least two kernel launches per chunk plus the host work around each (which dominates at short
contexts), and a compiled kernel with dynamic shapes reaches about a fifth of the memory bandwidth.
Here a small table gives each chunk's key / value addresses, length, buffer slot and strides, and
each program moves ``BLOCK_T`` tokens of one layer of one chunk, all heads, reading the stored keys
once and writing them rotated (fp32 maths, exactly ``kvp.rope.apply_rotation``: no fused
multiply-add) with the rotation read from a precomputed table, so re-rotation costs no memory
traffic beyond the copy assembly needs anyway.

``attend`` — the prompt's attention over the buffer, split over key ranges (flash-decoding style)
with the query heads of a GQA group in one block, so each key and value is read once.

On a CUDA device the kernels are compiled by Triton; on the CPU they run in Triton's interpreter
(for the tests, at small sizes: use ``fused=False`` for real CPU work).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the eager path (fused=False) works without Triton
    triton = tl = None

from kvp.cache import ChunkKV

BLOCK_T = 32  # tokens per program (each program moves them for every head of one layer)


def _assemble_kernel(table, blocks_at, cos, sin, dst_k, dst_v, src_type, n_heads, head_stride,
                    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, D_P2: tl.constexpr,
                    BLOCK: tl.constexpr, ROTATE: tl.constexpr, SCALED: tl.constexpr):
    block, layer = tl.program_id(0), tl.program_id(1).to(tl.int64)
    chunk = tl.load(table + blocks_at + 2 * block)
    t = tl.load(table + blocks_at + 2 * block + 1) + tl.arange(0, BLOCK)[:, None]  # (BLOCK, 1)
    # 10 int64 per chunk: k ptr, v ptr, length, slot, layer / head / token strides, rotation
    # offset, key-scale ptr, value-scale ptr (scales (L, H, 1, D) fp32, read when SCALED)
    row = table + 10 * chunk
    elem = dst_k.dtype.element_ty
    stored = src_type.dtype.element_ty  # the chunks' dtype: the buffer's, or fp8 / int8
    src_k = tl.load(row).to(tl.pointer_type(stored))
    src_v = tl.load(row + 1).to(tl.pointer_type(stored))
    length, slot, head_step = tl.load(row + 2), tl.load(row + 3), tl.load(row + 5)
    d = tl.arange(0, D_P2)[None, :]  # (1, D_P2)
    ok = (t < length) & (d < HEAD_DIM)
    src = layer * tl.load(row + 4) + t * tl.load(row + 6) + d
    dst = layer * n_heads * head_stride + (slot + t) * HEAD_DIM + d
    if ROTATE:  # out = k·cos + rotate_half(k)·sin, rotate_half(k) = [-k2, k1]: sign folded in sin
        at = tl.load(row + 7) * HEAD_DIM + d
        c = tl.load(cos + at, mask=d < HEAD_DIM)
        s = tl.load(sin + at, mask=d < HEAD_DIM)
        s = tl.where(d < HALF, -s, s)
        turn = tl.where(d < HALF, HALF, -HALF)
        partner = src + turn
    if SCALED:  # dequantized as kvp.compact.dequantize: q · scale in fp32, rounded to the buffer
        key_scale = tl.load(row + 8).to(tl.pointer_type(tl.float32))
        value_scale = tl.load(row + 9).to(tl.pointer_type(tl.float32))
        scale_at = layer * n_heads * HEAD_DIM + d
    for h in range(n_heads):
        v = tl.load(src_v + src + h * head_step, mask=ok)
        if SCALED:
            sv = tl.load(value_scale + scale_at + h * HEAD_DIM, mask=d < HEAD_DIM)
            v = v.to(tl.float32) * sv
        tl.store(dst_v + dst + h * head_stride, v.to(elem), mask=ok)
        k = tl.load(src_k + src + h * head_step, mask=ok)
        if SCALED:
            sk = tl.load(key_scale + scale_at + h * HEAD_DIM, mask=d < HEAD_DIM)
            k = (k.to(tl.float32) * sk).to(elem)
        if ROTATE:
            pair = tl.load(src_k + partner + h * head_step, mask=ok)
            if SCALED:
                sp = tl.load(key_scale + scale_at + turn + h * HEAD_DIM, mask=d < HEAD_DIM)
                pair = (pair.to(tl.float32) * sp).to(elem)
            k = k.to(tl.float32) * c + pair.to(tl.float32) * s
        tl.store(dst_k + dst + h * head_stride, k.to(elem), mask=ok)


@cache
def _compiled(fn, interpret: bool):
    """``fn`` as a Triton kernel: compiled for CUDA, or run by the interpreter (CPU tensors)."""
    if triton is None:
        raise RuntimeError("the fused KV Packet path needs Triton (`pip install triton`); "
                           "or call it with fused=False")
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.jit(fn)


def _strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(layer, head, token) strides of a (L, H, S, D) tensor whose last dim is contiguous."""
    if t.stride(-1) != 1:
        return None
    return t.stride(0), t.stride(1), t.stride(2)


@dataclass(frozen=True)
class AssemblyLaunch:
    """One planned launch of the assembly kernel (``plan_assembly``): its table is already on the
    device, so a call queues that one kernel and nothing else. It can therefore be captured in a
    CUDA graph and replayed: each replay reads whatever the planned chunk, scale and buffer
    addresses hold then (``sources`` keeps those tensors alive)."""

    fn: object
    grid: tuple[int, int]
    args: tuple
    meta: dict
    sources: tuple

    def __call__(self) -> None:
        self.fn[self.grid](*self.args, **self.meta)


def plan_assembly(keys: torch.Tensor, values: torch.Tensor, chunks: list[ChunkKV],
                  slots: list[int], offsets: list[int], cos: torch.Tensor, sin: torch.Tensor,
                  rotate: bool = True,
                  scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> AssemblyLaunch:
    """The launch that writes each chunk into ``keys``/``values`` at its slot, its keys rotated by
    its offset (``assemble`` runs it at once).

    Args:
        keys, values: the buffer, (L, H_kv, C, D) contiguous (a layer range of a larger buffer
            is such a tensor too: ``buf.keys[l:l + 1]``).
        chunks: ChunkKV with keys/values (L, H_kv, S_i, D) on the buffer's device, all of one
            dtype: the buffer's, or fp8 / int8 with ``scales`` (any strides whose last dim is
            contiguous, keys and values alike: e.g. sliced packets).
        slots: start slot of each chunk in the buffer; offsets: the rotation of each (positions).
        cos, sin: (P, D) float32 tables, row Δ the rotation by Δ (``kvp.rope.rotation_table``).
        rotate: False copies the keys unrotated (to time what rotation adds).
        scales: per chunk, its key and value scales (L, H_kv, 1, D) float32 (``kvp.compact``):
            the chunk is dequantized on the way in, exactly as ``kvp.compact.dequantize``.
    """
    n_layers, n_heads, capacity, head_dim = keys.shape
    if not (keys.is_contiguous() and values.is_contiguous() and keys.shape == values.shape):
        raise ValueError("the buffer's keys and values must be contiguous tensors of one shape")
    if cos.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"rotation tables of width {cos.shape[-1]} for head dim {head_dim}: the "
                         "one-launch kernel needs a full, even rotary dim; use fused=False")
    if max(offsets) >= len(cos):
        raise ValueError(f"offset {max(offsets)} is past the rotation table ({len(cos)} rows)")
    if scales is not None and len(scales) != len(chunks):
        raise ValueError(f"{len(scales)} scale pairs for {len(chunks)} chunks: give one per chunk")
    stored = chunks[0].keys.dtype if scales is not None else keys.dtype
    rows, blocks, sources = [], [], [keys, values, cos, sin]
    for i, (chunk, slot, offset) in enumerate(zip(chunks, slots, offsets)):
        k, v = chunk.keys, chunk.values
        if k.dtype != stored or v.dtype != stored or k.device != keys.device:
            raise ValueError(f"chunk {i} is {k.dtype} on {k.device}; this launch needs {stored} "
                             f"on {keys.device} (the buffer's dtype, or one compact dtype with "
                             "scales): encode packets with the buffer's model")
        if k.shape[0] != n_layers:
            raise ValueError(f"chunk {i} has {k.shape[0]} layers, the buffer {n_layers}")
        stride = _strides(k)
        if stride is None or _strides(v) != stride:
            k, v = k.contiguous(), v.contiguous()
            stride = _strides(k)
        if slot + chunk.length > capacity:
            raise ValueError(f"chunk {i} ends at slot {slot + chunk.length}, past the buffer's "
                             f"capacity {capacity}")
        pair = [0, 0]
        if scales is not None:
            pair = [s.contiguous() for s in scales[i]]
            if any(s.shape != (n_layers, n_heads, 1, head_dim) or s.dtype != torch.float32
                   or s.device != keys.device for s in pair):
                raise ValueError(f"chunk {i}: scales must be float32 {(n_layers, n_heads, 1, head_dim)}"
                                 f" on {keys.device}")
            sources += pair
            pair = [s.data_ptr() for s in pair]
        rows += [k.data_ptr(), v.data_ptr(), chunk.length, slot, *stride, offset, *pair]  # 10
        sources += [k, v]  # the table holds their addresses (a contiguous copy only here)
        blocks += [x for t0 in range(0, chunk.length, BLOCK_T) for x in (i, t0)]
    device = keys.device
    pin = device.type == "cuda"  # one small host → device copy that does not wait for the GPU
    table = torch.tensor(rows + blocks, dtype=torch.int64, pin_memory=pin).to(device, non_blocking=True)
    meta = dict(HEAD_DIM=head_dim, HALF=head_dim // 2, D_P2=_pow2(head_dim), BLOCK=BLOCK_T,
                ROTATE=rotate, SCALED=scales is not None)
    if device.type == "cuda":
        meta["enable_fp_fusion"] = False
    return AssemblyLaunch(_compiled(_assemble_kernel, device.type != "cuda"),
                          (len(blocks) // 2, n_layers),
                          (table, len(rows), cos, sin, keys, values, chunks[0].keys, n_heads,
                           capacity * head_dim), meta, tuple(sources))


def assemble(keys: torch.Tensor, values: torch.Tensor, chunks: list[ChunkKV], slots: list[int],
             offsets: list[int], cos: torch.Tensor, sin: torch.Tensor, rotate: bool = True,
             scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Write each chunk into ``keys``/``values`` at its slot, its keys rotated by its offset, in
    one launch (arguments as ``plan_assembly``)."""
    plan_assembly(keys, values, chunks, slots, offsets, cos, sin, rotate, scales)()


@cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# --------------------------------------------------------------------------- prompt attention
def _maximum(a, b):
    return tl.maximum(a, b)


def _add(a, b):
    return a + b


if triton is not None:  # reduction combiners (plain ``tl.reduce`` also runs in the interpreter)
    _maximum, _add = triton.jit(_maximum), triton.jit(_add)


def _partial_kernel(q, keys, values, part_acc, part_m, part_l, n_keys, n_cached, per_split,
                   q_head_stride, q_tok_stride, kv_head_stride, scale,
                   T: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # one program: the G query heads sharing kv head `kvh` (rows r = g·T + i), a row block,
    # and the keys of one split; online softmax in base 2, masked lower-right causally
    kvh, split, rb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    g, i = r // T, r % T
    row_ok = r < G * T
    d = tl.arange(0, D_P2)
    d_ok = d < HEAD_DIM
    qh = kvh * G + g
    query = tl.load(q + qh[:, None] * q_head_stride + i[:, None] * q_tok_stride + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    base = kvh.to(tl.int64) * kv_head_stride
    start = split * per_split
    stop = tl.minimum(start + per_split, n_keys)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, D_P2), 0.0, tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(keys + base + j[None, :] * HEAD_DIM + d[:, None],
                    mask=(j[None, :] < stop) & d_ok[:, None], other=0.0)
        s = tl.dot(query, k) * scale  # (BLOCK_M, BLOCK_N), scale includes log2(e)
        s = tl.where((j[None, :] < stop) & (j[None, :] <= n_cached + i[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(s, 1, _maximum))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m - m_ref)
        v = tl.load(values + base + j[:, None] * HEAD_DIM + d[None, :],
                    mask=(j[:, None] < stop) & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l = l * alpha + tl.reduce(p, 1, _add)
        m = m_new
    at = (kvh * tl.num_programs(1) + split) * G * T + r
    tl.store(part_m + at, m, mask=row_ok)
    tl.store(part_l + at, l, mask=row_ok)
    tl.store(part_acc + at[:, None] * D_P2 + d[None, :], acc, mask=row_ok[:, None])

def _merge_kernel(part_acc, part_m, part_l, out, n_splits, out_tok_stride,
                 T: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, D_P2: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    # out[i, (kvh·G + g)·D + d] = Σ_s 2^(m_s − M) acc_s / Σ_s 2^(m_s − M) l_s
    kvh, rb = tl.program_id(0), tl.program_id(1)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < G * T
    d = tl.arange(0, D_P2)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l = tl.full((BLOCK_R,), 0.0, tl.float32)
    acc = tl.full((BLOCK_R, D_P2), 0.0, tl.float32)
    for split in range(n_splits):
        at = (kvh * n_splits + split) * G * T + r
        m_s = tl.load(part_m + at, mask=row_ok, other=float("-inf"))
        m_new = tl.maximum(m, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        a, b = tl.exp2(m - m_ref), tl.exp2(m_s - m_ref)
        l = l * a + tl.load(part_l + at, mask=row_ok, other=0.0) * b
        acc = acc * a[:, None] + tl.load(part_acc + at[:, None] * D_P2 + d[None, :],
                                         mask=row_ok[:, None], other=0.0) * b[:, None]
        m = m_new
    g, i = r // T, r % T
    dst = i[:, None] * out_tok_stride + (kvh * G + g)[:, None] * HEAD_DIM + d[None, :]
    l = tl.where(row_ok, l, 1.0)  # rows past the end are not stored
    tl.store(out + dst, (acc / l[:, None]).to(out.dtype.element_ty),
             mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])


LOG2E = 1.4426950408889634
BLOCK_N = 64  # keys per step of the online softmax
SPLIT_KEYS = 256  # at least this many keys per split: the partial results stay small beside them
PROGRAMS_PER_SM = 1
MERGE_ROWS = 4  # rows per program of the merge


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_cached: int,
           scale: float, n_splits: int | None = None) -> torch.Tensor:
    """Attention of the prompt's queries over the first ``n_cached + T`` buffer slots, lower-right
    causal (prompt token i sees slots 0..n_cached+i): SDPA's result, in two launches.

    The G = H / H_kv query heads that share a KV head are one block of rows, so every key and
    value is read once (not G times), and the keys are cut into ``n_splits`` ranges done in
    parallel (default: about two programs per SM) whose partial softmaxes are merged exactly.

    Args:
        q: (H, T, D) rotated queries (last dim contiguous); keys, values: (H_kv, C, D) contiguous,
           the prompt's own K/V already at slots n_cached..n_cached+T-1.
    Returns:
        (T, H·D) in q's dtype: the heads side by side, ready for ``o_proj``.
    """
    n_heads, seq, dim = q.shape
    n_kv, capacity, _ = keys.shape
    n_keys = n_cached + seq
    if n_keys > capacity or n_heads % n_kv or q.stride(-1) != 1:
        raise ValueError(f"attend needs q (H, T, D) with H a multiple of H_kv, "
                         f"and n_cached + T <= capacity; got q {tuple(q.shape)}, keys "
                         f"{tuple(keys.shape)}, n_cached {n_cached}")
    group = n_heads // n_kv
    rows = group * seq
    block_m = max(16, min(128, _pow2(rows)))
    row_blocks = -(-rows // block_m)
    if n_splits is None:  # enough programs to fill the SMs, enough keys per program to amortise
        n_splits = max(1, min(-(-n_keys // SPLIT_KEYS),
                              -(-PROGRAMS_PER_SM * _sm_count(q.device) // (n_kv * row_blocks))))
    per_split = -(-n_keys // n_splits // BLOCK_N) * BLOCK_N or BLOCK_N
    n_splits = -(-n_keys // per_split)
    part_acc = torch.empty(n_kv * n_splits * rows, _pow2(dim), dtype=torch.float32, device=q.device)
    part_m = torch.empty(n_kv * n_splits * rows, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    out = torch.empty(seq, n_heads * dim, dtype=q.dtype, device=q.device)
    partial, merge = (_compiled(fn, not q.is_cuda) for fn in (_partial_kernel, _merge_kernel))
    launch = {"num_warps": 8} if q.is_cuda else {}
    partial[(n_kv, n_splits, row_blocks)](
        q, keys, values, part_acc, part_m, part_l, n_keys, n_cached, per_split,
        q.stride(0), q.stride(1), capacity * dim, scale * LOG2E,
        T=seq, G=group, HEAD_DIM=dim, D_P2=_pow2(dim), BLOCK_M=block_m, BLOCK_N=BLOCK_N, **launch)
    merge[(n_kv, -(-rows // MERGE_ROWS))](part_acc, part_m, part_l, out, n_splits, n_heads * dim,
                                           T=seq, G=group, HEAD_DIM=dim, D_P2=_pow2(dim),
                                           BLOCK_R=MERGE_ROWS)
    return out
