"""Attention capture, segment scores (Figure 5) and KV / attention shift measures (notebook 01).

Every method's attention is captured as **one joint forward** over the same sample, so maps of
different methods line up token for token (docs/protocol.md#attention-maps-figure-2, Fig. 5):

* ``full_recompute`` — the plain causal forward over ``[preamble][doc 1]…[doc N][task prompt]``;
* ``no_recompute`` — the block-mask forward without wrappers (each document attends to itself);
* ``kv_packet`` — the block-mask forward over wrapped documents (``[header][doc][trailer]``).

Figure 2's point is that the block-mask forward equals the query-time path: documents encoded
alone, assembled and re-rotated (``kvp.packet.assemble``), then the task prompt prefilled against
that cache. ``cached_attention`` runs that path (any ``kvp.methods`` method, CacheBlend included)
and returns the final block's attention rows; the tests check they equal the block-mask rows.

Pre-softmax scores ``q·k/√d`` (Figure 5) need the queries and keys themselves: ``capture_qk`` hooks
the attention modules (undone in ``finally``) and rebuilds post-RoPE q and k from the very inputs
each module receives, with the model's own projections, q/k norms and rotary cos/sin.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from kvp.blockmask import Layout, block_forward, make_layout
from kvp.cache import encode
from kvp.methods import Method, QueryContext, get_method
from kvp.packet import assemble
from kvp.recompute import project_qkv
from kvp.rope import apply_rotation

# Methods whose attention is one joint forward: name -> uses the block mask, uses the wrapper.
JOINT_METHODS: dict[str, tuple[bool, bool]] = {
    "full_recompute": (False, False),
    "no_recompute": (True, False),
    "kv_packet": (True, True),
}
SEGMENTS = ("preamble", "header", "document", "trailer")


@dataclass
class AttentionMap:
    """One sample's attention under one method; every tensor on the CPU, whatever the model's
    device (maps are for plots and analysis, and an (L, H, N, N) map need not hold GPU memory).

    probs: (L, H, N, N) attention probabilities over the joint sequence (rows = queries); rows the
        method never computes in one pass (the context rows of CacheBlend) are NaN.
    scores: (L, H, T, C) pre-softmax ``q·k·scaling`` of the T final-block queries to the
        C = ``layout.final[0]`` context tokens.
    token_ids: (N,) ids of the joint sequence, -1 at header/trailer (soft) tokens.
    """

    method: str
    layout: Layout
    token_ids: torch.Tensor
    probs: torch.Tensor
    scores: torch.Tensor

    @property
    def n_layers(self) -> int:
        return self.probs.shape[0]

    @property
    def n_heads(self) -> int:
        return self.probs.shape[1]

    @property
    def final_probs(self) -> torch.Tensor:
        """(L, H, T, N) attention rows of the final block (task prompt) tokens."""
        return self.probs[:, :, self.layout.final[0]:]


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Switch ``model`` to eager attention (attention weights available) and back in ``finally``."""
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)


@contextmanager
def capture_qk(model) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Record every layer's post-RoPE queries (H, S, D) and keys (H_kv, S, D) of the forwarded tokens.

    A forward pre-hook on each attention module takes the normed hidden states and the rotary
    cos/sin the module receives and applies the module's own q/k projections (and q/k norms).
    Yields ``{layer: (q, k)}``, filled by the next forward; the hooks are removed in ``finally``.
    """
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def hook_for(layer: int):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]  # (1, S, D_rot) each
            with torch.no_grad():
                q, k, _ = project_qkv(module, x[0], x.shape[1])  # (H, S, D), (H_kv, S, D)
                found[layer] = (apply_rotation(q.float(), cos[0].float(), sin[0].float()),
                                apply_rotation(k.float(), cos[0].float(), sin[0].float()))
        return hook

    try:
        for i, layer in enumerate(model.model.layers):
            handles.append(layer.self_attn.register_forward_pre_hook(hook_for(i), with_kwargs=True))
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _scores(model, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Pre-softmax scores (H, T, C) of queries q (H, T, D) against keys k (H_kv, C, D)."""
    groups = q.shape[0] // k.shape[0]
    scaling = model.model.layers[0].self_attn.scaling
    return (q @ k.repeat_interleave(groups, dim=0).transpose(-1, -2)) * scaling  # (H, T, C)


def _layout(ctx: QueryContext, wrapped: bool) -> Layout:
    h, t = (ctx.wrapper.h, ctx.wrapper.t) if wrapped else (0, 0)
    return make_layout(ctx.n_preamble, [len(d) for d in ctx.doc_ids], len(ctx.task_ids), h, t)


def _token_ids(ctx: QueryContext, layout: Layout) -> torch.Tensor:
    """(N,) joint ids with -1 at header/trailer positions."""
    ids = torch.full((layout.length,), -1, dtype=torch.long)
    ids[slice(*layout.preamble)] = ctx.preamble_ids
    for (a, b), d in zip(layout.bodies, ctx.doc_ids):
        ids[a:b] = d
    ids[slice(*layout.final)] = ctx.task_ids
    return ids


def plain_view(amap: AttentionMap, matrix: torch.Tensor) -> tuple[torch.Tensor, Layout]:
    """An (N, N) matrix of ``amap`` without its header/trailer rows and columns, and the layout
    of what is left, (N_plain, N_plain): the tokens every method shares."""
    keep = (amap.token_ids >= 0).nonzero()[:, 0]  # (N_plain,)
    lay = amap.layout
    plain = make_layout(lay.preamble[1], [b - a for a, b in lay.bodies],
                        lay.final[1] - lay.final[0])
    return matrix[keep][:, keep], plain


def _check_wrapper(ctx: QueryContext, method: str) -> None:
    if ctx.wrapper is None:
        raise ValueError(f"method {method!r} needs a PacketWrapper: pass wrapper= to make_context "
                         "(a trained adapter, or PacketWrapper.init_from_embeddings for an untrained one)")


@torch.no_grad()
def joint_attention(ctx: QueryContext, method: str, dtype: torch.dtype = torch.float32
                    ) -> AttentionMap:
    """The attention of ``method`` (a key of ``JOINT_METHODS``) as one eager joint forward.

    ``full_recompute`` runs the plain causal prompt (as a block-mask forward whose only block is
    the final one, which is exactly causal); the others the block mask
    (docs/method.md#block-mask-equivalence).
    Returns an AttentionMap with probs (L, H, N, N) in ``dtype``.
    """
    if method not in JOINT_METHODS:
        raise ValueError(f"no joint forward for method {method!r}; use one of {list(JOINT_METHODS)} "
                         "(or cached_attention for any kvp.methods method)")
    block, wrapped = JOINT_METHODS[method]
    if wrapped:
        _check_wrapper(ctx, method)
    model = ctx.model
    layout = _layout(ctx, wrapped)
    with eager_attention(model), capture_qk(model) as qk:
        if block:
            _, _, out = block_forward(model, ctx.preamble_ids, ctx.doc_ids, ctx.task_ids,
                                      ctx.wrapper if wrapped else None, output_attentions=True)
        else:
            joint = torch.cat([ctx.preamble_ids, *ctx.doc_ids, ctx.task_ids])  # (N,)
            _, _, out = block_forward(model, joint[:0], [], joint, output_attentions=True)
    probs = torch.cat(out.attentions).to("cpu", dtype)  # (L, H, N, N)
    start = layout.final[0]
    scores = torch.stack([_scores(model, qk[i][0][:, start:], qk[i][1][:, :start])
                          for i in range(len(qk))]).cpu()  # (L, H, T, C)
    return AttentionMap(method, layout, _token_ids(ctx, layout), probs, scores)


@torch.no_grad()
def cached_attention(ctx: QueryContext, method: Method
                     ) -> tuple[torch.Tensor, torch.Tensor, Layout]:
    """Final-block attention from ``method``'s own query-time cache (Figure 2's right-hand side).

    Runs ``method.prepare`` and ``method.prefill`` (e.g. packets assembled and re-rotated; for
    CacheBlend also the recompute), crops the task prompt off the resulting cache and prefills it
    again with eager attention. Returns (probs (L, H, T, C + T), scores (L, H, T, C), layout).
    """
    model = ctx.model
    wrapped = method.name == "kv_packet"
    out = method.prefill(ctx, method.prepare(ctx))
    n_task = len(ctx.task_ids)
    start = out.next_pos - n_task
    cache = out.cache
    cache.crop(cache.get_seq_length() - n_task)
    n_cached = cache.get_seq_length()
    ids = ctx.task_ids.to(model.device)[None]  # (1, T)
    with eager_attention(model), capture_qk(model) as qk:
        res = model(input_ids=ids, past_key_values=cache,
                    position_ids=torch.arange(start, start + n_task, device=model.device)[None],
                    cache_position=torch.arange(n_cached, n_cached + n_task, device=model.device),
                    use_cache=True, output_attentions=True)
    probs = torch.cat(res.attentions).float()  # (L, H, T, C + T)
    scores = torch.stack([_scores(model, qk[i][0], layer.keys[0, :, :n_cached].float())
                          for i, layer in enumerate(cache.layers)])  # (L, H, T, C)
    return probs, scores, _layout(ctx, wrapped)


def capture(ctx: QueryContext, method: str | Method, dtype: torch.dtype = torch.float32
            ) -> AttentionMap:
    """The AttentionMap of any method on one sample.

    Joint methods (``JOINT_METHODS``) give the whole N×N map; any other ``kvp.methods`` method
    (a name or an instance, e.g. ``get_method("cache_blend", ratio=0.3)``) gives the final block's
    rows from its query-time cache, the context rows NaN (a partial recompute never produces them
    in one pass).
    """
    if isinstance(method, str) and method in JOINT_METHODS:
        return joint_attention(ctx, method, dtype)
    if isinstance(method, str):
        method = get_method(method)
    if method.name == "kv_packet":
        _check_wrapper(ctx, method.name)
    rows, scores, layout = cached_attention(ctx, method)
    n = layout.length
    probs = torch.full((*rows.shape[:2], n, n), float("nan"), dtype=dtype)
    probs[:, :, layout.final[0]:] = rows.to("cpu", dtype)
    label = method.name + (f" ({method.setting})" if method.setting else "")
    return AttentionMap(label, layout, _token_ids(ctx, layout), probs, scores.cpu())


def _resample(profile: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(L, n) → (L, n_bins) by linear interpolation over the segment's length."""
    return F.interpolate(profile[:, None].float(), size=n_bins, mode="linear",
                         align_corners=True)[:, 0]


def segment_profiles(amap: AttentionMap, n_bins: int = 50, head: int | None = None
                     ) -> dict[str, torch.Tensor]:
    """Pre-softmax scores of the final block to each segment, averaged over queries and over heads
    (or one ``head``), documents resampled to ``n_bins`` points and all segments averaged over the
    documents: {segment: (L, bins)}, keys of ``SEGMENTS`` (header/trailer only when wrapped)."""
    if head is not None and not 0 <= head < amap.n_heads:
        raise ValueError(f"head={head} out of range; the model has heads 0..{amap.n_heads - 1}")
    s = amap.scores.float()
    s = (s.mean(1) if head is None else s[:, head]).mean(1)  # (L, C)
    lay = amap.layout
    out = {"preamble": s[:, slice(*lay.preamble)]}
    if lay.headers[0][1] > lay.headers[0][0]:
        out["header"] = torch.stack([s[:, a:b] for a, b in lay.headers]).mean(0)
    out["document"] = torch.stack([_resample(s[:, a:b], n_bins) for a, b in lay.bodies]).mean(0)
    if lay.trailers[0][1] > lay.trailers[0][0]:
        out["trailer"] = torch.stack([s[:, a:b] for a, b in lay.trailers]).mean(0)
    return out


def segment_scores(amap: AttentionMap, n_bins: int = 50) -> pd.DataFrame:
    """Figure 5 as a tidy frame: columns layer, segment, position_bin, score, method.

    ``score`` = mean over heads and final-block queries of ``q·k/√d`` to the token (preamble,
    header, trailer: token index; document: one of ``n_bins`` resampled points), averaged over the
    sample's documents.
    """
    rows = []
    for segment, prof in segment_profiles(amap, n_bins).items():
        n_layers, n_pos = prof.shape
        rows.append(pd.DataFrame({
            "layer": torch.arange(n_layers).repeat_interleave(n_pos).numpy(),
            "segment": segment,
            "position_bin": torch.arange(n_pos).repeat(n_layers).numpy(),
            "score": prof.reshape(-1).numpy(),
        }))
    df = pd.concat(rows, ignore_index=True)
    df["method"] = amap.method
    return df


@torch.no_grad()
def kv_deviation(ctx: QueryContext) -> pd.DataFrame:
    """Per-layer drift of independently encoded + re-rotated KV from the joint encoding.

    Joint: the plain prompt ``[preamble][doc 1]…[doc N]`` encoded in one causal pass. Independent:
    each document encoded alone from position 0 (plain packets), assembled and re-rotated. Layer 0
    K/V depend only on token and position, so they agree everywhere; the preamble agrees at every
    layer (same tokens, same context).

    Returns a tidy frame: layer, segment ("preamble" / "document"), document (0 for the preamble,
    1..N), kind ("key" / "value"), cosine (mean over tokens and KV heads of the per-vector cosine
    similarity), rel_l2 (‖independent − joint‖ / ‖joint‖ over the segment).
    """
    model = ctx.model
    joint = encode(model, input_ids=torch.cat([ctx.preamble_ids, *ctx.doc_ids]))
    indep, _ = assemble(model, ctx.preamble_kv, [ctx.store.get(d) for d in ctx.documents])
    lay = _layout(ctx, wrapped=False)
    spans = [("preamble", 0, lay.preamble)] + [("document", i + 1, b)
                                               for i, b in enumerate(lay.bodies)]
    rows = []
    for kind, a, b in (("key", joint.keys, indep.keys), ("value", joint.values, indep.values)):
        a, b = a.float(), b.float()
        cos = F.cosine_similarity(a, b, dim=-1)  # (L, H_kv, S)
        for segment, doc, (s0, s1) in spans:
            diff = (b[:, :, s0:s1] - a[:, :, s0:s1]).flatten(1).norm(dim=1)  # (L,)
            ref = a[:, :, s0:s1].flatten(1).norm(dim=1)
            for layer in range(a.shape[0]):
                rows.append({"layer": layer, "segment": segment, "document": doc, "kind": kind,
                             "cosine": cos[layer, :, s0:s1].mean().item(),
                             "rel_l2": (diff[layer] / ref[layer]).item()})
    return pd.DataFrame(rows)


def attention_mass(amap: AttentionMap, n_first: int = 1) -> pd.DataFrame:
    """Where the final block's attention goes, per layer (mean over heads and queries).

    Segments: "preamble" and "prompt" (document 0), and per document 1..N "header", "first" (the
    first ``n_first`` document tokens: the attention sink of an independently encoded document),
    "body" (the rest of the document) and "trailer". Masses of one layer sum to 1.
    Returns a tidy frame: method, layer, segment, document, mass.
    """
    if n_first < 1:
        raise ValueError(f"n_first={n_first}: must be at least 1 (tokens counted as the sink)")
    p = amap.final_probs.float().mean(dim=(1, 2))  # (L, N)
    lay = amap.layout
    spans = [("preamble", 0, lay.preamble), ("prompt", 0, lay.final)]
    for i, ((ha, hb), (a, b), (ta, tb)) in enumerate(zip(lay.headers, lay.bodies, lay.trailers)):
        cut = min(a + n_first, b)
        spans += [("header", i + 1, (ha, hb)), ("first", i + 1, (a, cut)),
                  ("body", i + 1, (cut, b)), ("trailer", i + 1, (ta, tb))]
    rows = [{"method": amap.method, "layer": layer, "segment": seg, "document": doc,
             "mass": p[layer, s0:s1].sum().item()}
            for seg, doc, (s0, s1) in spans if s1 > s0 for layer in range(p.shape[0])]
    return pd.DataFrame(rows)


def document_spread(mass: pd.DataFrame) -> pd.DataFrame:
    """How evenly the query's attention spreads over documents, from ``attention_mass`` rows.

    Per method and layer: ``docs_mass`` (total mass on documents incl. wrappers), ``entropy``
    (normalised Shannon entropy of the per-document shares: 1 = even, 0 = one document) and
    ``top_share`` (share of the most attended document).
    """
    docs = mass[mass["document"] > 0].groupby(["method", "layer", "document"])["mass"].sum()
    rows = []
    for (method, layer), per_doc in docs.groupby(level=["method", "layer"]):
        share = per_doc.to_numpy() / per_doc.sum()
        n = len(share)
        ent = -sum(x * math.log(x) for x in share if x > 0) / math.log(n) if n > 1 else 1.0
        rows.append({"method": method, "layer": layer, "docs_mass": per_doc.sum(),
                     "entropy": ent, "top_share": share.max()})
    return pd.DataFrame(rows)

