"""Equivalence tests of the core: re-rotation, packets, assembly, block mask, every method.

Each fast path is compared with the slow, obviously right path on the embedded model and its real
tokenizer: HF ``generate``, HF's own rotary embedding (encoding at an offset), the joint block-mask
forward, and full recompute.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvp.blockmask import block_forward, block_mask, make_layout
from kvp.cache import encode, from_cache, to_cache
from kvp.flops import Arch, prefill_flops
from kvp.generate import GenerationConfig
from kvp.methods import get_method, make_context, run_method
from kvp.packet import PacketStore, PacketWrapper, assemble, build_packet
from kvp.recompute import recompute
from kvp.rope import rerotate, rotation, rotation_table

DOCS = [
    "Maria Lindqvist was born on 14 March 1987 in Gothenburg. She studied chemistry at Uppsala "
    "University and now works for Ericsson in Stockholm.\n\n",
    "Tomasz Nowak was born on 2 July 1979 in Krakow. He studied architecture at Warsaw University "
    "of Technology and now works for Siemens in Munich.\n\n",
    "Aiko Tanaka was born on 30 May 1990 in Osaka. She studied economics at Kyoto University and "
    "now works for Toyota in Nagoya.\n\n",
]
QUESTION = "Where was Maria Lindqvist born? Respond with the answer only."


def segments(tokenizer, docs=DOCS, question=QUESTION):
    """Preamble / documents / task strings that concatenate to the chat template's text."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "".join(docs) + question}],
                                         tokenize=False, add_generation_prompt=True)
    start = text.index(docs[0])
    return text[:start], list(docs), text[start + len("".join(docs)):]


@pytest.fixture(scope="module")
def wrapper(smollm):
    model = smollm.model
    return PacketWrapper.init_from_embeddings(model, h=4, t=4, seed=1, model_name="smollm2-135m")


@pytest.fixture(scope="module")
def ctx(smollm, wrapper):
    model, tokenizer = smollm.model, smollm.tokenizer
    store = PacketStore(model, tokenizer, "smollm2-135m")
    return make_context(model, tokenizer, store, *segments(tokenizer), wrapper=wrapper)


def all_logits_after(model, kv, ids: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) of ``ids`` prefilled after an assembled cache (the slow path: every position)."""
    cache = to_cache(kv.keys, kv.values)
    pos = torch.arange(kv.length, kv.length + len(ids))[None]
    with torch.no_grad():
        return model(input_ids=ids[None], past_key_values=cache, position_ids=pos).logits[0]


# ----------------------------------------------------------------------------- 1. generate
def test_full_recompute_matches_hf_generate(smollm, ctx):
    model, tokenizer = smollm.model, smollm.tokenizer
    result = run_method(get_method("full_recompute"), ctx, GenerationConfig(max_new_tokens=16))
    joint = torch.cat([ctx.preamble_ids, *ctx.doc_ids, ctx.task_ids])[None]
    hf = model.generate(joint, attention_mask=torch.ones_like(joint), max_new_tokens=16,
                        do_sample=False)[0, joint.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    hf = hf[: next((i for i, t in enumerate(hf) if t in eos), len(hf))]
    assert result.token_ids == hf
    assert "Gothenburg" in result.answer


# ----------------------------------------------------------------------------- 2. block mask
@pytest.mark.parametrize("wrapped", [True, False], ids=["random-wrapper", "empty-wrapper"])
def test_rerotated_packets_equal_block_mask_forward(smollm, ctx, wrapper, wrapped):
    model, tokenizer = smollm.model, smollm.tokenizer
    w = wrapper if wrapped else PacketWrapper.empty(model.config.hidden_size)
    packets = [build_packet(model, tokenizer, d, w) for d in DOCS]
    kv, n = assemble(model, ctx.preamble_kv, packets)
    fast = all_logits_after(model, kv, ctx.task_ids)
    with torch.no_grad():
        slow, layout, _ = block_forward(model, ctx.preamble_ids, ctx.doc_ids, ctx.task_ids, w)
    assert layout.final[0] == n
    torch.testing.assert_close(fast, slow, atol=2e-3, rtol=1e-3)
    # and it is not trivially so: full attention over the same sequence differs
    with torch.no_grad():
        joint = torch.cat([ctx.preamble_ids, *ctx.doc_ids, ctx.task_ids])[None]
        full = model(joint).logits[0, -len(ctx.task_ids):]
    if not wrapped:
        assert (full - slow).abs().max() > 0.1


def test_block_mask_shape_and_pattern():
    layout = make_layout(2, [3, 2], 2, h=1, t=1)
    allowed = block_mask(layout, torch.float32)[0, 0] == 0
    assert layout.docs == [(2, 7), (7, 11)] and layout.final == (11, 13)
    assert allowed[6, 2] and not allowed[6, 1]  # doc 1 sees only itself
    assert not allowed[8, 5]  # doc 2 does not see doc 1
    assert allowed[12].all() and not allowed[11, 12]  # final block: everything, causally


# ----------------------------------------------------------------------------- 3. re-rotation
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
    from transformers import LlamaConfig, LlamaForCausalLM

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


# ----------------------------------------------------------------------------- 4. methods
def first_logits(ctx, name, **kw):
    method = get_method(name, **kw)
    return method.prefill(ctx, method.prepare(ctx))


@pytest.mark.parametrize("name,kw", [("cache_blend", {"ratio": 1.0}), ("epic", {"n_tokens": 10_000}),
                                     ("rand_recompute", {"ratio": 1.0}), ("a3", {"ratio": 1.0})])
def test_recompute_everything_equals_full_recompute(ctx, name, kw):
    ref = first_logits(ctx, "full_recompute")
    out = first_logits(ctx, name, **kw)
    assert out.next_pos == ref.next_pos
    torch.testing.assert_close(out.first_logits, ref.first_logits, atol=2e-3, rtol=1e-3)


def test_partial_recompute_differs_from_both_ends(ctx):
    ref, none = first_logits(ctx, "full_recompute"), first_logits(ctx, "no_recompute")
    half = first_logits(ctx, "cache_blend", ratio=0.5)
    assert (half.first_logits - ref.first_logits).abs().max() > 1e-3
    assert (half.first_logits - none.first_logits).abs().max() > 1e-3
    assert half.flops < ref.flops


def test_kv_packet_with_empty_wrapper_equals_no_recompute(smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    store = PacketStore(model, tokenizer, "smollm2-135m")
    empty = PacketWrapper.empty(model.config.hidden_size)
    c = make_context(model, tokenizer, store, *segments(tokenizer), wrapper=empty)
    torch.testing.assert_close(first_logits(c, "kv_packet").first_logits,
                               first_logits(c, "no_recompute").first_logits)


def test_recompute_rewrites_only_selected_tokens(ctx):
    method = get_method("no_recompute")
    from kvp.methods.base import assemble_packets

    kv, _, _ = assemble_packets(ctx, method.prepare(ctx))
    before = kv.keys.clone()
    ids = torch.cat([ctx.preamble_ids, *ctx.doc_ids])
    chosen = torch.tensor([ctx.n_preamble + 40, ctx.n_preamble + 41, ctx.n_preamble + 60])
    trace = recompute(ctx.model, kv, ids, chosen)
    changed = (kv.keys - before).abs().amax(dim=(0, 1, 3)) > 0  # (S,)
    assert changed.nonzero().flatten().tolist() == chosen.tolist()
    assert trace.tokens_per_layer == [3] * ctx.model.config.num_hidden_layers


def test_every_method_answers_and_reports(ctx):
    cfg = GenerationConfig(max_new_tokens=4)
    for name, kw in [("no_cache", {}), ("no_recompute", {}), ("kv_packet", {}),
                     ("cache_blend", {"ratio": 0.3}), ("epic", {"n_tokens": 8}), ("a3", {"ratio": 0.3}),
                     ("sam_kv", {}), ("rand_recompute", {"ratio": 0.3})]:
        r = run_method(get_method(name, **kw), ctx, cfg)
        assert r.ttft_s > 0 and r.flops > 0 and r.answer, name
        assert (r.n_recomputed > 0) == (name not in ("no_cache", "no_recompute", "kv_packet")), name


# ----------------------------------------------------------------------------- 5. store
def test_packet_store_encodes_once_and_persists(smollm, wrapper, tmp_path):
    model, tokenizer = smollm.model, smollm.tokenizer
    store = PacketStore(model, tokenizer, "smollm2-135m", directory=tmp_path)
    a = store.get(DOCS[0], wrapper)
    b = store.get(DOCS[0], wrapper)
    assert a is b and store.n_encoded == 1
    assert store.get(DOCS[0]).n_header == 0 and store.n_encoded == 2  # plain ≠ wrapped
    fresh = PacketStore(model, tokenizer, "smollm2-135m", directory=tmp_path)
    c = fresh.get(DOCS[0], wrapper)
    assert fresh.n_encoded == 0 and torch.equal(c.kv.keys, a.kv.keys)
    assert (c.n_header, c.n_doc, c.n_trailer) == (4, a.n_doc, 4)


def test_packet_store_memory_bound_evicts_least_recently_used(smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    store = PacketStore(model, tokenizer, "smollm2-135m", max_in_memory=2)
    first = store.get(DOCS[0])
    store.get(DOCS[1])
    assert store.get(DOCS[0]) is first and store.n_encoded == 2  # a hit refreshes DOCS[0]
    store.get(DOCS[2])  # evicts DOCS[1], the least recently used
    assert store.get(DOCS[0]) is first and store.n_encoded == 3
    store.get(DOCS[1])
    assert store.n_encoded == 4 and len(store._memory) == 2


# ----------------------------------------------------------------------------- FLOPs
def test_prefill_flops_match_flop_counter(smollm_eager):
    """Analytic FLOPs of a prefill vs FlopCounterMode on the real forward (within 5%).

    Both count projections, attention (QKᵀ and AV as matmuls: the eager path, since the counter
    does not see the fused CPU SDPA kernel), MLP and the LM head of the last position; the
    analytic side also adds RoPE (< 0.5% here), which the counter does not see.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = smollm_eager.model
    ids = torch.randint(0, 1000, (300,))
    cache = to_cache(*(lambda kv: (kv.keys, kv.values))(encode(model, input_ids=ids[:40])))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids[40:][None], past_key_values=cache,
              position_ids=torch.arange(40, 300)[None], logits_to_keep=1)
    analytic = prefill_flops(Arch.from_config(model.config), 260, 40)
    assert abs(analytic - counter.get_total_flops()) / counter.get_total_flops() < 0.05


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_get_clear_errors(smollm, wrapper, tmp_path):
    model, tokenizer = smollm.model, smollm.tokenizer
    store = PacketStore(model, tokenizer, "smollm2-135m")
    pre, docs, task = segments(tokenizer)
    with pytest.raises(ValueError, match="empty document"):
        make_context(model, tokenizer, store, pre, docs + ["  "], task)
    with pytest.raises(ValueError, match="empty question"):
        make_context(model, tokenizer, store, pre, docs, "")
    with pytest.raises(ValueError, match=r"has \d+ tokens, more than the model's context of 8192"):
        make_context(model, tokenizer, store, pre, ["word " * 9000], task)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="ratio=1.5"):
        get_method("cache_blend", ratio=1.5)
    path = tmp_path / "w.safetensors"
    wrapper.save(path)
    with pytest.raises(ValueError, match="'smollm2-135m'.*'qwen2.5-coder-0.5b'"):
        PacketWrapper.load(path, model_name="qwen2.5-coder-0.5b")
    with pytest.raises(ValueError, match="d_model 576.*d_model 896"):
        PacketWrapper.load(path, d_model=896)
    loaded = PacketWrapper.load(path, model_name="smollm2-135m", d_model=576)
    assert torch.equal(loaded.header, wrapper.header.detach()) and loaded.h == 4


def test_sliding_window_cache_refused_at_assembly():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=1, vocab_size=50,
                                             sliding_window=16))
    preamble = encode(model, input_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="sliding-window"):
        assemble(model, preamble, [])
