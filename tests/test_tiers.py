"""Packet tiers (gpu / host / disk), compact fp8 / int8 packets and the pipelined query step.

Each fast or compact path is checked against the obvious one: a packet read back from any tier is
the packet built in memory; the pipelined step gives the resident step's logits and buffer bit
for bit; compact packets stay within the e4m3 / int8 rounding bounds and their fused assembly is
the plain assembly of the dequantized packets.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvp.compact import dequantize, quantize
from kvp.methods import get_method, make_context
from kvp.models import load_model
from kvp.packet import PacketStore, PacketWrapper, assemble, build_packet
from kvp.query_step import (KVBuffer, PipelinedGraph, StagedAssembly, Staging, _layout,
                            _Transfer, assemble_into, fast_query, pipelined_query, write_chunks)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (no wheels for this platform)")
DOCS = ["Ada Lovelace was born in London in 1815 and studied mathematics.",
        "The Nile flows north through eleven countries into the Mediterranean Sea.",
        "Marie Curie won Nobel prizes in physics and in chemistry."]
SMALL_LLAMA = dict(num_hidden_layers=3, hidden_size=256, intermediate_size=512,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024)


@pytest.fixture(scope="module")
def wrapper(smollm):
    return PacketWrapper.init_from_embeddings(smollm.model, 4, 4, seed=3, model_name="smollm2-135m")


def store_of(smollm, tmp_path, tiers, packet_dtype="model", **kw) -> PacketStore:
    model, tokenizer = smollm.model, smollm.tokenizer
    directory = tmp_path / "packets" if "disk" in tiers else None
    return PacketStore(model, tokenizer, "smollm2-135m", directory=directory, tiers=tiers,
                       packet_dtype=packet_dtype, **kw)


def assert_same_packet(a, b):
    assert (a.n_header, a.n_doc, a.n_trailer, a.span) == (b.n_header, b.n_doc, b.n_trailer, b.span)
    assert torch.equal(a.doc_ids, b.doc_ids)
    for x, y in [(a.kv.keys, b.kv.keys), (a.kv.values, b.kv.values), *zip(a.scales or (), b.scales or ())]:
        assert x.dtype == y.dtype and torch.equal(x.cpu().view(torch.uint8), y.cpu().view(torch.uint8))


@pytest.mark.parametrize("packet_dtype", ["model", "fp8", "int8"])
def test_every_tier_returns_the_packet_built_in_memory(smollm, wrapper, tmp_path, packet_dtype):
    model, tokenizer = smollm.model, smollm.tokenizer
    want = build_packet(model, tokenizer, DOCS[0], wrapper).compacted(packet_dtype)
    for tiers in [("gpu",), ("host",), ("disk",)]:
        store = store_of(smollm, tmp_path, tiers, packet_dtype)
        got = store.get(DOCS[0], wrapper)
        assert_same_packet(got, want)
        assert store.tier_of(DOCS[0], wrapper) == tiers[0] and store.get(DOCS[0], wrapper) is got
        assert store.nbytes(tiers[0]) == want.nbytes
    # the disk tier persists: a new store maps the file instead of encoding again
    again = store_of(smollm, tmp_path, ("disk",), packet_dtype)
    assert_same_packet(again.get(DOCS[0], wrapper), want)
    assert again.n_encoded == 0
    again.drop_page_cache()  # pages dropped, data intact: the next read comes from the file
    assert_same_packet(again.get(DOCS[0], wrapper), want)
    # a compact and a full-precision packet of the same document are stored apart
    if packet_dtype != "model":
        plain = store_of(smollm, tmp_path, ("disk",))
        assert plain.get(DOCS[0], wrapper).scales is None and plain.n_encoded == 1


def test_lru_moves_packets_down_the_tiers_and_refuses_an_oversized_one(smollm, wrapper, tmp_path):
    model, tokenizer = smollm.model, smollm.tokenizer
    sizes = [build_packet(model, tokenizer, d, wrapper).nbytes for d in DOCS]
    store = store_of(smollm, tmp_path, ("gpu", "host", "disk"),
                     max_bytes={"gpu": max(sizes) + 1, "host": sizes[0] + sizes[1]})
    for doc in DOCS:
        store.get(doc, wrapper)
    # gpu holds the last packet; host the two before it; every packet is on disk
    assert [store.tier_of(d, wrapper) for d in DOCS] == ["host", "host", "gpu"]
    assert store.nbytes("gpu") <= max(sizes) + 1 and store.nbytes("host") <= sizes[0] + sizes[1]
    assert len(list((tmp_path / "packets").rglob("*.safetensors"))) == 3
    store.get(DOCS[0], wrapper)  # a hit lower down moves the packet up again
    assert store.tier_of(DOCS[0], wrapper) == "gpu" and store.n_encoded == 3
    small = store_of(smollm, tmp_path, ("gpu",), max_bytes={"gpu": sizes[0] - 1})
    with pytest.raises(ValueError, match=r"larger than the 'gpu' tier.*raise that bound"):
        small.get(DOCS[0], wrapper)
    with pytest.raises(ValueError, match="disk tier needs a directory"):
        PacketStore(model, tokenizer, "smollm2-135m", tiers=("host", "disk"))
    with pytest.raises(ValueError, match="fastest first"):
        PacketStore(model, tokenizer, "smollm2-135m", tiers=("host", "gpu"))
    with pytest.raises(ValueError, match="packet_dtype='bf8'"):
        PacketStore(model, tokenizer, "smollm2-135m", packet_dtype="bf8")


@pytest.mark.parametrize("packet_dtype", ["fp8", "int8"])
def test_compact_round_trip_is_within_the_rounding_bound(packet_dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 16, generator=gen) * torch.logspace(-3, 2, 16)  # wide channel range
    x[0, 0, :, 5] = 0.0  # an all-zero channel keeps scale 1 and decodes to zeros
    q, scale = quantize(x, packet_dtype)
    assert scale.shape == (2, 3, 1, 16) and q.dtype == {"fp8": torch.float8_e4m3fn,
                                                         "int8": torch.int8}[packet_dtype]
    err = (dequantize(q, scale, torch.float32) - x).abs()
    if packet_dtype == "fp8":  # 3 mantissa bits: half an ulp, or half the subnormal step
        bound = torch.maximum(2.0 ** -4 * x.abs(), 2.0 ** -10 * scale)
    else:
        bound = scale / 2
    assert (err <= bound * (1 + 1e-6)).all()
    assert (err > 0).any()  # the bound is not vacuous: rounding happened
    assert not dequantize(q, scale, torch.float32)[0, 0, :, 5].any()


def query(smollm, store, wrapper):
    model, tokenizer = smollm.model, smollm.tokenizer
    ctx = make_context(model, tokenizer, store, "Answer from the documents.", DOCS,
                       "Who studied mathematics?", wrapper)
    return ctx, [store.get(d, wrapper) for d in DOCS]


@pytest.mark.parametrize("packet_dtype", ["model", "fp8"])
def test_pipelined_query_is_the_resident_query_from_every_tier(smollm, wrapper, tmp_path,
                                                               packet_dtype):
    model = smollm.model
    ctx, resident = query(smollm, store_of(smollm, tmp_path, ("gpu",), packet_dtype), wrapper)
    n = ctx.n_preamble + sum(p.kv.length for p in resident) + len(ctx.task_ids)
    ref = KVBuffer.allocate(model, n)
    want, next_pos = fast_query(model, ref, ctx.preamble_kv, resident, ctx.task_ids)
    plain = get_method("kv_packet").prefill(ctx, resident)  # plain path, packets dequantized
    torch.testing.assert_close(want, plain.first_logits, rtol=1e-4, atol=1e-4)
    for tiers in [("gpu",), ("host",), ("disk",)]:
        _, packets = query(smollm, store_of(smollm, tmp_path, tiers, packet_dtype), wrapper)
        staging = Staging.allocate(model, packets, depth=2)  # a ring shorter than the model
        for _ in range(2):  # the staging ring is reused by the next query
            buf = KVBuffer.allocate(model, n)
            got, pos = pipelined_query(model, buf, ctx.preamble_kv, packets, ctx.task_ids,
                                       staging=staging)
            assert pos == next_pos and torch.equal(got, want), tiers
            assert torch.equal(buf.keys, ref.keys) and torch.equal(buf.values, ref.values)
    with pytest.raises(ValueError, match="use pipelined_query"):
        assemble_into(model, ref, ctx.preamble_kv, [p.placed("meta") for p in resident])


@pytest.mark.parametrize("packet_dtype", ["model", "fp8"])
@pytest.mark.parametrize("layers_per_copy", [1, 4, 30, 64])
def test_transfer_lands_every_layer_of_every_packet_in_its_slot(smollm, wrapper, tmp_path,
                                                                packet_dtype, layers_per_copy):
    """The copies of the host and disk tiers (synchronous here, on a side stream on CUDA): one per
    layer, or groups of layers per copy (4 does not divide the 30 layers; 30 and 64 move each
    tensor of a packet in one copy), put layer l of packet j in the staging's slot l."""
    model = smollm.model
    _, packets = query(smollm, store_of(smollm, tmp_path, ("host",), packet_dtype), wrapper)
    n_layers = model.config.num_hidden_layers
    staging = Staging.allocate(model, packets, depth=n_layers)
    transfer = _Transfer(staging, packets, n_layers, layers_per_copy=layers_per_copy)
    transfer.start()
    for layer in range(n_layers):
        chunks, scales = transfer.chunks(layer)
        for p, chunk, scale in zip(packets, chunks, scales, strict=True):
            assert torch.equal(chunk.keys, p.kv.keys[layer:layer + 1])
            assert torch.equal(chunk.values, p.kv.values[layer:layer + 1])
            if p.scales is not None:
                assert all(torch.equal(a, b[layer:layer + 1]) for a, b in zip(scale, p.scales))
    if layers_per_copy > 1:
        with pytest.raises(ValueError, match=f"needs a staging of all {n_layers} layers"):
            _Transfer(Staging.allocate(model, packets, depth=2), packets, n_layers,
                      layers_per_copy=layers_per_copy)


@pytest.mark.parametrize("packet_dtype", ["model", "fp8", "int8"])
def test_staged_assembly_is_the_assembly_of_each_staged_packet(smollm, wrapper, tmp_path,
                                                              packet_dtype):
    """The host-tier graph's eager assembly (one batch of ops per layer for every packet) writes,
    bit for bit, what ``write_chunks`` writes chunk by chunk from the same staging slots
    (re-rotated to each packet's offset, compact packets dequantized), and nothing else."""
    model = smollm.model
    ctx, packets = query(smollm, store_of(smollm, tmp_path, ("host",), packet_dtype), wrapper)
    n_layers = model.config.num_hidden_layers
    n = ctx.n_preamble + sum(p.length for p in packets)
    got, want = KVBuffer.allocate(model, n + 2), KVBuffer.allocate(model, n + 2)
    for buf in (got, want):
        buf.keys.fill_(7.0)
        buf.values.fill_(7.0)
    _, slots, offsets, *_, cos, sin = _layout(model, got, ctx.preamble_kv, packets)
    staging = Staging.allocate(model, packets, depth=4)  # a ring: slot l % 4 holds layer l
    transfer = _Transfer(staging, packets, n_layers)
    transfer.start()
    staged = StagedAssembly.build(staging, got, slots[1:], offsets[1:], cos, sin)
    assert len(set(offsets[1:])) == len(packets) > 1  # every packet its own rotation
    for layer in range(n_layers):
        transfer.wait(layer)
        staged(staging, got, layer)
        chunks, scales = transfer.chunks(layer)
        write_chunks(want.keys[layer:layer + 1], want.values[layer:layer + 1], chunks, scales,
                     slots[1:], offsets[1:], cos, sin, fused=False)
        transfer.release(layer)
    assert torch.equal(got.keys, want.keys)
    assert torch.equal(got.values, want.values)
    assert (got.keys[:, :, :ctx.n_preamble] == 7).all() and (got.keys[:, :, n:] == 7).all()


@needs_triton
@pytest.mark.parametrize("packet_dtype", ["model", "fp8"])
def test_planned_assembly_launches_follow_the_packets_staged_at_their_addresses(packet_dtype):
    """The host graph's Triton assembly: one launch per layer planned once over the staging
    (``plan_assembly``, interpreted on the CPU), run again after another packet set of the same
    shapes was staged, writes that set's resident assembly bit for bit, as a graph replay must."""
    from kvp.bench import IdTokenizer

    model = load_model("arch:llama-3.1-8b", device="cpu", config_overrides=SMALL_LLAMA)[0]
    wrapper = PacketWrapper.init_from_embeddings(model, 4, 4, seed=1, model_name="m")
    gen = torch.Generator().manual_seed(0)
    sets = [[" ".join(map(str, torch.randint(0, 1024, (n,), generator=gen).tolist()))
             for n in (40, 70)] for _ in range(2)]
    store = PacketStore(model, IdTokenizer(), "m", packet_dtype=packet_dtype)
    ctx = make_context(model, IdTokenizer(), store, "5 6 7 8 9", sets[0], "10 11 12", wrapper)
    packets = [[store.get(d, wrapper) for d in docs] for docs in sets]
    n_layers = model.config.num_hidden_layers
    staging = Staging.allocate(model, packets[0], depth=n_layers)
    buf = KVBuffer.allocate(model, ctx.n_preamble + sum(p.length for p in packets[0]))
    chunks, slots, offsets, n_cached, *_, cos, sin = _layout(model, buf, ctx.preamble_kv,
                                                             packets[0])
    launches = staging.plan_assembly(buf, slots[1:], offsets[1:], cos, sin)
    wants = []
    for k in (1, 0):
        want = KVBuffer.allocate(model, buf.capacity)
        assemble_into(model, want, ctx.preamble_kv, packets[k], fused=True)
        buf.keys.zero_()
        buf.values.zero_()
        write_chunks(buf.keys, buf.values, chunks[:1], [None], slots[:1], offsets[:1], cos, sin,
                     fused=True)
        _Transfer(staging, packets[k], n_layers).start()
        for launch in launches:
            launch()
        assert torch.equal(buf.keys, want.keys) and torch.equal(buf.values, want.values)
        wants.append(want.keys)
    assert not torch.equal(wants[0], wants[1])  # the sets differ


@needs_triton
@pytest.mark.parametrize("packet_dtype", ["fp8", "int8"])
def test_fused_compact_assembly_is_the_plain_assembly_of_dequantized_packets(tmp_path,
                                                                            packet_dtype):
    """The Triton kernel (interpreted on the CPU) dequantizes inside the assembly: its cache is
    the plain path's assembly of the dequantized packets; pipelined from disk it is the same."""
    from kvp.bench import IdTokenizer

    model = load_model("arch:llama-3.1-8b", device="cpu", config_overrides=SMALL_LLAMA)[0]
    wrapper = PacketWrapper.init_from_embeddings(model, 4, 4, seed=1, model_name="m")
    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(map(str, torch.randint(0, 1024, (n,), generator=gen).tolist())) for n in (40, 70)]
    stores = {t: PacketStore(model, IdTokenizer(), "m", tiers=(t,), packet_dtype=packet_dtype,
                             directory=tmp_path if t == "disk" else None) for t in ("gpu", "disk")}
    ctx = make_context(model, IdTokenizer(), stores["gpu"], "5 6 7 8 9", docs, "10 11 12", wrapper)
    packets = [stores["gpu"].get(d, wrapper) for d in docs]
    dequantized = [p.__class__(kv=p.dequantized(model.dtype, "cpu"), doc_ids=p.doc_ids,
                               n_header=p.n_header, n_doc=p.n_doc, n_trailer=p.n_trailer)
                   for p in packets]
    kv, _ = assemble(model, ctx.preamble_kv, dequantized)
    buf = KVBuffer.allocate(model, kv.length + len(ctx.task_ids))
    n_cached, _ = assemble_into(model, buf, ctx.preamble_kv, packets, fused=True)
    torch.testing.assert_close(buf.keys[:, :, :n_cached], kv.keys, rtol=1e-5, atol=1e-5)
    assert torch.equal(buf.values[:, :, :n_cached], kv.values)
    want, _ = fast_query(model, buf, ctx.preamble_kv, packets, ctx.task_ids, fused=True)
    on_disk = [stores["disk"].get(d, wrapper) for d in docs]
    got, _ = pipelined_query(model, KVBuffer.allocate(model, buf.capacity), ctx.preamble_kv,
                             on_disk, ctx.task_ids, fused=True)
    assert torch.equal(got, want)
    # and the compact cache is close to the full-precision one (the rounding is small)
    full = [PacketStore(model, IdTokenizer(), "m").get(d, wrapper) for d in docs]
    exact, _ = assemble(model, ctx.preamble_kv, full)
    assert (kv.values - exact.values).abs().max() <= 0.1 * exact.values.abs().max()
    assert not torch.equal(kv.values, exact.values)


@pytest.mark.gpu
@pytest.mark.parametrize("packet_dtype", ["model", "fp8"])
def test_pipelined_query_on_cuda_is_the_resident_query(packet_dtype, tmp_path):
    """Side-stream copies and events from pinned host memory and from disk give exactly the
    resident step's logits and buffer (fused kernels)."""
    from kvp.bench import IdTokenizer

    model = load_model("arch:llama-3.1-8b", device="cuda", config_overrides=SMALL_LLAMA)[0]
    wrapper = PacketWrapper.init_from_embeddings(model, 8, 8, seed=1, model_name="m")
    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(map(str, torch.randint(0, 1024, (n,), generator=gen).tolist()))
            for n in (300, 500, 200)]
    stores = {t: PacketStore(model, IdTokenizer(), "m", tiers=(t,), packet_dtype=packet_dtype,
                             directory=tmp_path if t == "disk" else None)
              for t in ("gpu", "host", "disk")}
    ctx = make_context(model, IdTokenizer(), stores["gpu"], "5 6 7 8 9", docs, "10 11 12", wrapper)
    resident = [stores["gpu"].get(d, wrapper) for d in docs]
    assert resident[0].kv.keys.is_cuda
    n = ctx.n_preamble + sum(p.kv.length for p in resident) + len(ctx.task_ids)
    ref = KVBuffer.allocate(model, n)
    want, _ = fast_query(model, ref, ctx.preamble_kv, resident, ctx.task_ids, fused=True)
    for tier in ("host", "disk"):
        packets = [stores[tier].get(d, wrapper) for d in docs]
        assert packets[0].kv.keys.device.type == "cpu"
        assert packets[0].kv.keys.is_pinned() == (tier == "host")
        stores[tier].drop_page_cache()
        buf = KVBuffer.allocate(model, n)
        got, _ = pipelined_query(model, buf, ctx.preamble_kv, packets, ctx.task_ids, fused=True,
                                 staging=Staging.allocate(model, packets, depth=2))
        torch.cuda.synchronize()
        assert torch.equal(got, want), tier
        assert torch.equal(buf.keys[:, :, :n - 3], ref.keys[:, :, :n - 3])
        assert torch.equal(buf.values[:, :, :n - 3], ref.values[:, :, :n - 3])
    hosted = [stores["host"].get(d, wrapper) for d in docs]  # two layers per copy (3 layers)
    got, _ = pipelined_query(model, KVBuffer.allocate(model, n), ctx.preamble_kv, hosted,
                             ctx.task_ids, fused=True, layers_per_copy=2)
    torch.cuda.synchronize()
    assert torch.equal(got, want)


def test_pipelined_graph_refuses_a_cpu_buffer(smollm, wrapper, tmp_path):
    ctx, packets = query(smollm, store_of(smollm, tmp_path, ("host",), "model"), wrapper)
    buf = KVBuffer.allocate(smollm.model, 64)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device.*use pipelined_query"):
        PipelinedGraph(smollm.model, buf, ctx.preamble_kv, packets, len(ctx.task_ids))


@pytest.mark.gpu
@pytest.mark.parametrize("fused_assembly", [False, True])
@pytest.mark.parametrize("layers_per_copy", [1, 2])
@pytest.mark.parametrize("packet_dtype", ["model", "fp8"])
def test_pipelined_graph_is_the_resident_query_for_every_packet_set(packet_dtype, layers_per_copy,
                                                                    fused_assembly):
    """One captured graph, replayed for two packet sets of the same shapes from pinned host
    memory, gives each set's resident logits (the copies follow the new addresses), with one
    copy per layer or per group of layers (2 does not divide the 3 layers), the assembly eager
    ops or the Triton kernel."""
    from kvp.bench import IdTokenizer

    model = load_model("arch:llama-3.1-8b", device="cuda", config_overrides=SMALL_LLAMA)[0]
    wrapper = PacketWrapper.init_from_embeddings(model, 8, 8, seed=1, model_name="m")
    gen = torch.Generator().manual_seed(0)
    sets = [[" ".join(map(str, torch.randint(0, 1024, (n,), generator=gen).tolist()))
             for n in (300, 500, 200)] for _ in range(2)]
    stores = {t: PacketStore(model, IdTokenizer(), "m", tiers=(t,), packet_dtype=packet_dtype)
              for t in ("gpu", "host")}
    ctx = make_context(model, IdTokenizer(), stores["gpu"], "5 6 7 8 9", sets[0], "10 11 12",
                       wrapper)
    ids = ctx.task_ids.to("cuda")
    wants, hosted = [], []
    for docs in sets:
        resident = [stores["gpu"].get(d, wrapper) for d in docs]
        n = ctx.n_preamble + sum(p.kv.length for p in resident) + len(ids)
        wants.append(fast_query(model, KVBuffer.allocate(model, n), ctx.preamble_kv, resident,
                                ids, fused=True)[0].clone())
        hosted.append([stores["host"].get(d, wrapper) for d in docs])
        assert hosted[-1][0].kv.keys.is_pinned()
    buf = KVBuffer.allocate(model, n)
    graph = PipelinedGraph(model, buf, ctx.preamble_kv, hosted[0], len(ids), fused=True,
                           layers_per_copy=layers_per_copy, fused_assembly=fused_assembly)
    for k in (1, 0, 1):
        got = graph(hosted[k], ids).clone()
        torch.testing.assert_close(got, wants[k], rtol=1e-3, atol=1e-3)
        assert got.argmax() == wants[k].argmax()
    assert not torch.allclose(wants[0], wants[1], rtol=1e-3, atol=1e-3)  # the sets differ
    with pytest.raises(ValueError, match="do not fit this graph's layout"):
        graph(hosted[0][:2], ids)
