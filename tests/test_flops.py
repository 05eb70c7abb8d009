"""Analytic FLOPs against PyTorch's FLOP counter."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from kvp.cache import encode, to_cache
from kvp.flops import Arch, prefill_flops


def test_prefill_flops_match_flop_counter(smollm_eager):
    """Analytic FLOPs of a prefill vs FlopCounterMode on the real forward (within 5%).

    Both count projections, attention (QKᵀ and AV as matmuls: the eager path, since the counter
    does not see the fused CPU SDPA kernel), MLP and the LM head of the last position; the
    analytic side also adds RoPE (< 0.5% here), which the counter does not see.
    """
    model = smollm_eager.model
    ids = torch.randint(0, 1000, (300,))
    cache = to_cache(*(lambda kv: (kv.keys, kv.values))(encode(model, input_ids=ids[:40])))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids[40:][None], past_key_values=cache,
              position_ids=torch.arange(40, 300)[None], logits_to_keep=1)
    analytic = prefill_flops(Arch.from_config(model.config), 260, 40)
    assert abs(analytic - counter.get_total_flops()) / counter.get_total_flops() < 0.05
