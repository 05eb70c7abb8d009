"""Re-rotation of cached post-RoPE keys from local to global positions (docs/method.md#re-rotation).

RoPE rotates each 2-D frequency pair of a key by ``angle = position · inv_freq``. Rotations compose,
so a key encoded at local position ``p`` becomes the key at ``p + Δ`` by one more rotation by
``Δ · inv_freq``: ``k_new = RoPE(Δ) · k_old``. Values carry no position and are untouched.

The rotation uses the model's own rotary module (``model.model.rotary_emb``), so llama3-style
frequency scaling, any head dim and any ``partial_rotary_factor`` come for free. Rotary modules that
also scale cos/sin (``attention_scaling != 1``, e.g. YaRN) are handled by dividing the factor out,
because the cached key already carries it once.
"""

from __future__ import annotations

import weakref

import torch


def rotary_module(model) -> torch.nn.Module:
    """The model's rotary embedding module (decoder-only HF models keep it at ``model.model``)."""
    inner = getattr(model, "model", model)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__} has no rotary embedding at model.model.rotary_emb; "
                         "kvp needs a rotary (RoPE) decoder-only model")
    return rotary


@torch.no_grad()
def rotation(model, delta: torch.Tensor, device: torch.device | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled cos/sin of a rotation by ``delta`` positions.

    Args:
        delta: (S,) integer position offsets, one per token.
    Returns:
        cos, sin: (S, head_dim) float32, with the rotary ``attention_scaling`` divided out.
    """
    rotary = rotary_module(model)
    device = device or delta.device
    probe = torch.zeros(1, dtype=torch.float32, device=device)
    cos, sin = rotary(probe, delta.to(device)[None].long())  # (1, S, head_dim)
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return cos[0].float() / scale, sin[0].float() / scale


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def rotation_table(model, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (P, head_dim) float32 of rotations by 0..P-1 positions, P ≥ n (``rotation`` of
    ``arange(P)``; row 0 the exact identity). Built once per model and device, grown by doubling,
    so re-rotating a chunk by Δ reads row Δ instead of evaluating the rotary module. The tables
    are kept beside the model (weakly keyed: they go with it), never on it."""
    tables = _TABLES.setdefault(model, {})
    device = torch.device(device)
    cos, sin = tables.get(str(device), (None, None))
    if cos is None or len(cos) < n:
        size = 1 << max(n - 1, 1023).bit_length()
        cos, sin = rotation(model, torch.arange(size), device=device)
        cos[0], sin[0] = 1.0, 0.0
        tables[str(device)] = cos, sin
    return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(…, D) → (…, D): [-x2, x1] with x1, x2 the two halves (the HF RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotation(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate keys (…, S, D) by cos/sin (S, D); computed in fp32, returned in the keys' dtype.

    Works for one layer (H, S, D) or all layers stacked (L, H, S, D) in a single batched op.
    """
    rot_dim = cos.shape[-1]
    k = keys.float()
    k_rot, k_pass = k[..., :rot_dim], k[..., rot_dim:]  # partial rotary: only the first rot_dim
    out = k_rot * cos + rotate_half(k_rot) * sin
    if k_pass.shape[-1]:
        out = torch.cat((out, k_pass), dim=-1)
    return out.to(keys.dtype)


def rerotate(model, keys: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
    """Move keys (…, S, D) encoded at local positions by ``delta`` (an int or (S,) tensor)."""
    seq = keys.shape[-2]
    if isinstance(delta, int):
        delta = torch.full((seq,), delta, dtype=torch.long)
    cos, sin = rotation(model, delta, device=keys.device)
    return apply_rotation(keys, cos, sin)

