"""The ipywidgets attention-map viewer (notebook 04): compare how each method attends.

``AttentionViewer(model, tokenizer, samples, wrapper=...)`` shows, for a chosen sample, method,
layer and head (or the mean over heads), one of three views:

* **map** — the attention probabilities over the joint sequence (log scale), segment boundaries
  (preamble, header, document, trailer, prompt) drawn and documents numbered;
* **segments** — the final block's pre-softmax ``q·k/√d`` to each segment (Figure 5), for the
  method and the comparison method;
* **difference** — method minus comparison method, on the tokens both share (wrapper tokens
  dropped when only one side has them).

A "query token" slider picks a row: the token panel shows that token, its most attended keys and
the whole row as a strip of tokens (hover one for its position, segment and weight). Images are
PNGs rendered with matplotlib's Agg backend into an ``ipywidgets.Image``, so no ipympl is needed.

Attention is captured once per (sample, method) (``kvp.attention.capture``) and cached, so a
slider move only redraws; ``last_redraw_s`` holds the time of the last redraw.
"""

from __future__ import annotations

import html
import io
import time
from dataclasses import dataclass

import ipywidgets as W
import numpy as np
import torch
from matplotlib.figure import Figure

from kvp.attention import JOINT_METHODS, AttentionMap, capture, segment_profiles
from kvp.blockmask import Layout, make_layout
from kvp.methods import get_method, make_context
from kvp.packet import PacketStore, PacketWrapper
from kvp.plots import method_label, method_style

METHODS = ("full_recompute", "no_recompute", "kv_packet", "cache_blend")
VIEWS = ("map", "segments", "difference")
LOG_FLOOR = 1e-4  # attention below this is drawn as the floor colour of the log-scale map


@dataclass(frozen=True)
class ViewerSample:
    """A sample as prompt text pieces: ``preamble + "".join(documents) + task`` is the prompt."""

    label: str
    preamble: str
    documents: list[str]
    task: str


def as_viewer_sample(tokenizer, sample, index: int, dataset: str | None = None) -> ViewerSample:
    """Accept a ``kvp.data.Sample``, a ``PromptSegments`` or a (preamble, documents, task) triple."""
    if hasattr(sample, "question") and hasattr(sample, "documents"):
        from kvp.data.prompts import build_segments

        seg = build_segments(tokenizer, sample, dataset)
        return ViewerSample(str(sample.id), seg.preamble, list(seg.documents), seg.task)
    if all(hasattr(sample, a) for a in ("preamble", "documents", "task")):
        return ViewerSample(f"sample {index}", sample.preamble, list(sample.documents), sample.task)
    if isinstance(sample, (tuple, list)) and len(sample) == 3:
        preamble, documents, task = sample
        return ViewerSample(f"sample {index}", preamble, list(documents), task)
    raise TypeError(f"sample {index} is a {type(sample).__name__}; pass a kvp.data.Sample, a "
                    "kvp.data.prompts.PromptSegments or a (preamble, documents, task) triple")


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


def plain_view(amap: AttentionMap, matrix: torch.Tensor) -> tuple[torch.Tensor, Layout]:
    """Drop header/trailer rows and columns of an (N, N) matrix: the tokens every method shares."""
    keep = (amap.token_ids >= 0).nonzero()[:, 0]  # (N_plain,)
    lay = amap.layout
    plain = make_layout(lay.preamble[1], [b - a for a, b in lay.bodies],
                        lay.final[1] - lay.final[0])
    return matrix[keep][:, keep], plain


def draw_boundaries(ax, layout: Layout, n: int) -> None:
    """Segment lines on both axes; x ticks name the preamble, documents and prompt."""
    edges = {layout.preamble[1], layout.final[0]}
    for h, body, t in zip(layout.headers, layout.bodies, layout.trailers):
        edges |= {h[0], body[0], body[1], t[1]}
    for e in sorted(edges - {0, n}):
        major = e in {layout.preamble[1], layout.final[0]} or any(e == d[0] for d in layout.docs)
        style = dict(color="white" if major else "#bbbbbb", lw=0.9 if major else 0.4)
        ax.axvline(e - 0.5, **style)
        ax.axhline(e - 0.5, **style)
    ticks = [(sum(layout.preamble) / 2, "pre")]
    ticks += [((a + b) / 2, f"D{i + 1}") for i, (a, b) in enumerate(layout.bodies)]
    ticks.append((sum(layout.final) / 2, "prompt"))
    ax.set_xticks([p - 0.5 for p, _ in ticks], [s for _, s in ticks], fontsize=8)
    ax.set_yticks([p - 0.5 for p, _ in ticks], [s for _, s in ticks], fontsize=8)


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


class AttentionViewer:
    """Interactive attention maps of several methods on a few samples.

    Args:
        model, tokenizer: any registry model with a tokenizer (captured with eager attention; a
            model loaded with SDPA is switched for the capture and back).
        samples: ``kvp.data.Sample`` objects, ``PromptSegments`` or (preamble, documents, task).
        methods: keys of ``METHODS``; ``kv_packet`` needs ``wrapper``.
        wrapper: the trained (or any) ``PacketWrapper`` for KV Packet.
        blend_ratio: initial CacheBlend recompute ratio (the ratio slider changes it).
        dataset: passed to ``build_segments`` for ``Sample`` objects.
    Display it as the last expression of a cell; ``widget`` is the ipywidgets box.
    """

    def __init__(self, model, tokenizer, samples, methods=METHODS,
                 wrapper: PacketWrapper | None = None, blend_ratio: float = 0.3,
                 dataset: str | None = None, model_name: str = "model"):
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"methods {list(methods)}: choose one or more of {list(METHODS)}")
        if "kv_packet" in methods and wrapper is None:
            raise ValueError("method 'kv_packet' needs wrapper=: pass a PacketWrapper (e.g. "
                             "PacketWrapper.load(path)) or leave 'kv_packet' out of methods")
        if tokenizer is None:
            raise ValueError("the viewer needs a tokenizer; random-architecture models "
                             "('arch:...') have none, use a real registry model")
        self.samples = [as_viewer_sample(tokenizer, s, i, dataset) for i, s in enumerate(samples)]
        if not self.samples:
            raise ValueError("no samples: pass at least one sample")
        self.model, self.tokenizer, self.wrapper = model, tokenizer, wrapper
        self.methods = list(methods)
        self.store = PacketStore(model, tokenizer, model_name)
        self._contexts: dict[int, object] = {}
        self._maps: dict[tuple, AttentionMap] = {}
        self._labels: dict[tuple[int, int], list[str]] = {}
        self.n_captures = 0
        self.last_redraw_s = float("nan")
        self.last_capture_s = float("nan")
        self.last_error: str | None = None
        self._build_controls(blend_ratio)
        self.redraw()

    # ----- controls -----
    def _build_controls(self, blend_ratio: float) -> None:
        layers = self.model.config.num_hidden_layers
        heads = self.model.config.num_attention_heads
        options = [(method_label(m), m) for m in self.methods]
        style = {"description_width": "initial"}
        self.sample_w = W.Dropdown(options=[(s.label, i) for i, s in enumerate(self.samples)],
                                   description="sample")
        self.method_w = W.Dropdown(options=options, value=self._default_method(),
                                   description="method")
        self.compare_w = W.Dropdown(options=options, value=self.methods[0], description="compare with",
                                    style=style)
        self.ratio_w = W.FloatSlider(value=blend_ratio, min=0.0, max=1.0, step=0.1,
                                     description="CacheBlend ratio", style=style,
                                     disabled="cache_blend" not in self.methods)
        self.view_w = W.ToggleButtons(options=list(VIEWS), value="map", description="view")
        self.layer_w = W.IntSlider(value=layers // 2, min=0, max=layers - 1, description="layer")
        self.head_w = W.IntSlider(value=0, min=0, max=heads - 1, description="head")
        self.mean_w = W.Checkbox(value=True, description="mean over heads")
        self.query_w = W.IntSlider(value=0, min=0, max=1, description="query token", style=style,
                                   layout=W.Layout(width="60%"))
        self.image = W.Image(format="png", layout=W.Layout(width="640px"))
        self.tokens = W.HTML(layout=W.Layout(width="420px", max_height="560px", overflow="auto"))
        self.status = W.HTML()
        for w in (self.sample_w, self.method_w, self.compare_w, self.ratio_w, self.view_w,
                  self.layer_w, self.head_w, self.mean_w, self.query_w):
            w.observe(self._on_change, names="value")
        self.widget = W.VBox([
            W.HBox([self.sample_w, self.method_w, self.compare_w]),
            W.HBox([self.view_w, self.ratio_w]),
            W.HBox([self.layer_w, self.head_w, self.mean_w]),
            self.query_w,
            W.HBox([self.image, self.tokens]),
            self.status,
        ])
        self.widget.add_class("kvp-attention-viewer")

    def _default_method(self) -> str:
        return "kv_packet" if "kv_packet" in self.methods else self.methods[0]

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _on_change(self, change) -> None:
        if change["owner"] in (self.sample_w, self.method_w, self.ratio_w):
            self._reset_query = True
        self.redraw()

    # ----- data -----
    def _context(self, index: int):
        if index not in self._contexts:
            s = self.samples[index]
            self._contexts[index] = make_context(self.model, self.tokenizer, self.store,
                                                 s.preamble, s.documents, s.task, self.wrapper)
        return self._contexts[index]

    def attention(self, index: int, method: str) -> AttentionMap:
        """The cached AttentionMap of sample ``index`` under ``method`` (captured on first use)."""
        ratio = round(float(self.ratio_w.value), 3)
        key = (index, method, ratio if method == "cache_blend" else None)
        if key not in self._maps:
            start = time.perf_counter()
            spec = method if method in JOINT_METHODS else get_method(method, ratio=ratio)
            self._maps[key] = capture(self._context(index), spec, dtype=torch.float16)
            self.n_captures += 1
            self.last_capture_s = time.perf_counter() - start
        return self._maps[key]

    def _labels_for(self, index: int, amap: AttentionMap) -> list[str]:
        """Token labels in ``amap``'s own layout (wrapped maps carry header/trailer tokens)."""
        key = (index, amap.layout.length)
        if key not in self._labels:
            self._labels[key] = token_labels(self.tokenizer, amap)
        return self._labels[key]

    def _matrix(self, amap: AttentionMap) -> torch.Tensor:
        """(N, N) float32 probabilities of the chosen layer and head (or the mean over heads)."""
        layer = amap.probs[self.layer_w.value]  # (H, N, N)
        return (layer.float().mean(0) if self.mean_w.value else layer[self.head_w.value].float())

    # ----- drawing -----
    def redraw(self) -> None:
        """Capture what is missing, draw the chosen view, fill the token panel; timed."""
        self.head_w.disabled = self.mean_w.value
        index, method = self.sample_w.value, self.method_w.value
        try:
            if (index, method) not in {k[:2] for k in self._maps} or method == "cache_blend":
                self.status.value = "<i>capturing attention…</i>"
            amap = self.attention(index, method)
            view, compare = self.view_w.value, self.compare_w.value
            other = self.attention(index, compare) if view != "map" and compare != method else None
            start = time.perf_counter()
            self._sync_query(amap)
            if view == "map":
                fig, matrix, layout = self._draw_map(amap)
            elif view == "segments":
                fig = self._draw_segments(amap, other)
                matrix, layout = self._matrix(amap), amap.layout
            else:
                fig, matrix, layout = self._draw_difference(amap, other or amap)
            self.image.value = png(fig)
            self.tokens.value = self._token_panel(index, amap, matrix, layout)
            self.last_redraw_s = time.perf_counter() - start
            self.last_error = None
            self.status.value = (f"<span class='kvp-status'>{html.escape(amap.method)} · "
                                 f"{amap.layout.length} tokens · redraw "
                                 f"{self.last_redraw_s * 1000:.0f} ms</span>")
        except Exception as err:  # shown in the widget: callbacks have no cell output
            self.last_error = f"{type(err).__name__}: {err}"
            self.status.value = (f"<span class='kvp-error' style='color:#b00'>"
                                 f"{html.escape(self.last_error)}</span>")
            raise

    def _sync_query(self, amap: AttentionMap) -> None:
        """Keep the query slider within the map; after a sample/method change, the last token."""
        n = amap.layout.length
        reset = getattr(self, "_reset_query", True)
        with self.query_w.hold_trait_notifications():
            self.query_w.unobserve(self._on_change, names="value")
            self.query_w.max = n - 1
            if reset or self.query_w.value >= n:
                self.query_w.value = n - 1
            self.query_w.observe(self._on_change, names="value")
        self._reset_query = False

    def _title(self, amap: AttentionMap) -> str:
        head = "mean over heads" if self.mean_w.value else f"head {self.head_w.value}"
        return f"{amap.method} · layer {self.layer_w.value} · {head}"

    def _draw_map(self, amap: AttentionMap):
        matrix = self._matrix(amap)
        fig = Figure(figsize=(7, 6.4))
        ax = fig.add_subplot()
        image = np.log10(matrix.clamp_min(LOG_FLOOR).numpy())
        image[np.isnan(matrix.numpy())] = np.nan
        cmap = _cmap("magma")
        shown = ax.imshow(image, cmap=cmap, vmin=np.log10(LOG_FLOOR), vmax=0,
                          interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="log10 attention")
        self._finish(fig, ax, amap.layout, self._title(amap))
        return fig, matrix, amap.layout

    def _draw_difference(self, amap: AttentionMap, other: AttentionMap):
        a, b = self._matrix(amap), self._matrix(other)
        wrapped = [m.layout.length != len(m.token_ids[m.token_ids >= 0]) for m in (amap, other)]
        layout = amap.layout
        if a.shape != b.shape or wrapped[0] != wrapped[1]:
            (a, layout), (b, _) = plain_view(amap, a), plain_view(other, b)
        diff = (a - b).numpy()
        finite = np.abs(diff[np.isfinite(diff)])
        vmax = float(np.quantile(finite, 0.999)) if finite.size else 1.0
        fig = Figure(figsize=(7, 6.4))
        ax = fig.add_subplot()
        shown = ax.imshow(diff, cmap=_cmap("RdBu_r"), vmin=-max(vmax, 1e-6), vmax=max(vmax, 1e-6),
                          interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="attention difference")
        title = f"{amap.method} − {other.method} · layer {self.layer_w.value}"
        self._finish(fig, ax, layout, title)
        return fig, torch.from_numpy(diff), layout

    def _finish(self, fig: Figure, ax, layout: Layout, title: str) -> None:
        draw_boundaries(ax, layout, layout.length)
        q = min(self.query_w.value, layout.length - 1)
        ax.axhline(q, color="#00e5ff", lw=0.8, ls="--")
        ax.set_xlabel("key token")
        ax.set_ylabel("query token")
        ax.set_title(title, fontsize=10)
        fig.tight_layout()

    def _draw_segments(self, amap: AttentionMap, other: AttentionMap | None) -> Figure:
        head = None if self.mean_w.value else self.head_w.value
        layer = self.layer_w.value
        fig = Figure(figsize=(7, 4.2))
        ax = fig.add_subplot()
        shown = [amap] if other is None else [amap, other]
        spans: dict[str, tuple[int, int]] = {}
        for m in shown:
            x0, xs, ys = 0, [], []
            for segment, prof in segment_profiles(m, head=head).items():
                n = prof.shape[1]
                xs.append(np.arange(x0, x0 + n))
                ys.append(prof[layer].numpy())
                spans.setdefault(segment, (x0, x0 + n))
                x0 += n + 2
            key = m.method.split(" ")[0]
            ax.plot(np.concatenate(xs), np.concatenate(ys), lw=1.2, label=m.method,
                    color=method_style(key).color)
        for segment, (a, b) in spans.items():
            ax.axvspan(a - 0.5, b - 0.5, color="#eeeeee", zorder=0)
            ax.text((a + b) / 2, 1.01, segment, transform=ax.get_xaxis_transform(), ha="center",
                    fontsize=8)
        ax.set_xticks([])
        ax.set_xlabel("preamble tokens | header | document (50 bins, mean of documents) | trailer")
        ax.set_ylabel("pre-softmax q·k/√d (mean of queries)")
        ax.legend(fontsize=8)
        ax.set_title(f"segment scores · layer {layer} · "
                     + ("mean over heads" if head is None else f"head {head}"), fontsize=10, pad=14)
        fig.tight_layout()
        return fig

    def _token_panel(self, index: int, amap: AttentionMap, matrix: torch.Tensor,
                     layout: Layout) -> str:
        """HTML: the query token, its top keys and the row as a hoverable token strip."""
        labels = self._labels_for(index, amap)
        if layout.length != amap.layout.length:  # plain view of a wrapped map
            labels = [lab for lab, t in zip(labels, amap.token_ids.tolist()) if t >= 0]
        q = min(self.query_w.value, layout.length - 1)
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


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#cccccc")
