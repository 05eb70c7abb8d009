"""What the attention viewer shows, as plain functions of one ``AttentionMap`` (no widgets).

* :func:`draw_map` — the attention probabilities over the joint sequence (log scale), segment
  boundaries drawn and documents numbered;
* :func:`draw_segments` — the final block's pre-softmax ``q·k/√d`` to each segment (Figure 5),
  for a method and a comparison method;
* :func:`draw_difference` — method minus comparison method, on the tokens both share (wrapper
  tokens dropped when only one side has them);
* :func:`token_panel` — HTML of one query row: the token, its most attended keys and the whole
  row as a strip of tokens (hover one for its position, segment and weight).

Figures are matplotlib ``Figure`` objects (Agg, no pyplot state), turned into PNG bytes by
:func:`png`; ``kvp.widgets.AttentionViewer`` puts them behind controls. ``head=None`` means the
mean over heads everywhere.
"""

from __future__ import annotations

import html
import io

import numpy as np
import torch
from matplotlib.figure import Figure

from kvp.attention import AttentionMap, plain_view, segment_profiles
from kvp.blockmask import Layout
from kvp.plots import LOG_FLOOR, draw_boundaries, log_attention, method_style, with_missing


def token_labels(tokenizer, amap: AttentionMap) -> list[str]:
    """One printable label per joint token; header/trailer soft tokens are ``[H1]`` / ``[T1]``."""
    labels = [tokenizer.decode([int(i)]) if i >= 0 else "" for i in amap.token_ids]
    for spans, tag in ((amap.layout.headers, "H"), (amap.layout.trailers, "T")):
        for a, b in spans:
            for j in range(a, b):
                labels[j] = f"[{tag}{j - a + 1}]"
    return labels


def segment_of(layout: Layout, pos: int) -> str:
    """Name of the segment holding token ``pos``, e.g. ``doc 2 header``."""
    if pos < layout.preamble[1]:
        return "preamble"
    if pos >= layout.final[0]:
        return "prompt"
    for i, (h, body, t) in enumerate(zip(layout.headers, layout.bodies, layout.trailers)):
        for name, (a, b) in (("header", h), ("", body), ("trailer", t)):
            if a <= pos < b:
                return f"doc {i + 1} {name}".strip()
    raise ValueError(f"position {pos} is outside the layout of {layout.length} tokens")


def attention_matrix(amap: AttentionMap, layer: int, head: int | None) -> torch.Tensor:
    """(N, N) float32 probabilities of ``layer`` and ``head`` (the mean over heads for None)."""
    probs = amap.probs[layer]  # (H, N, N)
    return probs.float().mean(0) if head is None else probs[head].float()


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (90 dpi)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _finish(fig: Figure, ax, layout: Layout, title: str, query: int) -> None:
    draw_boundaries(ax, layout, layout.length)
    ax.axhline(min(query, layout.length - 1), color="#00e5ff", lw=0.8, ls="--")
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()


def _head_label(head: int | None) -> str:
    return "mean over heads" if head is None else f"head {head}"


def draw_map(amap: AttentionMap, layer: int, head: int | None, query: int
             ) -> tuple[Figure, torch.Tensor, Layout]:
    """The log-scale map of ``layer`` / ``head``, the ``query`` row marked; returns the figure,
    the (N, N) matrix drawn and its layout."""
    matrix = attention_matrix(amap, layer, head)
    fig = Figure(figsize=(7, 6.4))
    ax = fig.add_subplot()
    shown = ax.imshow(log_attention(matrix), cmap=with_missing("magma"), vmin=np.log10(LOG_FLOOR),
                      vmax=0, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="log10 attention")
    _finish(fig, ax, amap.layout, f"{amap.method} · layer {layer} · {_head_label(head)}", query)
    return fig, matrix, amap.layout


def draw_difference(amap: AttentionMap, other: AttentionMap, layer: int, head: int | None,
                    query: int) -> tuple[Figure, torch.Tensor, Layout]:
    """``amap`` minus ``other`` on the tokens both share; returns the figure, the (M, M)
    difference and its layout (the plain layout when only one side is wrapped)."""
    a, b = attention_matrix(amap, layer, head), attention_matrix(other, layer, head)
    wrapped = [m.layout.length != len(m.token_ids[m.token_ids >= 0]) for m in (amap, other)]
    layout = amap.layout
    if a.shape != b.shape or wrapped[0] != wrapped[1]:
        (a, layout), (b, _) = plain_view(amap, a), plain_view(other, b)
    diff = (a - b).numpy()
    finite = np.abs(diff[np.isfinite(diff)])
    vmax = max(float(np.quantile(finite, 0.999)) if finite.size else 1.0, 1e-6)
    fig = Figure(figsize=(7, 6.4))
    ax = fig.add_subplot()
    shown = ax.imshow(diff, cmap=with_missing("RdBu_r"), vmin=-vmax, vmax=vmax,
                      interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="attention difference")
    _finish(fig, ax, layout, f"{amap.method} − {other.method} · layer {layer}", query)
    return fig, torch.from_numpy(diff), layout


def draw_segments(amap: AttentionMap, other: AttentionMap | None, layer: int,
                  head: int | None) -> Figure:
    """The final block's mean pre-softmax score to each segment position of ``layer``, for
    ``amap`` and (when given) ``other``."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    spans: dict[str, tuple[int, int]] = {}
    for m in [amap] if other is None else [amap, other]:
        x0, xs, ys = 0, [], []
        for segment, prof in segment_profiles(m, head=head).items():
            n = prof.shape[1]
            xs.append(np.arange(x0, x0 + n))
            ys.append(prof[layer].numpy())
            spans.setdefault(segment, (x0, x0 + n))
            x0 += n + 2
        ax.plot(np.concatenate(xs), np.concatenate(ys), lw=1.2, label=m.method,
                color=method_style(m.method.split(" ")[0]).color)
    for segment, (a, b) in spans.items():
        ax.axvspan(a - 0.5, b - 0.5, color="#eeeeee", zorder=0)
        ax.text((a + b) / 2, 1.01, segment, transform=ax.get_xaxis_transform(), ha="center",
                fontsize=8)
    ax.set_xticks([])
    ax.set_xlabel("preamble tokens | header | document (50 bins, mean of documents) | trailer")
    ax.set_ylabel("pre-softmax q·k/√d (mean of queries)")
    ax.legend(fontsize=8)
    ax.set_title(f"segment scores · layer {layer} · {_head_label(head)}", fontsize=10, pad=14)
    fig.tight_layout()
    return fig


def token_panel(labels: list[str], amap: AttentionMap, matrix: torch.Tensor, layout: Layout,
                query: int) -> str:
    """HTML: the query token, its top keys and its row of ``matrix`` (M, M) as a hoverable token
    strip. ``labels`` are :func:`token_labels` of ``amap``; ``layout`` is the matrix's own (the
    plain one of a wrapped map drops the wrapper's labels)."""
    if layout.length != amap.layout.length:  # plain view of a wrapped map
        labels = [lab for lab, t in zip(labels, amap.token_ids.tolist()) if t >= 0]
    q = min(query, layout.length - 1)
    row = matrix[q].float()
    if torch.isnan(row).all():
        return (f"<b>query {q}</b> ({segment_of(layout, q)}): this method computes no "
                "attention row here (reused cache); pick a prompt token")
    weight = row.nan_to_num(0).abs()
    scale = float(weight.max()) or 1.0
    top = weight.topk(min(8, len(weight))).indices.tolist()
    esc = lambda s: html.escape(s.replace("\n", "⏎"))  # noqa: E731
    items = "".join(f"<li>{k} <code>{esc(labels[k])}</code> · {segment_of(layout, k)} · "
                    f"{float(row[k]):.3g}</li>" for k in top)
    spans = []
    for k, lab in enumerate(labels[: q + 1]):
        alpha = float(weight[k]) / scale
        spans.append(f"<span title='{k} · {html.escape(segment_of(layout, k))} · "
                     f"{float(row[k]):.3g}' style='background:rgba(230,85,13,{alpha:.2f})'>"
                     f"{esc(lab)}</span>")
    return (f"<div class='kvp-tokens'><b>query {q}</b> <code>{esc(labels[q])}</code> "
            f"({segment_of(layout, q)})<ol>{items}</ol>"
            f"<div style='font-family:monospace;font-size:11px;line-height:1.5'>"
            f"{''.join(spans)}</div></div>")
