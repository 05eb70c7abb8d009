"""Re-rotating cached keys by Δ equals encoding at offset Δ (HF's own rotary embedding)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvp.cache import encode
from kvp.rope import rerotate, rotation, rotation_table


def test_rerotation_equals_encoding_at_offset(smollm, ctx):
    model = smollm.model
    ids = ctx.doc_ids[0]
    delta = 137
    local = encode(model, input_ids=ids)
    at_offset = encode(model, input_ids=ids, start=delta)
    moved = rerotate(model, local.keys, delta)
    torch.testing.assert_close(moved[0], at_offset.keys[0], atol=1e-4, rtol=1e-4)  # layer 0: fp32 rounding only
    torch.testing.assert_close(moved, at_offset.keys, atol=2e-3, rtol=1e-3)
    assert (local.keys - at_offset.keys).abs().max() > 0.1  # the rotation did something


@pytest.mark.parametrize("rope", [
    dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
         high_freq_factor=4.0, original_max_position_embeddings=64),
    dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64),
], ids=["llama3", "yarn"])
def test_rerotation_with_scaled_rope_and_gqa(rope):
    """llama3 scaling and YaRN (attention_scaling != 1) on a tiny GQA model: keys at Δ agree."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                         max_position_embeddings=4096, rope_parameters=rope)
    model = LlamaForCausalLM(config).eval()
    if rope["rope_type"] == "yarn":
        assert model.model.rotary_emb.attention_scaling != 1.0
    ids = torch.randint(0, 100, (20,))
    local, at = encode(model, input_ids=ids), encode(model, input_ids=ids, start=300)
    torch.testing.assert_close(rerotate(model, local.keys, 300)[0], at.keys[0], atol=1e-5, rtol=1e-4)
    # the cached table's row Δ is rotation(Δ), bit for bit; it grows on demand; row 0 is identity
    cos, sin = rotation_table(model, 300, "cpu")
    assert len(cos) >= 300 and rotation_table(model, 10, "cpu")[0] is cos
    want = rotation(model, torch.tensor([299, 7]))
    assert torch.equal(cos[[299, 7]], want[0]) and torch.equal(sin[[299, 7]], want[1])
    assert (cos[0] == 1).all() and (sin[0] == 0).all()
    assert len(rotation_table(model, 5000, "cpu")[0]) >= 5000
