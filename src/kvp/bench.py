"""Time-to-first-token benchmark of every reuse method, with memory/FLOP floors (Fig. 3).

Protocol: docs/protocol.md#ttft-timing.

For each model, context length (preamble + documents + prompt tokens) and number of documents, a
synthetic query is built from random token ids (random-weight architectures have no vocabulary)
and each method's timed query step (``Method.prefill``: assembly, any recompute, prompt prefill up
to the first token's logits) is run ``warmup`` times, then repeatedly; the median is reported. KV
Packet is also timed on the optimised path of ``kvp.query_step`` (``variant`` "fast": preallocated
buffer, re-rotation on the way into it, lean SDPA prompt step, eager kernels; "fast+graph": the
prompt step as a CUDA graph; "fast+graph+fused": also the one-launch Triton assembly, fused
q/k/v and gate/up GEMMs, compiled element-wise kernels and the split-KV Triton attention), whose
first-token logits are compared with the plain path's in the same run. ``assembly_ms`` times the
assembly alone; ``rotation_ms`` is what re-rotation adds to it: the assembly minus the same copies
without rotation. With ``tiers`` / ``packet_dtypes`` beyond ("gpu", "model"), KV Packet is also
timed with its packets in another tier (``tier``: "host" = pinned host memory, "disk" = memory-
mapped files whose cached pages are dropped before every run; variant "pipelined+fused",
``kvp.query_step.pipelined_query``) and stored as ``packet_dtype`` fp8 / int8; ``issue_ms`` is
the host's time until such a step returned, before the device finished (close to ``ttft_ms``: the
step is bound by the host).

Floors: ``floor_mem_ms`` = (weights read once + the method's cached KV) / measured device
bandwidth (a large device-to-device copy); ``floor_flops_ms`` = analytic FLOPs / measured bf16
matmul throughput (for a recompute baseline: its own compute floor); ``floor_transfer_ms`` = the
bytes the packets move over their slowest link / that link's bandwidth (``h2d_gbs``: pinned host →
device; ``disk_gbs``: disk read into pinned memory); ``floor_ms`` = the larger of the first two
plus the third. Everything is measured in one process on one device.

CLI::

    python -m kvp.bench run --model arch:llama-3.1-8b --model arch:qwen3-4b --out data/benchmarks
    python -m kvp.bench run --model arch:llama-3.1-8b --tiers gpu,host,disk --packet-dtypes bf16,fp8
    python -m kvp.bench summary data/benchmarks/ttft_*.csv
    python -m kvp.bench plot data/benchmarks/ttft_*.csv --out data/benchmarks/ttft.png
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import mmap
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kvp import kernels
from kvp.cache import chunk_offsets
from kvp.compact import PACKET_DTYPES
from kvp.generate import timer
from kvp.methods import get_method, make_context
from kvp.methods.base import QueryContext
from kvp.models import load_model, resolve_device, resolve_dtype
from kvp.packet import TIERS, PacketStore, PacketWrapper, assemble
from kvp.query_step import (FusedProjections, KVBuffer, PipelinedGraph, PromptGraph, Staging,
                             assemble_into, fast_query, pipelined_query)

DEFAULT_METHODS: tuple[tuple[str, dict], ...] = (
    ("full_recompute", {}), ("no_recompute", {}), ("kv_packet", {}),
    ("cache_blend", {"ratio": 0.15}), ("cache_blend", {"ratio": 0.5}), ("epic", {"n_tokens": 32}),
    ("a3", {"ratio": 0.15}), ("sam_kv", {}),
)
FAST_VARIANTS = ("fast", "fast+graph", "fast+graph+fused")
TIER_VARIANTS = ("pipelined", "pipelined+fused")  # packets in host memory or on disk
# The host tier's step as one CUDA graph (kvp.query_step.PipelinedGraph), timed with --host-graph.
HOST_GRAPH_VARIANT = "pipelined+graph+fused"
COLUMNS = ["device", "model", "method", "setting", "variant", "tier", "packet_dtype", "label",
           "context_tokens", "n_docs", "cached_tokens", "prompt_tokens", "ttft_ms", "ttft_p10_ms",
           "ttft_p90_ms", "n_runs", "floor_ms", "floor_mem_ms", "floor_flops_ms",
           "floor_transfer_ms", "ttft_over_floor", "flops", "bytes_min", "transfer_bytes", "link",
           "peak_mem_bytes", "assembly_ms", "assembly_share", "rotation_ms", "rotation_share",
           "max_logit_diff", "top1_agrees", "issue_ms",
           "status", "bandwidth_gbs", "matmul_tflops", "h2d_gbs", "disk_gbs", "dtype", "torch",
           "transformers", "cuda", "date"]


TORCH_VERSION, CUDA_VERSION = torch.__version__, str(torch.version.cuda)


class IdTokenizer:
    """A stand-in tokenizer whose texts are space-separated token ids ("17 2093 5")."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Context lengths are swept at ``n_docs_default`` documents; the document
    counts at ``n_docs_context`` tokens. Each (configuration, method) is run ``warmup`` times, then
    until ``repeats`` runs or ``max_seconds`` (but at least ``min_repeats``)."""

    context_tokens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
    n_docs: tuple[int, ...] = (2, 4, 8, 16, 32)
    n_docs_default: int = 8
    n_docs_context: int = 8192
    preamble_tokens: int = 32
    prompt_tokens: int = 32
    wrapper_tokens: tuple[int, int] = (8, 8)
    methods: tuple[tuple[str, dict], ...] = DEFAULT_METHODS
    variants: tuple[str, ...] = FAST_VARIANTS
    tiers: tuple[str, ...] = ("gpu",)
    packet_dtypes: tuple[str, ...] = ("model",)
    packet_dir: str | None = None  # the disk tier's directory (default: a temporary one)
    warmup: int = 2
    repeats: int = 20
    min_repeats: int = 3
    max_seconds: float = 2.0
    time_limit_s: float = float("inf")
    seed: int = 0
    host_graph: bool = False  # also time HOST_GRAPH_VARIANT on the host tier (CUDA only)
    host_graph_layers: tuple[int, ...] = (1,)  # its layers per host → device copy, one row each
    # also time each host-graph row with the Triton assembly (PipelinedGraph(fused_assembly=True))
    host_graph_fused_assembly: bool = False

    def __post_init__(self):
        bad = [v for v in self.variants if v not in FAST_VARIANTS]
        if bad:
            raise ValueError(f"unknown variants {bad}; choose from {FAST_VARIANTS}")
        bad = [t for t in self.tiers if t not in TIERS] + [d for d in self.packet_dtypes
                                                            if d not in PACKET_DTYPES]
        if bad:
            raise ValueError(f"unknown tiers / packet dtypes {bad}; choose tiers from {TIERS} and "
                             f"packet dtypes from {PACKET_DTYPES}")
        if self.min_repeats < 1 or self.repeats < self.min_repeats or self.warmup < 0:
            raise ValueError(f"need repeats >= min_repeats >= 1 and warmup >= 0, got "
                             f"repeats={self.repeats}, min_repeats={self.min_repeats}, "
                             f"warmup={self.warmup}")
        if self.host_graph_fused_assembly and not self.host_graph:
            raise ValueError("host_graph_fused_assembly (--host-graph-fused-assembly) times the "
                             "host graph's Triton assembly: add host_graph=True (--host-graph)")
        smallest = self.preamble_tokens + self.prompt_tokens + max(self.n_docs + (self.n_docs_default,))
        if min(self.context_tokens + (self.n_docs_context,)) < smallest:
            raise ValueError(f"context lengths must leave at least one token per document: the "
                             f"smallest allowed here is {smallest}")

    def grid(self) -> list[tuple[int, int]]:
        """(context_tokens, n_docs) pairs: the length sweep, then the document-count sweep."""
        pairs = [(c, self.n_docs_default) for c in self.context_tokens]
        pairs += [(self.n_docs_context, n) for n in self.n_docs if (self.n_docs_context, n) not in pairs]
        return pairs


@dataclass
class Environment:
    """The device and software of a run, and its measured bandwidth / matmul throughput."""

    device: str
    dtype: str
    bandwidth_gbs: float
    matmul_tflops: float
    h2d_gbs: float = float("nan")
    disk_gbs: float = float("nan")
    torch: str = TORCH_VERSION
    transformers: str = ""
    cuda: str = CUDA_VERSION
    date: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"))


def time_runs(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
              min_repeats: int, max_seconds: float, setup: Callable[[], object] | None = None,
              issued: list[float] | None = None) -> list[float]:
    """Device-synchronised wall-clock seconds of ``fn()`` after ``warmup`` untimed calls;
    ``setup()`` runs untimed before each call (e.g. dropping the disk tier's cached pages).
    ``issued`` (if given) receives each call's host seconds until ``fn`` returned, before the
    device finished: close to the wall time, the step is bound by the host, not the device."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times: list[float] = []
    budget_start = time.perf_counter()
    while len(times) < repeats and (len(times) < min_repeats
                                    or time.perf_counter() - budget_start < max_seconds):
        if setup is not None:
            setup()
        with timer(device) as t:
            start = time.perf_counter()
            fn()
            host = time.perf_counter() - start
        times.append(t.seconds)
        if issued is not None:
            issued.append(host)
    return times


@torch.no_grad()
def measure_device(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(copy bandwidth GB/s counting read + write, matmul TFLOP/s) of ``device`` in ``dtype``."""
    big = device.type == "cuda"
    n_bytes = (2 << 30) if big else (64 << 20)
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy = time_runs(lambda: dst.copy_(src), device, 3, 20, 5, 2.0)
    del src, dst
    n = 8192 if big else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    mm = time_runs(lambda: a @ b, device, 3, 20, 5, 2.0)
    return 2 * n_bytes / statistics.median(copy) / 1e9, 2 * n**3 / statistics.median(mm) / 1e12


@torch.no_grad()
def measure_links(device: torch.device, directory: Path) -> tuple[float, float]:
    """(host → device GB/s of a page-locked copy, disk GB/s of reading a file into page-locked
    memory with its cached pages dropped first) — the two links packets cross from the host and
    disk tiers, measured as the query step uses them (a CPU device has no host → device link:
    NaN)."""
    cuda = device.type == "cuda"
    n_bytes = (1 << 30) if cuda else (32 << 20)
    host = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=cuda)
    h2d = float("nan")
    if cuda:
        dev = torch.empty(n_bytes, dtype=torch.uint8, device=device)
        runs = time_runs(lambda: dev.copy_(host, non_blocking=True), device, 2, 10, 3, 2.0)
        h2d = n_bytes / statistics.median(runs) / 1e9
        del dev
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".disk-probe-{os.getpid()}.bin"
    try:
        with open(path, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(n_bytes >> 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        fd = os.open(path, os.O_RDONLY)
        mapped = torch.frombuffer(mm, dtype=torch.uint8)

        def drop():
            mm.madvise(mmap.MADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

        runs = time_runs(lambda: host.copy_(mapped), torch.device("cpu"), 1, 3, 3, 10.0, drop)
        del mapped
        os.close(fd)
        disk = n_bytes / statistics.median(runs) / 1e9
    finally:
        path.unlink(missing_ok=True)
    return h2d, disk


def weight_bytes(model) -> int:
    """Bytes of the weights one forward reads: every parameter once, minus the input embedding
    table when it is not also the LM head (a prompt touches only its own rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    if emb is not model.get_output_embeddings().weight:
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize


def synthetic_context(model, model_name: str, context_tokens: int, n_docs: int, cfg: BenchConfig,
                      wrapper: PacketWrapper) -> QueryContext:
    """A query of random token ids: preamble + ``n_docs`` near-equal documents + prompt =
    ``context_tokens`` (KV Packet adds its wrapper tokens on top)."""
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * context_tokens + n_docs)
    vocab = model.config.vocab_size
    doc_budget = context_tokens - cfg.preamble_tokens - cfg.prompt_tokens
    lengths = [doc_budget // n_docs + (i < doc_budget % n_docs) for i in range(n_docs)]

    def text(n: int) -> str:
        return " ".join(map(str, torch.randint(0, vocab, (n,), generator=gen).tolist()))

    tokenizer = IdTokenizer()
    store = PacketStore(model, tokenizer, model_name)
    return make_context(model, tokenizer, store, text(cfg.preamble_tokens),
                        [text(n) for n in lengths], text(cfg.prompt_tokens), wrapper)


def dtype_name(dtype: str) -> str:
    """Short name of a torch dtype name: "bfloat16" → "bf16"."""
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def tier_link(env: Environment, tier: str) -> tuple[str, float]:
    """(the slowest link packets of ``tier`` cross to the device, its measured GB/s): none for
    the gpu tier; host → device for the host tier (host memory itself on a CPU device); for the
    disk tier the slower of the disk read and host → device."""
    if tier == "gpu":
        return "", float("nan")
    pcie = ("pcie", env.h2d_gbs) if env.h2d_gbs == env.h2d_gbs else ("memory", env.bandwidth_gbs)
    if tier == "host":
        return pcie
    return ("disk", env.disk_gbs) if env.disk_gbs <= pcie[1] else pcie


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float:
    return float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan")


def bench_context(model, model_name: str, ctx: QueryContext, cfg: BenchConfig, env: Environment,
                  context_tokens: int, n_docs: int, deadline: float, log=print) -> list[dict]:
    """Rows (one per method / variant) for one synthetic query."""
    device = model.device
    w_bytes, kv_token = weight_bytes(model), kv_bytes_per_token(model)
    base = dict(device=env.device, model=model_name, context_tokens=context_tokens, n_docs=n_docs,
                prompt_tokens=len(ctx.task_ids), bandwidth_gbs=env.bandwidth_gbs,
                matmul_tflops=env.matmul_tflops, h2d_gbs=env.h2d_gbs, disk_gbs=env.disk_gbs,
                dtype=env.dtype, torch=env.torch,
                transformers=env.transformers, cuda=env.cuda, date=env.date)
    rows: list[dict] = []
    plain_packet: dict = {}

    def row(method: str, setting: str, variant: str, times: list[float] | None, flops: float,
            cached: int, status: str = "ok", tier: str = "gpu", packet_dtype: str = "model",
            transfer_bytes: int = 0, **extra) -> dict:
        bytes_min = w_bytes + cached * kv_token
        floor_mem = bytes_min / (env.bandwidth_gbs * 1e9) * 1e3
        floor_flops = flops / (env.matmul_tflops * 1e12) * 1e3
        link, link_gbs = tier_link(env, tier)
        floor_transfer = transfer_bytes / (link_gbs * 1e9) * 1e3 if transfer_bytes else 0.0
        ms = [1e3 * t for t in times] if times else [float("nan")]
        short = dtype_name(env.dtype) if packet_dtype == "model" else packet_dtype
        label = method + (f"({setting})" if setting else "") + (f"[{variant}]" if variant != "plain" else "")
        label += (f"@{tier}" if tier != "gpu" else "") + (f":{short}" if packet_dtype != "model" else "")
        r = dict(base, method=method, setting=setting, variant=variant, tier=tier,
                 packet_dtype=short, label=label, cached_tokens=cached,
                 ttft_ms=float(np.median(ms)), ttft_p10_ms=float(np.percentile(ms, 10)),
                 ttft_p90_ms=float(np.percentile(ms, 90)), n_runs=len(times or []),
                 floor_ms=max(floor_mem, floor_flops) + floor_transfer, floor_mem_ms=floor_mem,
                 floor_flops_ms=floor_flops, floor_transfer_ms=floor_transfer, flops=flops,
                 bytes_min=bytes_min, transfer_bytes=transfer_bytes, link=link,
                 peak_mem_bytes=_peak(device) if times else float("nan"), status=status, **extra)
        r["ttft_over_floor"] = r["ttft_ms"] / r["floor_ms"]
        r["assembly_share"] = r.get("assembly_ms", float("nan")) / r["ttft_ms"]
        r["rotation_share"] = r.get("rotation_ms", float("nan")) / r["ttft_ms"]
        log(f"  {model_name} ctx={context_tokens} docs={n_docs} {label:40s} "
            f"{r['ttft_ms']:9.2f} ms  floor {r['floor_ms']:8.2f} ms  ×{r['ttft_over_floor']:.2f}"
            f"  ({status})")
        return r

    for name, params in cfg.methods:
        method = get_method(name, **params)
        if time.perf_counter() > deadline:
            rows.append(row(name, method.setting, "plain", None, float("nan"), 0, "skipped: time limit"))
            continue
        try:
            prepared = method.prepare(ctx)
            _free(device)
            _peak_reset(device)
            first = method.prefill(ctx, prepared)
            cached, flops = first.next_pos - len(ctx.task_ids), first.flops
            logits = first.first_logits.float()
            del first
            times = time_runs(lambda: method.prefill(ctx, prepared), device, max(cfg.warmup - 1, 0),
                              cfg.repeats, cfg.min_repeats, cfg.max_seconds)
            extra = {}
            if name == "kv_packet":
                asm = time_runs(lambda: assemble(model, ctx.preamble_kv, prepared), device, 1,
                                cfg.repeats, cfg.min_repeats, cfg.max_seconds)
                extra["assembly_ms"] = 1e3 * statistics.median(asm)
                plain_packet = dict(packets=prepared, logits=logits, flops=flops, cached=cached)
            rows.append(row(name, method.setting, "plain", times, flops, cached, **extra))
        except Exception as err:  # recorded, so one failing method does not end the run
            kind = "oom" if isinstance(err, torch.OutOfMemoryError) else f"error: {type(err).__name__}"
            rows.append(row(name, method.setting, "plain", None, float("nan"), 0,
                            f"{kind}: {str(err).splitlines()[0][:80]}"))
        finally:
            prepared = None
            _free(device)
    if plain_packet:
        rows += bench_fast(model, model_name, ctx, cfg, plain_packet, deadline, row)
    return rows


def bench_fast(model, model_name: str, ctx: QueryContext, cfg: BenchConfig, plain: dict,
               deadline: float, row) -> list[dict]:
    """KV Packet on ``kvp.query_step``, packets on the device: eager ("fast"), with the prompt step
    as a CUDA graph, and with fused kernels on top ("fast+graph+fused"; the graph variants need
    CUDA); then each other (tier, packet dtype) of ``cfg``: ``bench_tier``."""
    device = model.device
    rows: list[dict] = []
    jobs = [(variant, "gpu", "model", 1, False) for variant in cfg.variants
            if "graph" not in variant or device.type == "cuda"]
    best = "fast+graph+fused" if device.type == "cuda" else "fast"
    for tier in cfg.tiers:
        for packet_dtype in cfg.packet_dtypes:
            if (tier, packet_dtype) != ("gpu", "model"):
                variant = best if tier == "gpu" else TIER_VARIANTS[device.type == "cuda"]
                jobs.append((variant, tier, packet_dtype, 1, False))
                if tier == "host" and cfg.host_graph:
                    jobs += [(HOST_GRAPH_VARIANT, tier, packet_dtype, k, fused_assembly)
                             for k in cfg.host_graph_layers
                             for fused_assembly in (False, True)[:1 + cfg.host_graph_fused_assembly]]
    for variant, tier, packet_dtype, layers_per_copy, fused_assembly in jobs:
        where = dict(tier=tier, packet_dtype=packet_dtype)
        setting = copy_setting(layers_per_copy, fused_assembly)
        if time.perf_counter() > deadline:
            rows.append(row("kv_packet", setting, variant, None, plain["flops"], plain["cached"],
                            "skipped: time limit", **where))
            continue
        try:
            if tier == "gpu" and packet_dtype == "model":
                rows.append(_bench_variant(model, ctx, cfg, plain, variant, row))
            else:
                rows.append(bench_tier(model, ctx, cfg, plain, variant, tier, packet_dtype, row,
                                       layers_per_copy, fused_assembly))
        except Exception as err:  # a failing variant (compiler, graph capture, OOM) is recorded
            rows.append(row("kv_packet", setting, variant, None, plain["flops"], plain["cached"],
                            f"error: {type(err).__name__}: {str(err).splitlines()[0][:80]}",
                            **where))
        _free(device)
    return rows


def copy_chunks(buf: KVBuffer, chunks: list, fused: bool = False) -> None:
    """The copies ``assemble_into`` makes, without re-rotation (to time what rotation adds);
    ``fused``: the same one-launch kernel with its rotation switched off."""
    slots = chunk_offsets([c.length for c in chunks])
    if fused:
        unused = torch.empty(1, buf.keys.shape[-1], device=buf.keys.device)  # never read
        kernels.assemble(buf.keys, buf.values, chunks, slots, [0] * len(chunks), unused, unused,
                         rotate=False)
        return
    for chunk, slot in zip(chunks, slots):
        buf.keys[:, :, slot:slot + chunk.length].copy_(chunk.keys)
        buf.values[:, :, slot:slot + chunk.length].copy_(chunk.values)


def fused_projections(model, fused: bool):
    """``FusedProjections(model)`` when ``fused`` and the model's projections allow it, else a
    context that yields None."""
    if fused and FusedProjections.supported(model):
        return FusedProjections(model)
    return contextlib.nullcontext()


def _compare(step, plain: dict) -> dict:
    logits = step().float()
    return dict(max_logit_diff=float((logits - plain["logits"]).abs().max()),
                top1_agrees=bool(logits.argmax() == plain["logits"].argmax()))


def _bench_variant(model, ctx: QueryContext, cfg: BenchConfig, plain: dict, variant: str, row) -> dict:
    device, packets, n_task = model.device, plain["packets"], len(ctx.task_ids)
    fused = variant.endswith("+fused")
    _free(device)
    _peak_reset(device)
    buf = KVBuffer.allocate(model, plain["cached"] + n_task)
    with fused_projections(model, fused) as projections:
        if variant == "fast":
            def step():
                return fast_query(model, buf, ctx.preamble_kv, packets, ctx.task_ids, fused,
                                  projections)[0]
        else:
            step = graph_step(model, buf, ctx, packets, fused, projections)
        check = _compare(step, plain)
        times = time_runs(step, device, cfg.warmup, cfg.repeats, cfg.min_repeats, cfg.max_seconds)
        step = None  # frees the captured graph

    def median_ms(fn) -> float:
        return 1e3 * statistics.median(time_runs(fn, device, 1, cfg.repeats, cfg.min_repeats,
                                                 cfg.max_seconds))

    assembly = median_ms(lambda: assemble_into(model, buf, ctx.preamble_kv, packets, fused))
    copies = median_ms(lambda: copy_chunks(buf, [ctx.preamble_kv] + [p.kv for p in packets], fused))
    return row("kv_packet", "", variant, times, plain["flops"], plain["cached"],
               assembly_ms=assembly, rotation_ms=assembly - copies, **check)


def graph_step(model, buf: KVBuffer, ctx: QueryContext, packets, fused: bool, projections):
    """The timed step of the CUDA-graph variants: assemble ``packets`` into ``buf``, then replay
    the prompt step captured once here; returns the step (it holds the graph)."""
    n_cached, start = assemble_into(model, buf, ctx.preamble_kv, packets, fused)
    graph = PromptGraph(model, buf, n_cached, len(ctx.task_ids), start, fused, projections)

    def step():
        ids = ctx.task_ids.to(model.device)
        assemble_into(model, buf, ctx.preamble_kv, packets, fused)
        return graph(ids)
    return step


def copy_setting(layers_per_copy: int, fused_assembly: bool = False) -> str:
    """The ``setting`` of a host-graph row: its layers per copy (when several) and whether its
    assembly was the Triton kernel ("" for one layer per copy, eager assembly)."""
    parts = ([f"layers_per_copy={layers_per_copy}"] * (layers_per_copy > 1)
             + ["fused_assembly"] * fused_assembly)
    return ",".join(parts)


def bench_tier(model, ctx: QueryContext, cfg: BenchConfig, plain: dict, variant: str, tier: str,
               packet_dtype: str, row, layers_per_copy: int = 1,
               fused_assembly: bool = False) -> dict:
    """KV Packet with its packets in ``tier`` as ``packet_dtype``: the gpu tier through the fused
    CUDA-graph step (eager on a CPU), the host and disk tiers through ``pipelined_query`` (or, for
    ``HOST_GRAPH_VARIANT``, ``PipelinedGraph`` moving ``layers_per_copy`` layers per copy, its
    assembly the Triton kernel with ``fused_assembly``); a disk
    run drops the packets' cached pages before every call, so each reads the disk."""
    device, n_task = model.device, len(ctx.task_ids)
    fused = variant.endswith("+fused")
    directory = Path(tempfile.mkdtemp(prefix="packets-", dir=cfg.packet_dir)) if tier == "disk" else None
    try:
        store = PacketStore(model, ctx.tokenizer, "bench", directory=directory, tiers=(tier,),
                            packet_dtype=packet_dtype)
        packets = [store.put(doc, ctx.wrapper, p) for doc, p in zip(ctx.documents, plain["packets"])]
        _free(device)
        _peak_reset(device)
        buf = KVBuffer.allocate(model, plain["cached"] + n_task)
        with fused_projections(model, fused) as projections:
            if tier == "gpu" and "graph" in variant:
                step = graph_step(model, buf, ctx, packets, fused, projections)
            elif tier == "gpu":
                def step():
                    return fast_query(model, buf, ctx.preamble_kv, packets, ctx.task_ids, fused,
                                      projections)[0]
            elif variant == HOST_GRAPH_VARIANT:
                graph = PipelinedGraph(model, buf, ctx.preamble_kv, packets, n_task, fused,
                                       projections, layers_per_copy=layers_per_copy,
                                       fused_assembly=fused_assembly)

                def step():
                    return graph(packets, ctx.task_ids.to(device))
            else:
                staging = Staging.allocate(model, packets)

                def step():
                    return pipelined_query(model, buf, ctx.preamble_kv, packets, ctx.task_ids,
                                           fused, projections, staging)[0]
            setup = store.drop_page_cache if tier == "disk" else None
            check = _compare(step, plain)
            issued: list[float] = []
            times = time_runs(step, device, cfg.warmup, cfg.repeats, cfg.min_repeats,
                              cfg.max_seconds, setup, issued)
            step = staging = graph = None  # frees the captured graphs and the staging slots
        moved = sum(p.nbytes for p in packets) if tier != "gpu" else 0
        return row("kv_packet", copy_setting(layers_per_copy, fused_assembly), variant, times,
                   plain["flops"],
                   plain["cached"], tier=tier,
                   packet_dtype=packet_dtype, transfer_bytes=moved,
                   issue_ms=1e3 * statistics.median(issued), **check)
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def bench_model(model, model_name: str, cfg: BenchConfig, env: Environment,
                deadline: float = float("inf"), csv_path: Path | None = None,
                previous: list[dict] | None = None, log=print) -> list[dict]:
    """Every configuration of ``cfg`` for one loaded model; rows appended to ``previous`` and, if
    ``csv_path`` is given, the CSV rewritten after each configuration (partial runs keep data)."""
    if cfg.host_graph and model.device.type != "cuda":
        raise ValueError(f"host_graph (--host-graph) times a CUDA graph, the model is on "
                         f"{model.device}; drop it or run on a CUDA device")
    rows = list(previous or [])
    h, t = cfg.wrapper_tokens
    wrapper = PacketWrapper.init_from_embeddings(model, h, t, seed=cfg.seed, model_name=model_name)
    limit = getattr(model.config, "max_position_embeddings", None) or float("inf")
    for context_tokens, n_docs in cfg.grid():
        if context_tokens + n_docs * (h + t) > limit:
            log(f"  {model_name}: {context_tokens} tokens exceed its context of {limit}; skipped")
            continue
        ctx = synthetic_context(model, model_name, context_tokens, n_docs, cfg, wrapper)
        rows += bench_context(model, model_name, ctx, cfg, env, context_tokens, n_docs, deadline, log)
        ctx = None
        _free(model.device)
        if csv_path is not None:
            write_csv(rows, csv_path)
    return rows


def write_csv(rows: list[dict], path: Path) -> pd.DataFrame:
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)
    return df


def environment(device: torch.device, dtype: torch.dtype, links_dir: Path | None = None
                ) -> Environment:
    """The device, its measured copy bandwidth and matmul rate, and (``links_dir``: where the disk
    tier lives) the host → device and disk links (``measure_links``)."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    bandwidth, tflops = measure_device(device, dtype)
    h2d, disk = measure_links(device, Path(links_dir)) if links_dir is not None else (float("nan"),) * 2
    return Environment(name, str(dtype).removeprefix("torch."), bandwidth, tflops, h2d, disk,
                       transformers=transformers.__version__)


# --------------------------------------------------------------------------- analysis
def loglog_slopes(df: pd.DataFrame, n_docs: int | None = None) -> pd.DataFrame:
    """Least-squares slope of log(ttft_ms) against log(context_tokens) per (device, model, label),
    over the rows with ``n_docs`` documents (default: the most common count)."""
    ok = df[df["status"] == "ok"]
    n_docs = n_docs if n_docs is not None else int(ok["n_docs"].mode().iloc[0])
    out = []
    for (device, model, label), g in ok[ok["n_docs"] == n_docs].groupby(["device", "model", "label"]):
        if g["context_tokens"].nunique() < 2:
            continue
        slope = np.polyfit(np.log(g["context_tokens"]), np.log(g["ttft_ms"]), 1)[0]
        out.append(dict(device=device, model=model, label=label, slope=float(slope),
                        min_tokens=int(g["context_tokens"].min()),
                        max_tokens=int(g["context_tokens"].max())))
    return pd.DataFrame(out, columns=["device", "model", "label", "slope", "min_tokens", "max_tokens"])


PACKET_LABELS = tuple(f"kv_packet[{v}]" for v in reversed(FAST_VARIANTS)) + ("kv_packet",)
RECOMPUTE_EXCLUDED = ("kv_packet", "no_recompute", "no_cache")  # the rest recompute something


def read_csvs(paths) -> pd.DataFrame:
    """Benchmark CSVs concatenated, with ``tier`` / ``packet_dtype`` filled for files written
    before they existed (every packet then was on the GPU in the model's dtype)."""
    df = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    return with_tiers(df)


def with_tiers(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if "tier" not in df:
        df["tier"] = "gpu"
    if "packet_dtype" not in df:
        df["packet_dtype"] = df["dtype"].map(dtype_name)
    df["tier"] = df["tier"].fillna("gpu")
    df["packet_dtype"] = df["packet_dtype"].fillna(df["dtype"].map(dtype_name))
    return df


def tiered_run(bench: pd.DataFrame) -> pd.DataFrame | None:
    """The rows of the newest committed CSV (by its ``date``; on one date, the ``source`` file
    name sorting last) that has packets in host memory or on disk; None when no CSV has. One
    run's rows only, since times compare only within one CSV."""
    committed = with_tiers(bench[bench["source"] != "this run"])
    tiered = committed[committed["tier"] != "gpu"]
    if not len(tiered):
        return None
    newest = tiered.sort_values(["date", "source"])["source"].iloc[-1]
    return committed[committed["source"] == newest]


def summary(df: pd.DataFrame, context_tokens: int = 8192, n_docs: int = 8) -> pd.DataFrame:
    """Per (device, model) at one configuration: KV Packet's speed-up over full recompute, its time
    over its floor, the shares of assembly and of re-rotation, and whether it beats every recompute
    baseline at every measured configuration, both their measured TTFT and their compute floors
    (their FLOPs at the measured matmul rate). KV Packet is its most optimised variant measured
    on the GPU tier in the model's dtype (the first of ``PACKET_LABELS`` present)."""
    out = []
    df = with_tiers(df)
    ok = df[df["status"] == "ok"]
    for (device, model), g in ok.groupby(["device", "model"]):
        labels = set(g["label"])
        packet = next((label for label in PACKET_LABELS if label in labels), "kv_packet")
        at = g[(g["context_tokens"] == context_tokens) & (g["n_docs"] == n_docs)].set_index("label")
        if packet not in at.index or "full_recompute" not in at.index:
            continue
        kp, full = at.loc[packet], at.loc["full_recompute"]
        recompute = g[~g["method"].isin(RECOMPUTE_EXCLUDED)]
        best = recompute.groupby(["context_tokens", "n_docs"])["ttft_ms"].min()
        best_floor = recompute.groupby(["context_tokens", "n_docs"])["floor_flops_ms"].min()
        mine = g[g["label"] == packet].set_index(["context_tokens", "n_docs"])["ttft_ms"]
        common = best.index.intersection(mine.index)
        out.append(dict(device=device, model=model, packet=packet, context_tokens=context_tokens,
                        n_docs=n_docs, packet_ms=kp["ttft_ms"], full_recompute_ms=full["ttft_ms"],
                        speedup_vs_full=full["ttft_ms"] / kp["ttft_ms"],
                        over_floor=kp["ttft_over_floor"], assembly_share=kp["assembly_share"],
                        rotation_share=kp.get("rotation_share", float("nan")),
                        beats_all_recompute=bool((mine[common] < best[common]).all()),
                        beats_recompute_floors=bool((mine[common] < best_floor[common]).all()),
                        configs_compared=len(common)))
    return pd.DataFrame(out)


def tier_lines(df: pd.DataFrame) -> pd.DataFrame:
    """KV Packet's rows per (tier, packet dtype): on the GPU tier in the model's dtype its most
    optimised variant, elsewhere the one measured, and the host tier's CUDA-graph step
    (``--host-graph``) as a line of its own. Adds ``line`` ("gpu bf16", "host fp8 graph", …)."""
    df = with_tiers(df)
    ok = df[(df["status"] == "ok") & (df["method"] == "kv_packet")]
    keep = []
    for (_, _, tier, dtype), g in ok.groupby(["device", "model", "tier", "packet_dtype"]):
        pick = g
        if tier == "gpu":
            labels = set(g["label"])
            pick = g[g["label"] == next((x for x in PACKET_LABELS if x in labels), g["label"].iloc[0])] \
                if dtype == dtype_name(g["dtype"].iloc[0]) else g
        graph = pick["label"].str.contains(f"[{HOST_GRAPH_VARIANT}]", regex=False)
        name = (f"{tier} {dtype} graph " + pick["setting"].fillna("").astype(str)).str.strip()
        keep.append(pick.assign(line=np.where(graph, name, f"{tier} {dtype}")))
    return pd.concat(keep, ignore_index=True) if keep else ok.assign(line=[])


def crossover_tokens(packet: pd.Series, full: pd.Series) -> float:
    """The context length above which ``packet`` (TTFT by context length) beats ``full``: where
    log(packet / full) changes sign, interpolated in log-log; 0 when it is faster at every
    measured length, inf when at none."""
    common = packet.index.intersection(full.index).sort_values()
    ratio = np.log(packet[common].to_numpy() / full[common].to_numpy())
    if (ratio < 0).all():
        return 0.0
    if (ratio >= 0).all():
        return float("inf")
    last = int(np.nonzero(ratio >= 0)[0].max())  # the longest length where reuse still loses
    if last + 1 >= len(common):
        return float("inf")
    x0, x1 = np.log(common[last]), np.log(common[last + 1])
    r0, r1 = ratio[last], ratio[last + 1]
    return float(np.exp(x0 + (x1 - x0) * r0 / (r0 - r1)))


def tier_summary(df: pd.DataFrame, context_tokens: int = 8192, n_docs: int = 8) -> pd.DataFrame:
    """Per (device, model, tier, packet dtype): KV Packet at one configuration (TTFT, floor and its
    transfer part, time over floor, speed-up over full recompute) and the crossover context
    length against full recompute over the length sweep at ``n_docs`` documents."""
    df = with_tiers(df)
    lines = tier_lines(df)
    ok = df[df["status"] == "ok"]
    out = []
    for (device, model, line), g in lines.groupby(["device", "model", "line"], sort=False):
        full = ok[(ok["device"] == device) & (ok["model"] == model) & (ok["label"] == "full_recompute")
                  & (ok["n_docs"] == n_docs)].set_index("context_tokens")["ttft_ms"]
        sweep = g[g["n_docs"] == n_docs].set_index("context_tokens")["ttft_ms"]
        at = g[(g["context_tokens"] == context_tokens) & (g["n_docs"] == n_docs)]
        if at.empty or context_tokens not in full.index:
            continue
        r = at.iloc[0]
        out.append(dict(device=device, model=model, tier=r["tier"], packet_dtype=r["packet_dtype"],
                        label=r["label"], context_tokens=context_tokens, n_docs=n_docs,
                        packet_ms=r["ttft_ms"], floor_ms=r["floor_ms"],
                        floor_transfer_ms=r.get("floor_transfer_ms", 0.0),
                        over_floor=r["ttft_over_floor"],
                        speedup_vs_full=full[context_tokens] / r["ttft_ms"],
                        crossover_tokens=crossover_tokens(sweep, full)))
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- command line
def run(args) -> Path:
    start = time.perf_counter()
    deadline = start + args.time_limit
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model_dtype = dtype_name(str(dtype).removeprefix("torch."))
    packet_dtypes = tuple(dict.fromkeys("model" if d in ("model", model_dtype) else d
                                        for d in args.packet_dtypes))
    packet_dir = args.packet_dir or args.out
    links = packet_dir if set(args.tiers) - {"gpu"} else None
    env = environment(device, dtype, Path(links) if links else None)
    print(f"{env.device}: copy {env.bandwidth_gbs:.0f} GB/s, matmul {env.matmul_tflops:.0f} TFLOP/s "
          f"({env.dtype}), host→device {env.h2d_gbs:.1f} GB/s, disk {env.disk_gbs:.2f} GB/s; "
          f"torch {env.torch}, transformers {env.transformers}, CUDA {env.cuda}", flush=True)
    slug = env.device.split("(")[0].strip().lower().replace(" ", "-")
    path = Path(args.out) / f"ttft_{slug}_{env.date}.csv"
    rows: list[dict] = []
    for name in args.model:
        overrides = dict(num_hidden_layers=args.layers) if args.layers else None
        model, _, _ = load_model(name, device=device, dtype=dtype, config_overrides=overrides)
        cfg = BenchConfig(context_tokens=tuple(args.contexts), n_docs=tuple(args.n_docs),
                          n_docs_default=args.n_docs_default, n_docs_context=args.n_docs_context,
                          repeats=args.repeats, max_seconds=args.max_seconds,
                          methods=tuple(m for m in DEFAULT_METHODS if m[0] in args.methods),
                          variants=tuple(args.variants), tiers=tuple(args.tiers),
                          packet_dtypes=packet_dtypes, packet_dir=str(packet_dir),
                          host_graph=args.host_graph,
                          host_graph_layers=tuple(args.host_graph_layers),
                          host_graph_fused_assembly=args.host_graph_fused_assembly)
        model_deadline = min(deadline, time.perf_counter() + args.model_time_limit)
        rows = bench_model(model, name, cfg, env, model_deadline, path, rows,
                           log=lambda s: print(s, flush=True))
        model = None
        _free(device)
    df = write_csv(rows, path)
    print(f"wrote {path} ({len(df)} rows) in {time.perf_counter() - start:.0f} s")
    return path


def main(argv: list[str] | None = None, save_figures=None) -> None:
    """``python -m kvp.bench run|summary|plot``; ``save_figures(df, png_path)`` draws the plot
    command's figures and returns their paths (:func:`kvp.plots.save_latency_figures`)."""
    parser = argparse.ArgumentParser(prog="python -m kvp.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="measure and write a CSV")
    r.add_argument("--model", action="append", required=True,
                   help="registry name, repeatable (e.g. arch:llama-3.1-8b)")
    r.add_argument("--out", default="data/benchmarks")
    r.add_argument("--device", default=None)
    r.add_argument("--dtype", default=None)
    r.add_argument("--layers", type=int, default=None, help="override the layer count (arch:* only)")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    r.add_argument("--contexts", type=ints, default=list(BenchConfig.context_tokens))
    r.add_argument("--n-docs", type=ints, default=list(BenchConfig.n_docs))
    r.add_argument("--n-docs-default", type=int, default=BenchConfig.n_docs_default)
    r.add_argument("--n-docs-context", type=int, default=BenchConfig.n_docs_context)
    r.add_argument("--repeats", type=int, default=BenchConfig.repeats)
    r.add_argument("--max-seconds", type=float, default=BenchConfig.max_seconds)
    r.add_argument("--time-limit", type=float, default=float("inf"),
                   help="seconds for the whole run; later measurements are recorded as skipped")
    names = lambda s: s.split(",")  # noqa: E731
    r.add_argument("--methods", type=names, default=list(dict.fromkeys(m for m, _ in DEFAULT_METHODS)),
                   help="comma-separated methods of the default grid to time")
    r.add_argument("--variants", type=names, default=list(FAST_VARIANTS),
                   help=f"KV Packet variants on the GPU tier, of {FAST_VARIANTS}")
    r.add_argument("--tiers", type=names, default=["gpu"],
                   help="where the packets are: gpu,host,disk (host / disk: pipelined query)")
    r.add_argument("--packet-dtypes", type=names, default=["model"],
                   help="packet storage: model (or its dtype, e.g. bf16), fp8, int8")
    r.add_argument("--packet-dir", default=None,
                   help="directory of the disk tier (default: --out); its files are removed")
    r.add_argument("--host-graph", action="store_true",
                   help="also time the host tier as one CUDA graph (PipelinedGraph; CUDA only)")
    r.add_argument("--host-graph-layers", type=int, nargs="+", default=[1], metavar="K",
                   help="layers per host -> device copy in the host graph, one row each "
                   "(default: 1)")
    r.add_argument("--host-graph-fused-assembly", action="store_true",
                   help="time each host-graph row also with the resident step's Triton assembly "
                   "(one launch per layer; PipelinedGraph(fused_assembly=True))")
    r.add_argument("--model-time-limit", type=float, default=float("inf"),
                   help="seconds per model (within --time-limit)")
    s = sub.add_parser("summary", help="key ratios and log-log slopes of CSVs")
    s.add_argument("csv", nargs="+")
    s.add_argument("--context", type=int, default=8192)
    s.add_argument("--n-docs", type=int, default=8)
    p = sub.add_parser("plot", help="TTFT vs context length, one panel per model")
    p.add_argument("csv", nargs="+")
    p.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args)
    elif args.command == "summary":
        df = read_csvs(args.csv)
        with pd.option_context("display.width", 220, "display.max_columns", 20):
            print(summary(df, args.context, args.n_docs).to_string(index=False))
            tiers = tier_summary(df, args.context, args.n_docs)
            if len(tiers):
                print(tiers.to_string(index=False))
            print(loglog_slopes(df).to_string(index=False))
    else:
        if save_figures is None:
            parser.error("the plot command draws with kvp.plots: run it as python -m kvp.bench plot")
        for path in save_figures(read_csvs(args.csv), Path(args.out)):
            print(f"wrote {path}")


if __name__ == "__main__":
    # The plot command draws with kvp.plots, which sits above the benchmark (docs/README.md#layers).
    import matplotlib

    matplotlib.use("Agg")
    from kvp.plots import save_latency_figures

    main(save_figures=save_latency_figures)
