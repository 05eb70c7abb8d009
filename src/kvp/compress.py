"""KV compression of packets with kvpress presses (docs/protocol.md#compression-figure-4).

Each packet is compressed *as it is built*: the press's context manager is active while
``[header ; document ; trailer]`` is prefilled from position 0, so every layer's cache is pruned right
after its attention ran (kvpress's public ``with press(model): ...`` API, nothing patched). The pruned
packet keeps ``span`` = its uncompressed length: in an assembled context it still occupies all its
positions, the kept keys keep their local rotation, and the usual re-rotation by the packet's offset
stays exact (``kvp.packet.assemble``).

* ``PRESSES`` / ``make_press`` — the presses of Figure 4 by name.
* ``ProtectedPress`` — wraps a scorer press so the first ``n_first`` and last ``n_last`` positions
  (header and trailer) are never pruned.
* ``compress_packet`` — one compressed packet; ``compress_packets`` — a document's packets under
  several presses from one prefill (``PressSet``); ``CompressedStore`` — a ``PacketStore`` of compressed
  packets, so ``kv_packet`` / ``no_recompute`` run unchanged on them.
* ``JointCompressed`` — the baseline: one compressed cache over preamble + all documents.
* ``compression_sweep`` — the tidy table of Figure 4.

Compression ratio = fraction of the KV pairs removed, kvpress's convention: a sequence of ``S``
tokens keeps ``max(1, int(S · (1 - ratio)))`` pairs per layer and KV head (each head keeps its own
positions). Protected tokens count *inside* that budget, as in the paper's reference runs (their
protected and unprotected packets have the same size): protection changes which tokens are kept,
not how many.

Only presses that score positions and prune by top-k (``ScorerPress`` subclasses that keep its
``compress``) are accepted: they leave one shorter cache per layer, all layers of equal length, which
is what a packet stores. Presses with per-layer or per-head budgets (PyramidKV, AdaKV, DuoAttention)
or that move positions (KeyRerotationPress, which would contradict ``span``) are refused.
Kept tokens stay in the order kvpress returns them (by score, not by position); attention over a
cache does not depend on the order of its tokens.

Importing this module imports kvpress, which wraps transformers' attention functions with a
pass-through for models that use no head-wise masking (kvpress's own import-time behaviour).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from kvpress import (BasePress, ExpectedAttentionPress, KeyDiffPress, KnormPress, ScorerPress,
                     SnapKVPress, StreamingLLMPress, TOVAPress)
from kvpress.utils import compute_n_kept
from torch import nn

from kvp.cache import ChunkKV, encode
from kvp.data import Sample
from kvp.data.prompts import build_segments, segment_ids
from kvp.evaluate import EvalSettings, evaluate, method_summary
from kvp.flops import prefill_flops
from kvp.generate import timer
from kvp.methods import Method, Prefilled, QueryContext, get_method
from kvp.methods.base import prefill_on_assembled
from kvp.packet import Packet, PacketStore, PacketWrapper, build_packet, tokenize_document

PRESSES: dict[str, type[ScorerPress]] = {
    "expected_attention": ExpectedAttentionPress,
    "snapkv": SnapKVPress,
    "knorm": KnormPress,
    "streaming_llm": StreamingLLMPress,
    "tova": TOVAPress,
    "keydiff": KeyDiffPress,
}
VARIANTS = ("packet", "packet_protected", "joint")


def make_press(name: str, compression_ratio: float, **params) -> ScorerPress:
    """A press of ``PRESSES`` by name, e.g. ``make_press("snapkv", 0.3, window_size=16)``."""
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; choose one of {', '.join(PRESSES)} (or pass "
                         "any ScorerPress instance)")
    return PRESSES[name](compression_ratio=compression_ratio, **params)


def check_press(press: BasePress) -> None:
    """Refuse presses whose result is not one equally shortened cache per layer (module docstring)."""
    if isinstance(press, ProtectedPress):
        return
    if not isinstance(press, ScorerPress) or type(press).compress is not ScorerPress.compress:
        raise ValueError(f"{type(press).__name__} is not supported: packets need a press that "
                         "scores positions and prunes the same number per layer (a ScorerPress "
                         f"without its own compress), e.g. one of {', '.join(PRESSES)}")


def min_tokens(press: BasePress) -> int:
    """Fewest tokens a sequence needs for ``press`` to score it.

    SnapKV needs more tokens than its observation ``window_size``; ExpectedAttention and
    StreamingLLM more than their ``n_sink`` sink tokens (ExpectedAttention's query statistics come
    from the tokens after the sinks); protection needs room for the protected tokens in the budget.
    """
    inner = press.press if isinstance(press, ProtectedPress) else press
    need = max(getattr(inner, "window_size", 0), getattr(inner, "n_sink", 0)) + 1
    if isinstance(press, ProtectedPress):
        n_protected = press.n_first + press.n_last
        while compute_n_kept(need, press.compression_ratio) < n_protected:
            need += 1
    return need


@dataclass
class ProtectedPress(BasePress):
    """A scorer press whose first ``n_first`` and last ``n_last`` positions are never pruned.

    ``score`` is the wrapped press's score with the protected positions raised to +inf, so
    kvpress's own top-k (``ScorerPress.compress``) keeps them; the budget is the wrapped press's
    ``compression_ratio`` over all positions, protected ones included.

    StreamingLLM scores by position only (the ``n_pruned`` tokens after its ``n_sink`` sinks are
    evicted); raising the header to +inf would leave the choice among its remaining equal scores
    to top-k tie-breaking. For it, protecting the first ``n_first`` tokens is done as what it
    means: ``n_sink = max(n_sink, n_first)``, the evicted window starts after the header. The
    trailer is the most recent window, which StreamingLLM keeps anyway.
    """

    press: ScorerPress
    n_first: int = 0
    n_last: int = 0

    def __post_init__(self):
        check_press(self.press)
        if self.n_first < 0 or self.n_last < 0:
            raise ValueError(f"n_first={self.n_first}, n_last={self.n_last}: the numbers of "
                             "protected positions must be >= 0")

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    def post_init_from_model(self, model) -> None:
        self.press.post_init_from_model(model)

    def score(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, attentions: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
        """Scores (B, H_kv, S) of the wrapped press, +inf at the protected positions.

        keys/values (B, H_kv, S, D), hidden_states (B, S, d_model), as kvpress passes them.
        """
        k_len = keys.shape[2]
        n_kept = compute_n_kept(k_len, self.compression_ratio)
        if self.n_first + self.n_last > n_kept:
            raise ValueError(f"cannot protect {self.n_first}+{self.n_last} positions when only "
                             f"{n_kept} of {k_len} are kept at compression_ratio="
                             f"{self.compression_ratio}; lower the ratio or use longer documents")
        press = self.press
        if isinstance(press, StreamingLLMPress):
            press = replace(press, n_sink=max(press.n_sink, self.n_first))
        scores = press.score(module, hidden_states, keys, values, attentions, kwargs)  # (B, H, S)
        scores[..., :self.n_first] = torch.inf
        scores[..., k_len - self.n_last:] = torch.inf
        return scores

    compress = ScorerPress.compress  # kvpress's top-k pruning, applied to the protected scores


@dataclass
class PressSet(BasePress):
    """Several presses over one prefill: at every layer each press's ``compress`` runs on the
    layer's inputs and its pruned keys/values are kept aside; the cache itself is left whole.

    kvpress prunes a layer's cache in a hook after the layer's attention ran, so the hidden states
    and every layer's keys and values do not depend on the press: each press here sees exactly
    what its own ``with press(model)`` prefill would show it (tests/test_compress.py checks it).
    """

    presses: list[BasePress]

    def __post_init__(self):
        self.kept = [[] for _ in self.presses]  # per press, per layer: (keys, values)

    def post_init_from_model(self, model) -> None:
        for press in self.presses:
            press.post_init_from_model(model)

    def compress(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, attentions: torch.Tensor | None, kwargs: dict
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every press on keys/values (1, H_kv, S, D); return them unchanged."""
        for press, kept in zip(self.presses, self.kept, strict=True):
            kept.append(press.compress(module, hidden_states, keys, values, attentions, kwargs))
        return keys, values

    def chunks(self) -> list[ChunkKV]:
        """Per press, the kept keys/values of every layer stacked: (L, H_kv, n_kept, D)."""
        return [ChunkKV(torch.stack([k[0] for k, _ in layers]), torch.stack([v[0] for _, v in layers]))
                for layers in self.kept]


def compress_packets(model, tokenizer, document: str, presses: Sequence[tuple[BasePress, bool]],
                     wrapper: PacketWrapper | None = None, allow_short: bool = False
                     ) -> list[Packet]:
    """``compress_packet`` of ``document`` under each ``(press, protect_wrapper)``, all from one
    prefill under a :class:`PressSet`.

    See docs/protocol.md#compression-figure-4.
    """
    n_tokens = packet_tokens(tokenizer, document, wrapper)
    applied = [applied_press(press, protect, document, n_tokens, wrapper, allow_short)
               for press, protect in presses]
    bundle = PressSet([p for p in applied if p is not None])
    with bundle(model):
        packet = build_packet(model, tokenizer, document, wrapper)  # the whole cache
    kept = iter(bundle.chunks())
    return [packet if p is None else replace(packet, kv=next(kept), span=n_tokens) for p in applied]


def packet_tokens(tokenizer, document: str, wrapper: PacketWrapper | None) -> int:
    """Tokens of the document's uncompressed packet: h + document + t."""
    h, t = (wrapper.h, wrapper.t) if wrapper is not None else (0, 0)
    return h + len(tokenize_document(tokenizer, document)) + t


def applied_press(press: BasePress, protect_wrapper: bool, document: str, n_tokens: int,
                  wrapper: PacketWrapper | None, allow_short: bool) -> BasePress | None:
    """The press a packet of ``n_tokens`` tokens is built under: ``press``, wrapped in a
    ``ProtectedPress`` with ``protect_wrapper``; None where the packet is shorter than the press
    needs and stays uncompressed (``allow_short``; otherwise ``ValueError``)."""
    check_press(press)
    h, t = (wrapper.h, wrapper.t) if wrapper is not None else (0, 0)
    if protect_wrapper and h + t:
        press = ProtectedPress(press, n_first=h, n_last=t)
    need = min_tokens(press)
    if n_tokens >= need:
        return press
    message = (f"packet of {n_tokens} tokens (h={h} + document + t={t}, document starts "
               f"{document[:40]!r}) is shorter than the {need} tokens {press!r} needs")
    if not allow_short:
        raise ValueError(message + "; use longer documents, a smaller window/sink setting, or "
                         "allow_short=True to keep such packets uncompressed")
    warnings.warn(message + "; kept uncompressed", stacklevel=3)
    return None


def compress_packet(model, tokenizer, document: str, press: BasePress,
                    wrapper: PacketWrapper | None = None, protect_wrapper: bool = False,
                    allow_short: bool = False) -> Packet:
    """Build a packet under ``press``: pruned KV, ``span`` = uncompressed length.

    See docs/protocol.md#compression-figure-4.

    Args:
        press: a scorer press (``PRESSES``) or a ``ProtectedPress``.
        protect_wrapper: keep the wrapper's header and trailer tokens (wraps ``press`` in a
            ``ProtectedPress(press, h, t)``; they count inside the budget).
        allow_short: a packet shorter than the press needs (``min_tokens``) is kept uncompressed
            with a warning instead of raising ``ValueError``.
    Returns:
        Packet with kv (L, H_kv, max(1, int(S·(1-ratio))), D), S = h + n_doc + t, and span = S.
    """
    return compress_packets(model, tokenizer, document, [(press, protect_wrapper)], wrapper,
                            allow_short)[0]


@dataclass
class CompressedStore(PacketStore):
    """A ``PacketStore`` whose packets are built under ``press`` (in memory only).

    ``siblings``: stores (of the same model and tokenizer) whose packets of a document are built
    in the same prefill as this store's (:func:`compress_packets`), when this one builds its own.

    Pass it as ``make_context(..., store=...)``: ``kv_packet`` (``store.get(doc, wrapper)``) and
    ``no_recompute`` (``store.get(doc)``) then run unchanged on compressed packets. Packets are keyed
    by (model, wrapper, press with its parameters, protection, document).
    """

    press: BasePress | None = None
    protect_wrapper: bool = False
    allow_short: bool = False
    kv_lengths: dict = field(default_factory=dict)  # key -> tokens kept, also after eviction
    siblings: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        if self.press is None:
            raise ValueError("CompressedStore needs press=..., e.g. make_press('knorm', 0.3)")
        if self.directory is not None:
            raise ValueError(f"directory={self.directory!r}: compressed packets are kept in memory "
                             "only; use directory=None")
        check_press(self.press)

    def key(self, document: str, wrapper: PacketWrapper | None) -> tuple[str, ...]:
        return (*super().key(document, wrapper), repr(self.press), str(self.protect_wrapper))

    def get(self, document: str, wrapper: PacketWrapper | None = None) -> Packet:
        """The compressed packet, built on first use; beyond ``max_in_memory`` packets the least
        recently used one is dropped (``kv_lengths`` keeps its kept length)."""
        key = self.key(document, wrapper)
        if key not in self._memory:
            group = [self, *(s for s in self.siblings if s is not self
                             and s.key(document, wrapper) not in s._memory)]
            packets = compress_packets(self.model, self.tokenizer, document,
                                       [(s.press, s.protect_wrapper) for s in group], wrapper,
                                       self.allow_short)
            for store, packet in zip(group, packets, strict=True):
                store._keep(store.key(document, wrapper), packet)
        self._memory.move_to_end(key)
        return self._memory[key]

    def _keep(self, key, packet: Packet) -> None:
        self._memory[key], self.kv_lengths[key] = packet, packet.kv.length
        self.n_encoded += 1
        while self.max_in_memory is not None and len(self._memory) > self.max_in_memory:
            self._memory.popitem(last=False)

    def kv_length(self, document: str, wrapper: PacketWrapper | None = None) -> int:
        """Tokens kept in the document's packet. When no ``get`` built it (a sample resumed from
        a checkpoint), counted without building it: the press keeps ``compute_n_kept`` of the
        packet's tokens, as kvpress's top-k pruning does (or all of a packet too short for it)."""
        key = self.key(document, wrapper)
        if key not in self.kv_lengths:
            n = packet_tokens(self.tokenizer, document, wrapper)
            press = applied_press(self.press, self.protect_wrapper, document, n, wrapper,
                                  self.allow_short)
            self.kv_lengths[key] = n if press is None else compute_n_kept(n, press.compression_ratio)
        return self.kv_lengths[key]


@dataclass
class OnStore(Method):
    """``method`` run on the packets of ``store`` (e.g. a ``CompressedStore``) instead of the
    context's store; its name is ``method``'s, its setting ``label`` (default: ``method``'s)."""

    method: Method
    store: PacketStore
    label: str = ""

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def setting(self) -> str:
        return self.label or self.method.setting

    def prepare(self, ctx: QueryContext):
        return self.method.prepare(replace(ctx, store=self.store))

    def prefill(self, ctx: QueryContext, prepared) -> Prefilled:
        return self.method.prefill(replace(ctx, store=self.store), prepared)


def joint_ids(ctx: QueryContext, presses: Sequence[BasePress]) -> torch.Tensor:
    """Preamble and documents (P + n_docs_tokens,), checked long enough for each of ``presses``."""
    ids = torch.cat([ctx.preamble_ids, *ctx.doc_ids])
    for press in presses:
        if len(ids) < min_tokens(press):
            raise ValueError(f"context of {len(ids)} tokens is shorter than the "
                             f"{min_tokens(press)} tokens {press!r} needs")
    return ids


@dataclass
class JointGroup:
    """The joint compressed caches of several presses from one prefill of a context, under a
    :class:`PressSet` (each press keeps what its own prefill would keep). Holds one context's
    caches at a time; ``seconds`` is that prefill's wall time, scoring of every press included."""

    presses: list[BasePress]
    ids: torch.Tensor | None = None
    kept: list[ChunkKV] = field(default_factory=list)
    seconds: float = 0.0

    def prepare(self, ctx: QueryContext) -> None:
        """Prefill ``ctx``'s preamble and documents once for every press (unless done already)."""
        ids = joint_ids(ctx, self.presses)
        if self.ids is not None and torch.equal(ids, self.ids):
            return
        bundle = PressSet(list(self.presses))
        with timer(ctx.model.device) as t, bundle(ctx.model):
            encode(ctx.model, input_ids=ids)  # the whole cache; each press's part is kept aside
        self.ids, self.kept, self.seconds = ids, bundle.chunks(), t.seconds

    def kv(self, press: BasePress) -> ChunkKV:
        """``press``'s kept keys/values (L, H_kv, n_kept, D) of the prepared context."""
        return self.kept[next(i for i, p in enumerate(self.presses) if p is press)]


@dataclass
class JointCompressed(Method):
    """Baseline of Figure 4: one compressed cache over all documents, recomputed per query.

    Preamble and documents are prefilled jointly from position 0 under ``press`` (kvpress compresses
    only a prefill that starts the cache, so the preamble is part of the compressed context, as in
    kvpress's own pipeline); then the task prompt is prefilled after it, uncompressed. FLOPs count
    that whole prefill; ``n_recomputed`` the document tokens.

    With a ``JointGroup`` (``_group``, which holds this ``press``) the joint prefill runs once for
    all the group's presses, in ``prepare``; its time is added to each member's TTFT.
    """

    name = "joint_compressed"
    press: BasePress
    _group: JointGroup | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        check_press(self.press)

    def prepare(self, ctx: QueryContext):
        if self._group is not None:
            self._group.prepare(ctx)
        return None

    def prefill(self, ctx: QueryContext, prepared) -> Prefilled:
        ids = joint_ids(ctx, [self.press])  # (P + n_docs_tokens,)
        shared_s = 0.0
        if self._group is not None:
            kv, shared_s = self._group.kv(self.press), self._group.seconds
        else:
            with self.press(ctx.model):
                kv = encode(ctx.model, input_ids=ids)  # (L, H_kv, n_kept, D)
        flops = prefill_flops(ctx.arch, len(ids), 0)
        out = prefill_on_assembled(ctx, kv, flops, n_recomputed=ctx.n_docs_tokens,
                                   next_pos=len(ids))
        return replace(out, shared_s=shared_s)


PressFactory = Callable[[float], BasePress]


def compression_runs(model, tokenizer, samples: Sequence[Sample],
                     presses: Mapping[str, PressFactory] | Sequence[str], ratios: Sequence[float],
                     wrapper: PacketWrapper | None, settings: EvalSettings,
                     variants: Sequence[str] = VARIANTS, allow_short: bool = False,
                     checkpoint: str | Path | None = None) -> pd.DataFrame:
    """One row per (press, ratio, variant, sample): ``kvp.evaluate.evaluate``'s columns plus
    ``press``, ``ratio``, ``variant`` and ``kv_tokens`` (context KV pairs per layer and head cached
    before the prompt: preamble + compressed packets, or the joint compressed cache).

    Args:
        presses: names of ``PRESSES`` or {label: factory(ratio) -> press}.
        variants: of ``VARIANTS``: ``packet`` (kv_packet on compressed packets; no_recompute when
            ``wrapper`` is None), ``packet_protected`` (header/trailer kept; needs a wrapper) and
            ``joint`` (``JointCompressed``).
    One ``evaluate`` over every setting (each a method on its own ``CompressedStore``, which
    keeps one sample's packets; the stores are siblings, so a document is prefilled once for all
    packet settings), so each sample's preamble is encoded once and the answers of all settings
    are decoded in batches. Rows are ordered by setting, then sample.

    ``checkpoint``: as ``evaluate``'s, every sample's rows saved after it and taken back by a
    later call (each packet setting is labelled with its press, ratio and variant, so rows are
    matched to their own setting).
    """
    factories = (dict(presses) if isinstance(presses, Mapping)
                 else {name: (lambda r, n=name: make_press(n, r)) for name in presses})
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if wrapper is None and "packet_protected" in variants:
        raise ValueError("variant 'packet_protected' protects the wrapper's header/trailer: pass a "
                         "wrapper or drop the variant")
    segments = {s.id: build_segments(tokenizer, s) for s in samples}  # sample ids are unique
    ids = {i: segment_ids(tokenizer, seg) for i, seg in segments.items()}  # (preamble, docs, task)
    n_docs = max((len(s.documents) for s in samples), default=1)
    grid, methods = [], []
    joint = JointGroup([])  # every joint setting's cache from one prefill per sample
    for label, factory in factories.items():
        for ratio in ratios:
            for variant in variants:
                press = factory(ratio)
                store = None
                if variant == "joint":
                    methods.append(JointCompressed(press, _group=joint))
                else:
                    store = CompressedStore(model, tokenizer, settings.model_name, press=press,
                                            max_in_memory=n_docs,
                                            protect_wrapper=variant == "packet_protected",
                                            allow_short=allow_short)
                    method = get_method("kv_packet" if wrapper is not None else "no_recompute")
                    methods.append(OnStore(method, store, f"{label},ratio={ratio},{variant}"))
                grid.append((label, ratio, variant, store))
    joint.presses = [m.press for m in methods if isinstance(m, JointCompressed)]
    stores = [store for *_, store in grid if store is not None]
    for store in stores:
        store.siblings = stores  # each document prefilled once for every packet setting
    # Evaluated ratio by ratio and variant by variant: settings whose caches have one length sit
    # together, so their answers are decoded in one batch (kvp.methods.base.run_methods).
    order = sorted(range(len(grid)), key=lambda k: (grid[k][1], variants.index(grid[k][2])))
    rows = evaluate(model, tokenizer, list(samples), [methods[k] for k in order], settings, wrapper,
                    checkpoint=checkpoint)
    frames = []
    for k, (label, ratio, variant, store) in enumerate(grid):
        if store is None:
            kv_tokens = {i: compute_n_kept(len(pre) + sum(map(len, docs)), ratio)
                         for i, (pre, docs, _) in ids.items()}
        else:
            kv_tokens = {i: len(ids[i][0]) + sum(store.kv_length(d, wrapper) for d in seg.documents)
                         for i, seg in segments.items()}
        part = rows.iloc[order.index(k)::len(grid)]  # evaluate's rows: per sample, the methods
        frames.append(part.assign(press=label, ratio=ratio, variant=variant,
                                  setting=f"{label},ratio={ratio},{variant}",
                                  kv_tokens=part.sample_id.map(kv_tokens)))
    return pd.concat(frames, ignore_index=True)


def compression_sweep(model, tokenizer, samples: Sequence[Sample],
                      presses: Mapping[str, PressFactory] | Sequence[str], ratios: Sequence[float],
                      wrapper: PacketWrapper | None, settings: EvalSettings,
                      variants: Sequence[str] = VARIANTS, allow_short: bool = False
                      ) -> pd.DataFrame:
    """Figure 4's table (:func:`press_summary`) of ``compression_runs`` with these arguments."""
    return press_summary(compression_runs(model, tokenizer, samples, presses, ratios, wrapper,
                                          settings, variants, allow_short))


def press_summary(runs: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per-sample rows of ``compression_runs`` → one row per (press, ratio, variant): the columns
    of ``kvp.evaluate.method_summary`` (F1 with its bootstrap CI, ``n_boot`` resamples, ``seed``)
    followed by press, ratio, variant and the mean ``kv_tokens`` kept."""
    per_setting = runs.groupby("setting", sort=False).agg(
        press=("press", "first"), ratio=("ratio", "first"), variant=("variant", "first"),
        kv_tokens=("kv_tokens", "mean"))
    return method_summary(runs, n_boot, seed).merge(per_setting.reset_index(), on="setting")
