"""The ipywidgets attention-map viewer (notebook 04): compare how each method attends.

``AttentionViewer(model, tokenizer, samples, wrapper=...)`` shows, for a chosen sample, method,
layer and head (or the mean over heads), one of three views drawn by :mod:`kvp.viewer` (the map,
the segment scores, the difference to a comparison method), and the token panel of the row a
"query token" slider picks. Images are PNGs rendered with matplotlib's Agg backend into an
``ipywidgets.Image``, so no ipympl is needed.

Attention is captured once per (sample, method) (``kvp.attention.capture``) and cached, so a
slider move only redraws; ``last_redraw_s`` holds the time of the last redraw.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass

import ipywidgets as W
import torch

from kvp.attention import JOINT_METHODS, AttentionMap, capture
from kvp.data.prompts import build_segments
from kvp.methods import get_method, make_context
from kvp.packet import PacketStore, PacketWrapper
from kvp.plots import method_label
from kvp.viewer import (attention_matrix, draw_difference, draw_map, draw_segments, png,
                        token_labels, token_panel)

# The methods the viewer can capture (kvp.methods names): the joint forwards and CacheBlend.
VIEWER_METHODS = ("full_recompute", "no_recompute", "kv_packet", "cache_blend")
VIEWS = ("map", "segments", "difference")


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
        seg = build_segments(tokenizer, sample, dataset)
        return ViewerSample(str(sample.id), seg.preamble, list(seg.documents), seg.task)
    if all(hasattr(sample, a) for a in ("preamble", "documents", "task")):
        return ViewerSample(f"sample {index}", sample.preamble, list(sample.documents), sample.task)
    if isinstance(sample, (tuple, list)) and len(sample) == 3:
        preamble, documents, task = sample
        return ViewerSample(f"sample {index}", preamble, list(documents), task)
    raise TypeError(f"sample {index} is a {type(sample).__name__}; pass a kvp.data.Sample, a "
                    "kvp.data.prompts.PromptSegments or a (preamble, documents, task) triple")


class AttentionViewer:
    """Interactive attention maps of several methods on a few samples.

    Args:
        model, tokenizer: any registry model with a tokenizer (captured with eager attention; a
            model loaded with SDPA is switched for the capture and back).
        samples: ``kvp.data.Sample`` objects, ``PromptSegments`` or (preamble, documents, task).
        methods: names of ``VIEWER_METHODS``; ``kv_packet`` needs ``wrapper``.
        wrapper: the trained (or any) ``PacketWrapper`` for KV Packet.
        blend_ratio: initial CacheBlend recompute ratio (the ratio slider changes it).
        dataset: passed to ``build_segments`` for ``Sample`` objects.
    Display it as the last expression of a cell; ``widget`` is the ipywidgets box.
    """

    def __init__(self, model, tokenizer, samples, methods=VIEWER_METHODS,
                 wrapper: PacketWrapper | None = None, blend_ratio: float = 0.3,
                 dataset: str | None = None, model_name: str = "model"):
        unknown = [m for m in methods if m not in VIEWER_METHODS]
        if unknown or not methods:
            raise ValueError(f"methods {list(methods)}: choose one or more of "
                             f"{list(VIEWER_METHODS)}")
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

    def _head(self) -> int | None:
        """The chosen head, None for the mean over heads."""
        return None if self.mean_w.value else self.head_w.value

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
            layer, head, query = self.layer_w.value, self._head(), self.query_w.value
            if view == "map":
                fig, matrix, layout = draw_map(amap, layer, head, query)
            elif view == "segments":
                fig = draw_segments(amap, other, layer, head)
                matrix, layout = attention_matrix(amap, layer, head), amap.layout
            else:
                fig, matrix, layout = draw_difference(amap, other or amap, layer, head, query)
            self.image.value = png(fig)
            self.tokens.value = token_panel(self._labels_for(index, amap), amap, matrix, layout,
                                            query)
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
