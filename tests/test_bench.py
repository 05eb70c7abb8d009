"""The optimised KV Packet path (kvp.query_step) against the plain path, and the TTFT benchmark's output.

No timing is asserted: only equivalence, the CSV schema and the analysis helpers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kvp.bench import (HOST_GRAPH_VARIANT, BenchConfig, IdTokenizer, bench_model,
                       copy_setting, crossover_tokens, environment, loglog_slopes, read_csvs,
                       summary, synthetic_context, tier_lines, tier_summary, tiered_run,
                       write_csv)
from kvp import kernels
from kvp.cache import ChunkKV
from kvp.query_step import (RMS_NORMS, FusedProjections, KVBuffer, PromptGraph, add_rms_norm,
                            assemble_into, fast_query, mlp, rms_norm, rope, rope_store, silu_mul)
from kvp.methods import get_method
from kvp.models import load_model
from kvp.packet import PacketWrapper, assemble
from kvp.rope import apply_rotation

ROOT = Path(__file__).resolve().parents[1]

SMALL_LLAMA = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024)
REQUIRED = ["device", "model", "method", "context_tokens", "n_docs", "ttft_ms", "floor_ms", "flops",
            "peak_mem_bytes"]
# Triton kernels run in Triton's interpreter on the CPU (installed with the test extra on Linux)
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (no wheels for this platform)")
TINY = BenchConfig(context_tokens=(160,), n_docs=(2, 3), n_docs_default=2, n_docs_context=160,
                   preamble_tokens=16, prompt_tokens=8, methods=(("full_recompute", {}),
                                                                 ("kv_packet", {})),
                   warmup=0, repeats=1, min_repeats=1, max_seconds=0.0)


@pytest.fixture(scope="module")
def small_llama():
    model, _, _ = load_model("arch:llama-3.1-8b", device="cpu", config_overrides=SMALL_LLAMA)
    return model


def packet_context(model, name="m", context=160, n_docs=3):
    wrapper = PacketWrapper.init_from_embeddings(model, 8, 8, seed=1, model_name=name)
    ctx = synthetic_context(model, name, context, n_docs, TINY, wrapper)
    method = get_method("kv_packet")
    return ctx, method, method.prepare(ctx)


@pytest.mark.parametrize("which", ["smollm", "small_llama"])
def test_fast_query_gives_the_plain_first_logits(which, request):
    model = request.getfixturevalue(which)
    model = model[0] if isinstance(model, tuple) else model
    ctx, method, packets = packet_context(model)
    plain = method.prefill(ctx, packets)
    buf = KVBuffer.allocate(model, plain.next_pos + 5)  # spare slots are never read
    logits, next_pos = fast_query(model, buf, ctx.preamble_kv, packets, ctx.task_ids)
    assert next_pos == plain.next_pos
    torch.testing.assert_close(logits, plain.first_logits, rtol=1e-4, atol=1e-4)
    # the buffer's context + prompt slots equal the plain path's cache, layer by layer
    end = plain.next_pos
    for layer, cached in enumerate(plain.cache.layers):
        torch.testing.assert_close(buf.keys[layer, :, :end], cached.keys[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(buf.values[layer, :, :end], cached.values[0])


def test_assemble_into_keeps_the_positions_of_compressed_packets(smollm):
    model = smollm[0]
    ctx, _, packets = packet_context(model)
    # drop two tokens of the first packet: later packets keep their positions (span)
    first = packets[0]
    packets = [dataclasses.replace(first, kv=first.kv.slice(0, first.kv.length - 2),
                                   span=first.length)] + packets[1:]
    kv, next_pos = assemble(model, ctx.preamble_kv, packets)
    buf = KVBuffer.allocate(model, kv.length)
    n_cached, pos = assemble_into(model, buf, ctx.preamble_kv, packets)
    assert (n_cached, pos) == (kv.length, next_pos) and n_cached < next_pos
    torch.testing.assert_close(buf.keys, kv.keys)
    torch.testing.assert_close(buf.values, kv.values)


@pytest.mark.parametrize("which", ["smollm", "small_llama"])
def test_elementwise_kernels_are_the_model_modules_maths(which, request):
    """The functions ``fused=True`` compiles compute exactly what the model's own modules do."""
    model = request.getfixturevalue(which)
    model = model[0] if isinstance(model, tuple) else model
    layer = model.model.layers[0]
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ln = layer.input_layernorm
    assert type(ln).__name__ in RMS_NORMS
    torch.testing.assert_close(rms_norm(x, ln.weight, ln.variance_epsilon), ln(x), rtol=0, atol=0)
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    added, normed = add_rms_norm(x, delta, ln.weight, ln.variance_epsilon)
    torch.testing.assert_close(added, x + delta, rtol=0, atol=0)
    torch.testing.assert_close(normed, ln(x + delta), rtol=0, atol=0)
    m = layer.mlp
    torch.testing.assert_close(m.down_proj(silu_mul(m.gate_proj(x), m.up_proj(x))), m(x),
                               rtol=0, atol=0)
    positions = torch.arange(3, 8)[None]
    cos, sin = model.model.rotary_emb(x[None], positions)
    q = torch.randn(4, 5, cos.shape[-1])
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    expected, _ = apply_rotary_pos_emb(q[None], q[None], cos, sin)
    torch.testing.assert_close(rope(q, cos, sin), expected[0], rtol=0, atol=0)
    k, v = q[:2], q[2:]
    k_out, v_out = torch.zeros_like(k), torch.zeros_like(v)
    torch.testing.assert_close(rope_store(q, k, v, cos, sin, k_out, v_out), expected[0],
                               rtol=0, atol=0)
    torch.testing.assert_close(k_out, expected[0][:2], rtol=0, atol=0)
    assert torch.equal(v_out, v) and torch.equal(mlp(m, x, None), m(x))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_launch_assembly_is_the_eager_rotation_and_copy(dtype):
    """The Triton assembly kernel (run by Triton's interpreter on the CPU) against
    ``apply_rotation`` chunk by chunk, including a sliced (strided) chunk and unwritten slots."""
    gen = torch.Generator().manual_seed(0)
    n_layers, n_heads, dim = 3, 2, 64

    def chunk(length):
        return ChunkKV(*(torch.randn(n_layers, n_heads, length, dim, generator=gen).to(dtype)
                         for _ in range(2)))

    strided = chunk(20).slice(0, 13)  # keys strided, values contiguous: both copied first
    chunks = [chunk(5), chunk(70).slice(2, 67), ChunkKV(strided.keys, strided.values.contiguous())]
    slots, offsets, capacity = [0, 5, 70], [0, 9, 4], 90
    cos, sin = torch.randn(10, dim, generator=gen), torch.randn(10, dim, generator=gen)
    keys = torch.zeros(n_layers, n_heads, capacity, dim, dtype=dtype)
    values = torch.zeros_like(keys)
    kernels.assemble(keys, values, chunks, slots, offsets, cos, sin)
    # the interpreter rounds fp32 → bf16 toward zero (CUDA rounds to nearest): one bf16 step apart
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    for c, slot, offset in zip(chunks, slots, offsets):
        torch.testing.assert_close(keys[:, :, slot:slot + c.length],
                                   apply_rotation(c.keys, cos[offset], sin[offset]), **tol)
        assert torch.equal(values[:, :, slot:slot + c.length], c.values)
    assert not keys[:, :, 83:].any() and not values[:, :, 83:].any()
    kernels.assemble(keys, values, chunks, slots, offsets, cos, sin, rotate=False)
    assert torch.equal(keys[:, :, 5:70], chunks[1].keys)
    with pytest.raises(ValueError, match="capacity"):
        kernels.assemble(keys, values, chunks, [0, 5, 80], offsets, cos, sin)
    with pytest.raises(ValueError, match="rotation table"):
        kernels.assemble(keys, values, chunks, slots, [0, 9, 10], cos, sin)
    with pytest.raises(ValueError, match="encode packets with the buffer's model"):
        kernels.assemble(keys.double(), values.double(), chunks, slots, offsets, cos, sin)


@needs_triton
@pytest.mark.parametrize("heads,kv_heads,seq,n_cached,dim,splits", [
    (4, 2, 8, 200, 64, 3),    # GQA, three splits merged
    (9, 3, 5, 150, 64, None),  # the embedded model's grouping, default split
    (4, 4, 3, 0, 16, 2),      # no context: the second split holds only masked keys for token 0
    (4, 2, 6, 90, 48, 2),     # head dim not a power of two
])
def test_split_kv_attention_is_sdpa_with_a_lower_right_causal_mask(heads, kv_heads, seq, n_cached,
                                                                    dim, splits):
    from torch.nn.attention.bias import causal_lower_right

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(seq, heads, dim, generator=gen).transpose(0, 1)  # (H, T, D), strided as in use
    keys, values = (torch.randn(kv_heads, n_cached + seq + 7, dim, generator=gen) for _ in range(2))
    end = n_cached + seq
    want = torch.nn.functional.scaled_dot_product_attention(
        q[None], keys[None, :, :end], values[None, :, :end], attn_mask=causal_lower_right(seq, end),
        scale=0.1, enable_gqa=True)[0].transpose(0, 1).reshape(seq, -1)
    got = kernels.attend(q, keys, values, n_cached, 0.1, splits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def tiny_qwen2():
    """A two-layer Qwen2 (q/k/v with biases) with random weights: only the maths is compared."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    return Qwen2ForCausalLM(cfg).eval()


@needs_triton
@pytest.mark.parametrize("arch", ["arch:llama-3.1-8b", "arch:qwen3-4b", "qwen2"])
def test_fused_query_gives_the_plain_first_logits(arch):
    """``fused=True`` on the CPU: one-launch assembly (interpreted), fused q/k/v and gate/up GEMMs
    and compiled element-wise kernels, against the plain path; fusing leaves the model's maths."""
    if arch == "qwen2":
        model = tiny_qwen2()
    else:
        model = load_model(arch, device="cpu", config_overrides=SMALL_LLAMA)[0]
    ctx, method, packets = packet_context(model)
    plain = method.prefill(ctx, packets)
    ids = ctx.task_ids[None]
    before = model(ids).logits
    params = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    buf = KVBuffer.allocate(model, plain.next_pos)
    with FusedProjections(model) as projections:
        logits, next_pos = fast_query(model, buf, ctx.preamble_kv, packets, ctx.task_ids,
                                      fused=True, projections=projections)
        attn = model.model.layers[0].self_attn
        assert (projections[0].qkv_bias is not None) == (arch == "qwen2")
        assert attn.q_proj.weight.data_ptr() == projections[0].qkv.data_ptr()  # views: no copy
        assert torch.equal(model(ids).logits, before)  # fusing leaves the model's maths
    assert next_pos == plain.next_pos
    torch.testing.assert_close(logits, plain.first_logits, rtol=1e-4, atol=1e-4)
    for layer, cached in enumerate(plain.cache.layers):
        torch.testing.assert_close(buf.keys[layer], cached.keys[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(buf.values[layer], cached.values[0], rtol=1e-4, atol=1e-4)
    # leaving the block restores the model: the same parameters, values, and storage of their own
    q, k = model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.k_proj.weight
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    for name, p in model.named_parameters():
        assert p is params[name][0] and torch.equal(p, params[name][1])
    assert torch.equal(model(ids).logits, before)


def test_too_small_buffer_and_graph_on_cpu_are_refused(smollm):
    model = smollm[0]
    ctx, _, packets = packet_context(model)
    with pytest.raises(ValueError, match="capacity"):
        assemble_into(model, KVBuffer.allocate(model, 10), ctx.preamble_kv, packets)
    with pytest.raises(ValueError, match="CUDA"):
        PromptGraph(model, KVBuffer.allocate(model, 300), 10, 4, 10)


def test_tiny_benchmark_writes_the_schema(smollm, small_llama, tmp_path):
    env = environment(torch.device("cpu"), torch.float32)
    rows = bench_model(small_llama, "arch:llama-3.1-8b", TINY, env, log=lambda s: None)
    rows = bench_model(smollm[0], "smollm2-135m", TINY, env, previous=rows, log=lambda s: None)
    path = tmp_path / "ttft.csv"
    write_csv(rows, path)
    df = pd.read_csv(path)
    assert set(REQUIRED) <= set(df.columns)
    # 2 models × 2 configurations × (2 methods + the fast variant; no CUDA graph on the CPU)
    assert len(df) == 12 and (df["status"] == "ok").all()
    assert set(df["label"]) == {"full_recompute", "kv_packet", "kv_packet[fast]"}
    assert (df["ttft_ms"] > 0).all() and (df["floor_ms"] > 0).all() and (df["flops"] > 0).all()
    fast = df[df["variant"] == "fast"]
    assert fast["top1_agrees"].all() and (fast["max_logit_diff"] < 1e-3).all()
    assert fast[["assembly_ms", "rotation_ms", "rotation_share"]].notna().all().all()
    packet = df[df["label"] == "kv_packet"].set_index(["model", "n_docs"])
    full = df[df["label"] == "full_recompute"].set_index(["model", "n_docs"])
    # KV Packet caches 16 wrapper tokens per document on top of the same context
    assert ((packet["cached_tokens"] - full["cached_tokens"]) == 16 * packet.index.get_level_values(1)).all()
    assert (packet["flops"] < full["flops"]).all()


def test_id_tokenizer_round_trips():
    assert IdTokenizer()("3 1 4", add_special_tokens=False) == {"input_ids": [3, 1, 4]}


def synthetic_results(slopes: dict[str, float]) -> pd.DataFrame:
    rows = []
    for label, slope in slopes.items():
        for n in (1024, 4096, 16384):
            rows.append(dict(device="d", model="m", method=label, variant="plain", label=label,
                             n_docs=8, context_tokens=n, ttft_ms=3.0 * n**slope, floor_ms=1.0,
                             status="ok"))
    return pd.DataFrame(rows)


def test_loglog_slopes_recover_a_power_law():
    out = loglog_slopes(synthetic_results({"full_recompute": 1.7, "kv_packet": 0.1})).set_index("label")
    np.testing.assert_allclose(out.loc["full_recompute", "slope"], 1.7)
    np.testing.assert_allclose(out.loc["kv_packet", "slope"], 0.1)


def test_tier_benchmark_measures_the_links_and_adds_the_transfer_to_the_floor(small_llama,
                                                                               tmp_path):
    env = environment(torch.device("cpu"), torch.float32, links_dir=tmp_path)
    assert env.disk_gbs > 0 and np.isnan(env.h2d_gbs)  # no host → device link on a CPU
    cfg = dataclasses.replace(TINY, n_docs=(2,), variants=("fast",), tiers=("gpu", "host", "disk"),
                              packet_dtypes=("model", "fp8"), packet_dir=str(tmp_path))
    rows = bench_model(small_llama, "arch:llama-3.1-8b", cfg, env, log=lambda s: None)
    path = tmp_path / "ttft.csv"
    write_csv(rows, path)
    df = read_csvs([path])
    assert (df["status"] == "ok").all(), df[["label", "status"]]
    packet = df[df["method"] == "kv_packet"]
    assert set(zip(packet["tier"], packet["packet_dtype"])) >= {
        (t, d) for t in ("gpu", "host", "disk") for d in ("fp32", "fp8")}
    assert set(packet[packet["tier"] != "gpu"]["variant"]) == {"pipelined"}
    # every tier and dtype gives the plain path's first token; fp8 within its rounding
    assert packet["top1_agrees"].dropna().all()
    exact = packet[(packet["packet_dtype"] == "fp32") & packet["max_logit_diff"].notna()]
    assert (exact["max_logit_diff"] < 1e-3).all()
    moved = packet[packet["tier"] != "gpu"].set_index(["tier", "packet_dtype"])
    assert (moved["transfer_bytes"] > 0).all() and (moved["floor_transfer_ms"] > 0).all()
    assert moved.loc[("host", "fp8"), "transfer_bytes"] < 0.3 * moved.loc[("host", "fp32"), "transfer_bytes"]
    assert set(moved["link"]) <= {"memory", "disk"}
    np.testing.assert_allclose(moved["floor_ms"], moved[["floor_mem_ms", "floor_flops_ms"]].max(axis=1)
                               + moved["floor_transfer_ms"])
    assert not list(tmp_path.glob("packets-*"))  # the disk tier's files are removed
    tiers = tier_summary(df, 160, 2)
    assert set(tiers["tier"]) == {"gpu", "host", "disk"} and (tiers["packet_ms"] > 0).all()
    assert "beats_recompute_floors" in summary(df, 160, 2)


def test_old_csvs_read_as_the_gpu_tier_in_the_model_dtype(tmp_path):
    old = synthetic_results({"full_recompute": 1.7}).assign(dtype="bfloat16")
    old.to_csv(tmp_path / "old.csv", index=False)
    df = read_csvs([tmp_path / "old.csv"])
    assert (df["tier"] == "gpu").all() and (df["packet_dtype"] == "bf16").all()


def test_host_graph_step_is_a_line_of_its_own_in_the_tier_summary():
    # a committed GPU run that timed both host-tier steps (--host-graph): two lines per dtype
    df = read_csvs([ROOT / "data" / "benchmarks" / "ttft_nvidia-h200_2026-12-02_host-graph.csv"])
    tiers = tier_summary(df, 8192, 8)
    host = tiers[tiers["tier"] == "host"]
    assert sorted(host["label"]) == sorted(
        f"kv_packet[{v}]@host{s}" for v in ("pipelined+fused", "pipelined+graph+fused") for s in ("", ":fp8"))
    assert tiers.groupby(["tier", "packet_dtype"]).size().to_dict() == {
        ("gpu", "bf16"): 1, ("gpu", "fp8"): 1, ("host", "bf16"): 2, ("host", "fp8"): 2}


def test_each_layers_per_copy_of_the_host_graph_is_a_line_of_its_own():
    df = read_csvs([ROOT / "data" / "benchmarks" / "ttft_nvidia-h200_2026-12-02_host-graph.csv"])
    graph = df[(df["variant"] == HOST_GRAPH_VARIANT) & (df["status"] == "ok")]
    assert copy_setting(1) == "" and set(graph["setting"].fillna("")) == {""}
    grouped = graph.assign(setting=copy_setting(8), ttft_ms=graph["ttft_ms"] / 2)
    lines = tier_lines(pd.concat([df, grouped], ignore_index=True))
    host = lines[lines["tier"] == "host"].groupby("line")["ttft_ms"].min()
    assert {"host bf16 graph", "host bf16 graph layers_per_copy=8", "host fp8 graph",
            "host fp8 graph layers_per_copy=8"} <= set(host.index)
    assert host["host bf16 graph layers_per_copy=8"] == pytest.approx(host["host bf16 graph"] / 2)
    # the Triton assembly (--host-graph-fused-assembly) is a line of its own too
    assert copy_setting(1, True) == "fused_assembly"
    assert copy_setting(8, True) == "layers_per_copy=8,fused_assembly"
    fused = graph.assign(setting=copy_setting(8, True))
    lines = tier_lines(pd.concat([df, grouped, fused], ignore_index=True))
    assert {"host bf16 graph layers_per_copy=8",
            "host bf16 graph layers_per_copy=8,fused_assembly"} <= set(lines["line"])


def test_the_tier_figure_takes_the_newest_tiered_run_by_date_not_by_name():
    names = ["ttft_nvidia-h100-80gb-hbm3_2026-12-07_triton-assembly", "ttft_nvidia-h200_2026-12-02",
             "ttft_nvidia-h200_2026-11-28"]  # by name the H200 files sort last; the last has no tiers
    bench = pd.concat([read_csvs([ROOT / "data" / "benchmarks" / f"{n}.csv"]).assign(source=n)
                       for n in names], ignore_index=True)
    assert set(tiered_run(bench)["source"]) == {names[0]}
    assert set(tiered_run(bench[bench["source"] != names[0]])["source"]) == {names[1]}
    assert tiered_run(bench[bench["source"] == names[2]]) is None


def test_crossover_is_where_reuse_starts_to_beat_recompute():
    lengths = pd.Index([1000, 2000, 4000, 8000])
    full = pd.Series([10.0, 20.0, 40.0, 80.0], lengths)
    # 2× slower at 1000, 2× faster at 2000: log-ratio crosses zero half way (log scale) → √2·1000
    packet = pd.Series([20.0, 10.0, 12.0, 14.0], lengths)
    np.testing.assert_allclose(crossover_tokens(packet, full), 1000 * 2 ** 0.5)
    assert crossover_tokens(full / 2, full) == 0.0
    assert crossover_tokens(full * 2, full) == float("inf")


def test_latency_figures_draw_every_line():
    import matplotlib

    matplotlib.use("Agg")
    from kvp import plots

    rows = synthetic_results({"full_recompute": 1.0, "kv_packet": 0.2}).assign(
        dtype="bfloat16", setting="", flops=lambda d: d["ttft_ms"] * 1e9)
    for tier, factor in (("host", 3.0), ("disk", 30.0)):
        rows = pd.concat([rows, synthetic_results({"kv_packet": 0.5}).assign(
            dtype="bfloat16", setting="", tier=tier, packet_dtype="bf16",
            ttft_ms=lambda d: d["ttft_ms"] * factor, variant="pipelined+fused")])
    grid = plots.plot_latency_grid(rows)
    assert len(grid.axes[0].get_lines()) == 2  # the grid: GPU-resident packets only
    fig = plots.plot_tier_latency(rows)
    # full recompute, then each tier's line and its floor
    assert len([line for line in fig.axes[0].get_lines() if line.get_label()[0] != "_"]) == 4


@pytest.mark.gpu
def test_fused_kernels_and_cuda_graph_match_the_plain_path():
    model, _, _ = load_model("arch:llama-3.1-8b", device="cuda", config_overrides=SMALL_LLAMA)
    ctx, method, packets = packet_context(model)
    plain = method.prefill(ctx, packets)
    eager = KVBuffer.allocate(model, plain.next_pos)
    assemble_into(model, eager, ctx.preamble_kv, packets)
    buf = KVBuffer.allocate(model, plain.next_pos)
    n_cached, start = assemble_into(model, buf, ctx.preamble_kv, packets, fused=True)
    # the compiled Triton kernel rounds like torch and does not fuse multiply-adds: bit for bit
    assert torch.equal(buf.keys[:, :, :n_cached], eager.keys[:, :, :n_cached])
    assert torch.equal(buf.values[:, :, :n_cached], eager.values[:, :, :n_cached])
    with FusedProjections(model) as projections:
        logits, _ = fast_query(model, buf, ctx.preamble_kv, packets, ctx.task_ids, fused=True,
                               projections=projections)
        replayed = [PromptGraph(model, buf, n_cached, len(ctx.task_ids), start, fused,
                                projections if fused else None)(ctx.task_ids.cuda())
                    for fused in (False, True)]
    for out in [logits] + replayed:
        torch.testing.assert_close(out.float(), plain.first_logits.float(), rtol=0.05, atol=0.5)
        assert out.argmax() == plain.first_logits.argmax()


def test_host_graph_on_a_cpu_is_refused_before_any_timing(small_llama, tmp_path):
    env = environment(torch.device("cpu"), torch.float32, links_dir=tmp_path)
    cfg = dataclasses.replace(TINY, tiers=("host",), host_graph=True)
    with pytest.raises(ValueError, match=r"--host-graph.*model is on cpu; drop it"):
        bench_model(small_llama, "arch:llama-3.1-8b", cfg, env, log=lambda s: None)
    with pytest.raises(ValueError, match=r"--host-graph-fused-assembly.*add host_graph=True"):
        dataclasses.replace(TINY, tiers=("host",), host_graph_fused_assembly=True)
