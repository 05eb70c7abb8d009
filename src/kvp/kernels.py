"""KV Packet assembly in one kernel launch: every chunk's keys re-rotated and values copied.

``kvp.fast.assemble_into`` writes ``[preamble][packet 1]…[packet N]`` into a preallocated buffer.
Done chunk by chunk, that is at least two kernel launches per chunk plus the host work around each
(which dominates at short contexts), and a compiled kernel with dynamic shapes reaches about a fifth
of the memory bandwidth. Here one Triton kernel does it all: a small table gives each chunk's key /
value addresses, length, buffer slot and strides, and each program moves ``BLOCK_T`` tokens of one
(layer, head) of one chunk, reading the stored keys once and writing them rotated (fp32 maths,
exactly ``kvp.rope.apply_rotation``: no fused multiply-add), so re-rotation costs no memory traffic
beyond the copy assembly needs anyway.

On a CUDA device the kernel is compiled by Triton; on the CPU it runs in Triton's interpreter (for
the tests, at small sizes: use the eager path of ``assemble_into`` for real CPU work).
"""

from __future__ import annotations

from functools import cache

import torch

from kvp.cache import ChunkKV

BLOCK_T = 64  # tokens per program


def _kernel_source():
    """The kernel as a plain function (decorated per device in ``_kernel``)."""
    import triton.language as tl

    def assemble_kernel(table, blocks, cos, sin, dst_k, dst_v, dst_lh_stride, n_heads,
                        HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
                        D_P2: tl.constexpr, BLOCK: tl.constexpr, ROTATE: tl.constexpr):
        block, lh = tl.program_id(0), tl.program_id(1)
        layer, head = lh // n_heads, lh % n_heads
        chunk = tl.load(blocks + 2 * block)
        t = tl.load(blocks + 2 * block + 1) + tl.arange(0, BLOCK)  # token indices in the chunk
        row = table + 8 * chunk  # k ptr, v ptr, length, slot, layer / head / token strides, pad
        elem = dst_k.dtype.element_ty
        src_k = tl.load(row).to(tl.pointer_type(elem))
        src_v = tl.load(row + 1).to(tl.pointer_type(elem))
        length, slot = tl.load(row + 2), tl.load(row + 3)
        src_base = layer * tl.load(row + 4) + head * tl.load(row + 5)
        tok = t[:, None] * tl.load(row + 6)
        dst = (lh.to(tl.int64) * dst_lh_stride + (slot + t[:, None]) * HEAD_DIM)
        rows_ok = t[:, None] < length

        d = tl.arange(0, D_P2)[None, :]
        ok = rows_ok & (d < HEAD_DIM)
        tl.store(dst_v + dst + d, tl.load(src_v + src_base + tok + d, mask=ok), mask=ok)

        h = tl.arange(0, HALF_P2)[None, :]
        ok = rows_ok & (h < HALF)
        k1 = tl.load(src_k + src_base + tok + h, mask=ok)
        k2 = tl.load(src_k + src_base + tok + HALF + h, mask=ok)
        if ROTATE:  # out = k·cos + rotate_half(k)·sin, with rotate_half(k) = [-k2, k1]
            c1 = tl.load(cos + chunk * HEAD_DIM + h, mask=h < HALF)
            c2 = tl.load(cos + chunk * HEAD_DIM + HALF + h, mask=h < HALF)
            s1 = tl.load(sin + chunk * HEAD_DIM + h, mask=h < HALF)
            s2 = tl.load(sin + chunk * HEAD_DIM + HALF + h, mask=h < HALF)
            a, b = k1.to(tl.float32), k2.to(tl.float32)
            k1 = (a * c1 - b * s1).to(elem)
            k2 = (b * c2 + a * s2).to(elem)
        tl.store(dst_k + dst + h, k1, mask=ok)
        tl.store(dst_k + dst + HALF + h, k2, mask=ok)

    return assemble_kernel


@cache
def _kernel(interpret: bool):
    try:
        import triton
    except ImportError as err:
        raise RuntimeError("the one-launch assembly (fused=True) needs Triton: `pip install triton`, "
                           "or assemble with fused=False") from err

    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_kernel_source())
    return triton.jit(_kernel_source())


def _strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(layer, head, token) strides of a (L, H, S, D) tensor whose last dim is contiguous."""
    if t.stride(-1) != 1:
        return None
    return t.stride(0), t.stride(1), t.stride(2)


def assemble(keys: torch.Tensor, values: torch.Tensor, chunks: list[ChunkKV], slots: list[int],
             cos: torch.Tensor, sin: torch.Tensor, rotate: bool = True) -> None:
    """Write each chunk into ``keys``/``values`` at its slot, keys rotated by its cos/sin row.

    Args:
        keys, values: the buffer, (L, H_kv, C, D) contiguous.
        chunks: ChunkKV with keys/values (L, H_kv, S_i, D) in the buffer's dtype and device (any
            strides whose last dim is contiguous, keys and values alike: e.g. sliced packets).
        slots: start slot of each chunk in the buffer.
        cos, sin: (len(chunks), D) float32 rotation of each chunk (``kvp.rope.rotation``).
        rotate: False copies the keys unrotated (to time what rotation adds).
    """
    n_layers, n_heads, capacity, head_dim = keys.shape
    if not (keys.is_contiguous() and values.is_contiguous() and keys.shape == values.shape):
        raise ValueError("the buffer's keys and values must be contiguous tensors of one shape")
    if cos.shape != (len(chunks), head_dim):
        raise ValueError(f"cos/sin must be (chunks, head_dim) = ({len(chunks)}, {head_dim}), "
                         f"got {tuple(cos.shape)}: the one-launch kernel needs full rotary dims")
    rows, blocks = [], []
    for i, (chunk, slot) in enumerate(zip(chunks, slots)):
        k, v = chunk.keys, chunk.values
        stride = _strides(k)
        if stride is None or _strides(v) != stride:
            k, v = k.contiguous(), v.contiguous()
            stride = _strides(k)
        if slot + chunk.length > capacity:
            raise ValueError(f"chunk {i} ends at slot {slot + chunk.length}, past the buffer's "
                             f"capacity {capacity}")
        rows.append([k.data_ptr(), v.data_ptr(), chunk.length, slot, *stride, 0])
        blocks += [(i, t0) for t0 in range(0, chunk.length, BLOCK_T)]
    device = keys.device
    pin = device.type == "cuda"
    table = torch.tensor(rows, dtype=torch.int64, pin_memory=pin).to(device, non_blocking=True)
    block_table = torch.tensor(blocks, dtype=torch.int32, pin_memory=pin).to(device, non_blocking=True)
    half = head_dim // 2
    grid = (len(blocks), n_layers * n_heads)
    _kernel(device.type != "cuda")[grid](
        table, block_table, cos.float().contiguous(), sin.float().contiguous(), keys, values,
        capacity * head_dim, n_heads, HEAD_DIM=head_dim, HALF=half,
        HALF_P2=_pow2(half), D_P2=_pow2(head_dim), BLOCK=BLOCK_T, ROTATE=rotate,
        **({"enable_fp_fusion": False} if device.type == "cuda" else {}))


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
