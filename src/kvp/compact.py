"""Compact packets: keys/values stored in 8 bits with a scale per (layer, KV head, channel).

See docs/method.md#compact-packets.

A packet's KV (L, H_kv, S, D) is stored as fp8 e4m3 (``float8_e4m3fn``) or int8, with one fp32
scale per (layer, KV head, channel) taken over the packet's tokens: ``scale = absmax / limit``
(448 for e4m3, 127 for int8; 1 where a channel is all zeros), ``q = x / scale`` rounded (to the
nearest e4m3 value, or to the nearest integer), and ``x ≈ q · scale``. One scale per channel keeps
the few large rotary channels of the keys from flattening the others. Half the bytes of bf16 cross
PCIe or the disk; the dequantization happens where the packet is assembled (``dequantize`` in the
plain path, inside the Triton assembly kernel in the optimised one).

Error bounds (fp32 maths, checked by the tests): e4m3 has 3 mantissa bits, so each value is within
``2⁻⁴·|x|`` of the original, or ``2⁻¹⁰·scale`` below e4m3's normal range; int8 is within
``scale / 2``.
"""

from __future__ import annotations

import torch

PACKET_DTYPES = ("model", "fp8", "int8")  # "model": the model's own dtype (bf16 / fp32), no scale
STORAGE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
LIMIT = {"fp8": 448.0, "int8": 127.0}


def check_packet_dtype(packet_dtype: str) -> None:
    if packet_dtype not in PACKET_DTYPES:
        raise ValueError(f"packet_dtype={packet_dtype!r}: choose one of {PACKET_DTYPES} "
                         "('model' keeps the model's dtype)")


def kind_of(dtype: torch.dtype) -> str:
    """The ``packet_dtype`` of stored tensors of ``dtype`` ("model" for a float dtype)."""
    return next((k for k, v in STORAGE.items() if v == dtype), "model")


@torch.no_grad()
def quantize(x: torch.Tensor, packet_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (L, H_kv, S, D) → (q (L, H_kv, S, D) in 8 bits, scale (L, H_kv, 1, D) float32)."""
    check_packet_dtype(packet_dtype)
    if packet_dtype == "model":
        raise ValueError("packet_dtype='model' stores the KV as it is: there is nothing to quantize")
    limit = LIMIT[packet_dtype]
    h = x.float()
    amax = h.abs().amax(dim=-2, keepdim=True)  # (L, H_kv, 1, D)
    scale = torch.where(amax > 0, amax / limit, torch.ones_like(amax))
    y = (h / scale).clamp(-limit, limit)
    q = y.round().to(torch.int8) if packet_dtype == "int8" else y.to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q (…, S, D) · scale (…, 1, D), computed in fp32, returned in ``dtype``."""
    return (q.float() * scale.to(q.device)).to(dtype)
