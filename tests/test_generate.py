"""Greedy decoding against an assembled cache equals HF `generate` on the joint prompt."""

from __future__ import annotations

import torch

from kvp.generate import GenerationConfig
from kvp.methods import get_method, run_method


def test_full_recompute_matches_hf_generate(smollm, ctx):
    model = smollm.model
    result = run_method(get_method("full_recompute"), ctx, GenerationConfig(max_new_tokens=16))
    joint = torch.cat([ctx.preamble_ids, *ctx.doc_ids, ctx.task_ids])[None]
    hf = model.generate(joint, attention_mask=torch.ones_like(joint), max_new_tokens=16,
                        do_sample=False)[0, joint.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    hf = hf[: next((i for i, t in enumerate(hf) if t in eos), len(hf))]
    assert result.token_ids == hf
    assert "Gothenburg" in result.answer
