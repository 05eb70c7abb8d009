"""The shared interface of every cache-reuse method (docs/baselines.md).

A method is a dataclass whose fields are its hyper-parameters. ``prepare`` fetches what is built
offline (packets from the ``PacketStore``); ``prefill`` is the timed query step: it assembles the
cache, does whatever recompute the method needs, prefills the task prompt and returns the first
token's logits. ``run_method`` times ``prefill`` (TTFT) and decodes the answer; ``run_methods``
does the same for several methods on one sample, decoding their answers together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import DynamicCache

from kvp.cache import ChunkKV, encode, to_cache
from kvp.flops import Arch, prefill_flops, rerotation_flops
from kvp.generate import (GenerationConfig, Prompted, greedy_decode, greedy_decode_batch,
                          prefill, timer)
from kvp.packet import Packet, PacketStore, PacketWrapper, assemble, check_length, tokenize_document


@dataclass
class QueryContext:
    """One sample, tokenised, with its preamble encoded outside the TTFT timer.

    See docs/method.md#preamble.

    preamble_ids (P,), doc_ids [(n_i,)], task_ids (T,); ``preamble_kv`` keys/values (L, H_kv, P, D).
    """

    model: object
    tokenizer: object
    store: PacketStore
    documents: list[str]
    preamble_ids: torch.Tensor
    doc_ids: list[torch.Tensor]
    task_ids: torch.Tensor
    preamble_kv: ChunkKV
    preamble_seconds: float
    wrapper: PacketWrapper | None = None

    @property
    def arch(self) -> Arch:
        return Arch.from_config(self.model.config)

    @property
    def n_preamble(self) -> int:
        return len(self.preamble_ids)

    @property
    def n_docs_tokens(self) -> int:
        return sum(len(d) for d in self.doc_ids)


def make_context(model, tokenizer, store: PacketStore, preamble: str, documents: list[str],
                 task: str, wrapper: PacketWrapper | None = None) -> QueryContext:
    """Tokenise each segment alone (no special tokens added) and encode the preamble at position 0."""
    if not task or not task.strip():
        raise ValueError("empty question/task prompt: a query needs a question")
    if not documents:
        raise ValueError("no documents: pass at least one document (use method 'no_cache' for none)")

    def ids(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    preamble_ids, task_ids = ids(preamble), ids(task)
    doc_ids = [tokenize_document(tokenizer, d) for d in documents]
    h_t = wrapper.h + wrapper.t if wrapper is not None else 0
    total = len(preamble_ids) + sum(len(d) + h_t for d in doc_ids) + len(task_ids)
    check_length(model, total, "the assembled context (preamble + documents + prompt)")
    with timer(model.device) as t:
        preamble_kv = encode(model, input_ids=preamble_ids)
    return QueryContext(model, tokenizer, store, documents, preamble_ids, doc_ids, task_ids,
                        preamble_kv, t.seconds, wrapper)


@dataclass
class Prefilled:
    """The query step's output: cache after the prompt, first logits (V,), next free position.

    ``shared_s``: seconds of query-time work that ``prepare`` did once for several methods (e.g.
    one joint prefill for several presses); ``timed_step`` adds them to this method's TTFT."""

    cache: DynamicCache
    first_logits: torch.Tensor
    next_pos: int
    flops: int
    n_recomputed: int = 0
    shared_s: float = 0.0


@dataclass
class MethodResult:
    """Per-sample report of one method."""

    method: str
    setting: str
    answer: str
    token_ids: list[int]
    ttft_s: float
    preamble_s: float
    flops: int
    n_recomputed: int
    context_tokens: int


@dataclass
class Method:
    """Base class: subclasses are dataclasses whose fields are hyper-parameters."""

    name: ClassVar[str] = "method"

    @property
    def setting(self) -> str:
        """Hyper-parameters as a short string, e.g. ``ratio=0.3`` ('' when there are none)."""
        return ",".join(f"{k}={v}" for k, v in self.__dict__.items() if not k.startswith("_"))

    def packets(self, ctx: QueryContext) -> list[Packet]:
        """Plain (unwrapped) packets of the sample's documents, from the store."""
        return [ctx.store.get(d) for d in ctx.documents]

    def prepare(self, ctx: QueryContext):
        """Offline work outside the timer; by default, the plain packets."""
        return self.packets(ctx)

    def prefill(self, ctx: QueryContext, prepared) -> Prefilled:
        raise NotImplementedError


def prefill_on_assembled(ctx: QueryContext, kv: ChunkKV, flops: int, n_recomputed: int = 0,
                         next_pos: int | None = None) -> Prefilled:
    """Turn an assembled context KV into a cache and prefill the task prompt at ``next_pos``
    (default: right after the cached tokens)."""
    cache = to_cache(kv.keys, kv.values)
    start = next_pos if next_pos is not None else kv.length
    logits = prefill(ctx.model, cache, ctx.task_ids, start)
    flops += prefill_flops(ctx.arch, len(ctx.task_ids), start)
    return Prefilled(cache, logits, start + len(ctx.task_ids), flops, n_recomputed)


def assemble_packets(ctx: QueryContext, packets: list[Packet]) -> tuple[ChunkKV, int, int]:
    """Preamble + re-rotated packets: (kv, FLOPs of the re-rotation, next free position)."""
    kv, next_pos = assemble(ctx.model, ctx.preamble_kv, packets)
    return kv, rerotation_flops(ctx.arch, sum(p.kv.length for p in packets)), next_pos


def timed_step(method: Method, ctx: QueryContext) -> tuple[Prefilled, float]:
    """``method.prefill`` after its untimed ``prepare``: (output, seconds of the query step,
    including the query-time work ``prepare`` shared with other methods, ``out.shared_s``)."""
    prepared = method.prepare(ctx)
    with timer(ctx.model.device) as t:
        out = method.prefill(ctx, prepared)
    return out, t.seconds + out.shared_s


def method_result(method: Method, ctx: QueryContext, out: Prefilled, seconds: float,
                  answer: str, tokens: list[int]) -> MethodResult:
    return MethodResult(method.name, method.setting, answer, tokens, seconds,
                        ctx.preamble_seconds, out.flops, out.n_recomputed, out.next_pos)


def run_method(method: Method, ctx: QueryContext, config: GenerationConfig = GenerationConfig()
               ) -> MethodResult:
    """Time the query step (assembly → first token's logits) and decode the answer greedily."""
    out, seconds = timed_step(method, ctx)
    answer, tokens = greedy_decode(ctx.model, ctx.tokenizer, out.cache, out.first_logits,
                                   out.next_pos, config)
    return method_result(method, ctx, out, seconds, answer, tokens)


def run_methods(methods: list[Method], ctx: QueryContext,
                config: GenerationConfig = GenerationConfig()) -> list[MethodResult]:
    """``run_method`` of every method on ``ctx``: each query step timed alone, one after the other,
    then the answers decoded in one batch per cache length (``greedy_decode_batch``: the same
    tokens as decoding each alone, tests/test_generate.py checks it)."""
    steps = [(method, *timed_step(method, ctx)) for method in methods]
    by_length: dict[int, list[int]] = {}
    for i, (_, out, _) in enumerate(steps):
        by_length.setdefault(out.cache.get_seq_length(), []).append(i)
    decoded = {}
    for indices in by_length.values():
        prompts = [Prompted(steps[i][1].cache, steps[i][1].first_logits, steps[i][1].next_pos)
                   for i in indices]
        decoded.update(zip(indices, greedy_decode_batch(ctx.model, ctx.tokenizer, prompts, config)))
    return [method_result(method, ctx, out, seconds, *decoded[i])
            for i, (method, out, seconds) in enumerate(steps)]
