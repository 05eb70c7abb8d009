"""Time-to-first-token benchmark of every reuse method, with memory/FLOP floors (Fig. 3).

Protocol: docs/protocol.md#ttft-timing.

For each model, context length (preamble + documents + prompt tokens) and number of documents, a
synthetic query is built from random token ids (random-weight architectures have no vocabulary)
and each method's timed query step (``Method.prefill``: assembly, any recompute, prompt prefill up
to the first token's logits) is run ``warmup`` times, then repeatedly; the median is reported. KV
Packet is also timed on the optimised path of ``kvp.fast`` (``variant`` "fast": preallocated
buffer, re-rotation on the way into it, lean SDPA prompt step, eager kernels; "fast+graph": the
prompt step as a CUDA graph; "fast+graph+fused": also the one-launch Triton assembly, fused
q/k/v and gate/up GEMMs, compiled element-wise kernels and the split-KV Triton attention), whose
first-token logits are compared with the plain path's in the same run. ``assembly_ms`` times the
assembly alone; ``rotation_ms`` is what re-rotation adds to it: the assembly minus the same copies
without rotation.

Floors: ``floor_mem_ms`` = (weights read once + the method's cached KV) / measured device
bandwidth (a large device-to-device copy); ``floor_flops_ms`` = analytic FLOPs / measured bf16
matmul throughput; ``floor_ms`` = the larger. Everything is measured in one process on one device.

CLI::

    python -m kvp.bench run --model arch:llama-3.1-8b --model arch:qwen3-4b --out data/benchmarks
    python -m kvp.bench summary data/benchmarks/ttft_*.csv
    python -m kvp.bench plot data/benchmarks/ttft_*.csv --out data/benchmarks/ttft.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kvp import kernels
from kvp.cache import chunk_offsets
from kvp.query_step import (FusedProjections, KVBuffer, PromptGraph, Staging, assemble_into,
                             fast_query, pipelined_query)
from kvp.generate import timer
from kvp.methods import get_method, make_context
from kvp.methods.base import QueryContext
from kvp.packet import PacketStore, PacketWrapper, assemble

DEFAULT_METHODS: tuple[tuple[str, dict], ...] = (
    ("full_recompute", {}), ("no_recompute", {}), ("kv_packet", {}),
    ("cache_blend", {"ratio": 0.15}), ("cache_blend", {"ratio": 0.5}), ("epic", {"n_tokens": 32}),
    ("a3", {"ratio": 0.15}), ("sam_kv", {}),
)
FAST_VARIANTS = ("fast", "fast+graph", "fast+graph+fused")
COLUMNS = ["device", "model", "method", "setting", "variant", "label", "context_tokens", "n_docs",
           "cached_tokens", "prompt_tokens", "ttft_ms", "ttft_p10_ms", "ttft_p90_ms", "n_runs",
           "floor_ms", "floor_mem_ms", "floor_flops_ms", "ttft_over_floor", "flops", "bytes_min",
           "peak_mem_bytes", "assembly_ms", "assembly_share", "rotation_ms", "rotation_share",
           "max_logit_diff", "top1_agrees",
           "status", "bandwidth_gbs", "matmul_tflops", "dtype", "torch", "transformers", "cuda",
           "date"]


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
    warmup: int = 2
    repeats: int = 20
    min_repeats: int = 3
    max_seconds: float = 2.0
    time_limit_s: float = float("inf")
    seed: int = 0

    def __post_init__(self):
        bad = [v for v in self.variants if v not in FAST_VARIANTS]
        if bad:
            raise ValueError(f"unknown variants {bad}; choose from {FAST_VARIANTS}")
        if self.min_repeats < 1 or self.repeats < self.min_repeats or self.warmup < 0:
            raise ValueError(f"need repeats >= min_repeats >= 1 and warmup >= 0, got "
                             f"repeats={self.repeats}, min_repeats={self.min_repeats}, "
                             f"warmup={self.warmup}")
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
    torch: str = TORCH_VERSION
    transformers: str = ""
    cuda: str = CUDA_VERSION
    date: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"))


def time_runs(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
              min_repeats: int, max_seconds: float) -> list[float]:
    """Device-synchronised wall-clock seconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    budget_start = time.perf_counter()
    while len(times) < repeats and (len(times) < min_repeats
                                    or time.perf_counter() - budget_start < max_seconds):
        with timer(device) as t:
            fn()
        times.append(t.seconds)
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
                matmul_tflops=env.matmul_tflops, dtype=env.dtype, torch=env.torch,
                transformers=env.transformers, cuda=env.cuda, date=env.date)
    rows: list[dict] = []
    plain_packet: dict = {}

    def row(method: str, setting: str, variant: str, times: list[float] | None, flops: float,
            cached: int, status: str = "ok", **extra) -> dict:
        bytes_min = w_bytes + cached * kv_token
        floor_mem = bytes_min / (env.bandwidth_gbs * 1e9) * 1e3
        floor_flops = flops / (env.matmul_tflops * 1e12) * 1e3
        ms = [1e3 * t for t in times] if times else [float("nan")]
        label = method + (f"({setting})" if setting else "") + (f"[{variant}]" if variant != "plain" else "")
        r = dict(base, method=method, setting=setting, variant=variant, label=label,
                 cached_tokens=cached, ttft_ms=float(np.median(ms)),
                 ttft_p10_ms=float(np.percentile(ms, 10)), ttft_p90_ms=float(np.percentile(ms, 90)),
                 n_runs=len(times or []), floor_ms=max(floor_mem, floor_flops), floor_mem_ms=floor_mem,
                 floor_flops_ms=floor_flops, flops=flops, bytes_min=bytes_min,
                 peak_mem_bytes=_peak(device) if times else float("nan"), status=status, **extra)
        r["ttft_over_floor"] = r["ttft_ms"] / r["floor_ms"]
        r["assembly_share"] = r.get("assembly_ms", float("nan")) / r["ttft_ms"]
        r["rotation_share"] = r.get("rotation_ms", float("nan")) / r["ttft_ms"]
        log(f"  {model_name} ctx={context_tokens} docs={n_docs} {label:32s} "
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
    """KV Packet on ``kvp.fast``: eager ("fast"), with the prompt step as a CUDA graph, and with
    compiled kernels on top ("fast+graph+fused"); the graph variants need CUDA."""
    device = model.device
    rows: list[dict] = []
    for variant in cfg.variants:
        if "graph" in variant and device.type != "cuda":
            continue
        if time.perf_counter() > deadline:
            rows.append(row("kv_packet", "", variant, None, plain["flops"], plain["cached"],
                            "skipped: time limit"))
            continue
        try:
            rows.append(_bench_variant(model, ctx, cfg, plain, variant, row))
        except Exception as err:  # a failing variant (compiler, graph capture, OOM) is recorded
            rows.append(row("kv_packet", "", variant, None, plain["flops"], plain["cached"],
                            f"error: {type(err).__name__}: {str(err).splitlines()[0][:80]}"))
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


def _bench_variant(model, ctx: QueryContext, cfg: BenchConfig, plain: dict, variant: str, row) -> dict:
    device, packets, n_task = model.device, plain["packets"], len(ctx.task_ids)
    fused = variant.endswith("+fused")
    _free(device)
    _peak_reset(device)
    buf = KVBuffer.allocate(model, plain["cached"] + n_task)
    if variant == "fast":
        def step():
            return fast_query(model, buf, ctx.preamble_kv, packets, ctx.task_ids, fused)[0]
    else:
        n_cached, start = assemble_into(model, buf, ctx.preamble_kv, packets, fused)
        graph = PromptGraph(model, buf, n_cached, n_task, start, fused)

        def step():
            ids = ctx.task_ids.to(device)
            assemble_into(model, buf, ctx.preamble_kv, packets, fused)
            return graph(ids)
    logits = step().float()
    diff = float((logits - plain["logits"]).abs().max())
    agree = bool(logits.argmax() == plain["logits"].argmax())
    times = time_runs(step, device, cfg.warmup, cfg.repeats, cfg.min_repeats, cfg.max_seconds)

    def median_ms(fn) -> float:
        return 1e3 * statistics.median(time_runs(fn, device, 1, cfg.repeats, cfg.min_repeats,
                                                 cfg.max_seconds))

    assembly = median_ms(lambda: assemble_into(model, buf, ctx.preamble_kv, packets, fused))
    copies = median_ms(lambda: copy_chunks(buf, [ctx.preamble_kv] + [p.kv for p in packets], fused))
    return row("kv_packet", "", variant, times, plain["flops"], plain["cached"],
               assembly_ms=assembly, rotation_ms=assembly - copies, max_logit_diff=diff,
               top1_agrees=agree)


def bench_model(model, model_name: str, cfg: BenchConfig, env: Environment,
                deadline: float = float("inf"), csv_path: Path | None = None,
                previous: list[dict] | None = None, log=print) -> list[dict]:
    """Every configuration of ``cfg`` for one loaded model; rows appended to ``previous`` and, if
    ``csv_path`` is given, the CSV rewritten after each configuration (partial runs keep data)."""
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


def environment(device: torch.device, dtype: torch.dtype) -> Environment:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    bandwidth, tflops = measure_device(device, dtype)
    return Environment(name, str(dtype).removeprefix("torch."), bandwidth, tflops,
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


def summary(df: pd.DataFrame, context_tokens: int = 8192, n_docs: int = 8) -> pd.DataFrame:
    """Per (device, model) at one configuration: KV Packet's speed-up over full recompute, its time
    over its floor, the shares of assembly and of re-rotation, and whether it beats every recompute
    baseline at every measured configuration. KV Packet is its most optimised variant measured
    (the first of ``PACKET_LABELS`` present)."""
    out = []
    ok = df[df["status"] == "ok"]
    for (device, model), g in ok.groupby(["device", "model"]):
        labels = set(g["label"])
        packet = next((label for label in PACKET_LABELS if label in labels), "kv_packet")
        at = g[(g["context_tokens"] == context_tokens) & (g["n_docs"] == n_docs)].set_index("label")
        if packet not in at.index or "full_recompute" not in at.index:
            continue
        kp, full = at.loc[packet], at.loc["full_recompute"]
        recompute = g[~g["method"].isin(["kv_packet", "no_recompute", "no_cache"])]
        best = recompute.groupby(["context_tokens", "n_docs"])["ttft_ms"].min()
        mine = g[g["label"] == packet].set_index(["context_tokens", "n_docs"])["ttft_ms"]
        common = best.index.intersection(mine.index)
        out.append(dict(device=device, model=model, packet=packet, context_tokens=context_tokens,
                        n_docs=n_docs, packet_ms=kp["ttft_ms"], full_recompute_ms=full["ttft_ms"],
                        speedup_vs_full=full["ttft_ms"] / kp["ttft_ms"],
                        over_floor=kp["ttft_over_floor"], assembly_share=kp["assembly_share"],
                        rotation_share=kp.get("rotation_share", float("nan")),
                        beats_all_recompute=bool((mine[common] < best[common]).all()),
                        configs_compared=len(common)))
    return pd.DataFrame(out)


def plot_latency(df: pd.DataFrame, model: str | None = None, n_docs: int | None = None, ax=None):
    """TTFT (median, log-log) against context length, one line per method label, the KV Packet
    floor dashed. Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt

    from kvp.plots import line_style, method_style

    ok = df[df["status"] == "ok"]
    model = model or ok["model"].iloc[0]
    ok = ok[ok["model"] == model]
    ok = ok.assign(setting=ok["setting"].fillna("") if "setting" in ok else "")
    n_docs = n_docs if n_docs is not None else int(ok["n_docs"].mode().iloc[0])
    ok = ok[ok["n_docs"] == n_docs].sort_values("context_tokens")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    for label, g in ok.groupby("label", sort=False):
        style = method_style(g["method"].iloc[0])
        ax.plot(g["context_tokens"], g["ttft_ms"], marker=style.marker, color=style.color,
                linestyle=line_style(g["variant"].iloc[0], g["setting"].iloc[0]), label=label)
    floor = ok[ok["label"] == "kv_packet"]
    ax.plot(floor["context_tokens"], floor["floor_ms"], color="black", linestyle="--",
            label="KV Packet floor")
    ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="TTFT (ms, median)",
           title=f"{model}, {n_docs} documents, {ok['device'].iloc[0]}")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    return ax


# --------------------------------------------------------------------------- command line
def run(args) -> Path:
    from kvp.models import load_model, resolve_device, resolve_dtype

    start = time.perf_counter()
    deadline = start + args.time_limit
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    env = environment(device, dtype)
    print(f"{env.device}: copy {env.bandwidth_gbs:.0f} GB/s, matmul {env.matmul_tflops:.0f} TFLOP/s "
          f"({env.dtype}); torch {env.torch}, transformers {env.transformers}, CUDA {env.cuda}",
          flush=True)
    slug = env.device.split("(")[0].strip().lower().replace(" ", "-")
    path = Path(args.out) / f"ttft_{slug}_{env.date}.csv"
    rows: list[dict] = []
    for name in args.model:
        overrides = dict(num_hidden_layers=args.layers) if args.layers else None
        model, _, _ = load_model(name, device=device, dtype=dtype, config_overrides=overrides)
        cfg = BenchConfig(context_tokens=tuple(args.contexts), n_docs=tuple(args.n_docs),
                          n_docs_default=args.n_docs_default, n_docs_context=args.n_docs_context,
                          repeats=args.repeats, max_seconds=args.max_seconds)
        model_deadline = min(deadline, time.perf_counter() + args.model_time_limit)
        rows = bench_model(model, name, cfg, env, model_deadline, path, rows,
                           log=lambda s: print(s, flush=True))
        model = None
        _free(device)
    df = write_csv(rows, path)
    print(f"wrote {path} ({len(df)} rows) in {time.perf_counter() - start:.0f} s")
    return path


def _read(paths: list[str]) -> pd.DataFrame:
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def main(argv: list[str] | None = None) -> None:
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
        df = _read(args.csv)
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(summary(df, args.context, args.n_docs).to_string(index=False))
            print(loglog_slopes(df).to_string(index=False))
    else:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        df = _read(args.csv)
        models = list(dict.fromkeys(df["model"]))
        fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.8), squeeze=False)
        for model, ax in zip(models, axes[0]):
            plot_latency(df, model, ax=ax)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=150, bbox_inches="tight")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
