"""The attention-map viewer, driven from Python (the real-browser test is tests/test_browser.py)."""

from __future__ import annotations

import statistics

import pytest

from kvp.packet import PacketWrapper
from kvp.widgets import AttentionViewer, as_viewer_sample

PREAMBLE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "Answer the question using the documents below.\n")
SAMPLES = [
    (PREAMBLE, ["Alice Moreau was born in Lyon and works for Nestle.\n",
                "Bruno Keller was born in Graz and lives in Zurich.\n"],
     "Where was Bruno Keller born?<|im_end|>\n<|im_start|>assistant\n"),
    (PREAMBLE, ["The Amstel flows through Amsterdam.\n", "The Danube flows through Vienna.\n",
                "The Vltava flows through Prague.\n"],
     "Which river flows through Prague?<|im_end|>\n<|im_start|>assistant\n"),
]


@pytest.fixture(scope="module")
def viewer(smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    wrapper = PacketWrapper.init_from_embeddings(model, h=2, t=2, seed=0)
    return AttentionViewer(model, tokenizer, SAMPLES, wrapper=wrapper, blend_ratio=0.5)


def test_viewer_draws_png_and_caches_attention(viewer):
    assert viewer.image.value[:4] == b"\x89PNG"
    before, captures = viewer.image.value, viewer.n_captures
    times = []
    for layer in (1, 2, 3, 4, 5):
        viewer.layer_w.value = layer
        times.append(viewer.last_redraw_s)
        assert viewer.image.value != before
        before = viewer.image.value
    assert viewer.n_captures == captures  # slider moves only redraw
    assert statistics.median(times) < 1.0, times
    assert viewer.last_error is None


def test_viewer_views_methods_and_heads(viewer):
    images = set()
    for method in viewer.methods:
        viewer.method_w.value = method
        for view in ("map", "segments", "difference"):
            viewer.view_w.value = view
            images.add(viewer.image.value)
    viewer.mean_w.value = False
    viewer.head_w.value = 2
    images.add(viewer.image.value)
    assert len(images) == 4 * 3 + 1
    assert viewer.last_error is None
    viewer.mean_w.value = True
    viewer.view_w.value = "map"


def test_cache_blend_ratio_and_sample_switch_recapture(viewer):
    viewer.method_w.value = "cache_blend"
    n = viewer.n_captures
    viewer.ratio_w.value = 0.2
    assert viewer.n_captures == n + 1
    viewer.sample_w.value = 1
    assert viewer.query_w.max == viewer.attention(1, "cache_blend").layout.length - 1
    assert viewer.query_w.value == viewer.query_w.max  # reset to the last prompt token
    assert "Prague" in viewer.tokens.value or "prague" in viewer.tokens.value.lower()
    viewer.query_w.value = 3  # a preamble row: CacheBlend computes none in one pass
    assert "computes no attention row" in viewer.tokens.value


def test_token_panel_lists_top_keys_with_tooltips(viewer):
    viewer.method_w.value = "kv_packet"
    viewer.query_w.value = viewer.query_w.max
    panel = viewer.tokens.value
    assert "<ol>" in panel and "title='" in panel and "doc 1" in panel


def test_samples_as_segments_and_sample_objects(smollm):
    tokenizer = smollm.tokenizer
    triple = as_viewer_sample(tokenizer, SAMPLES[0], 0)
    assert triple.documents == SAMPLES[0][1]
    from kvp.data import Sample
    from kvp.data.prompts import build_segments

    sample = Sample("s1", ["Alice was born in Lyon."], "Where was Alice born?", ["Lyon"],
                         {"dataset": "biography"})
    seg = build_segments(tokenizer, sample)
    from_sample = as_viewer_sample(tokenizer, sample, 0)
    from_segments = as_viewer_sample(tokenizer, seg, 0)
    assert from_sample.label == "s1"
    assert (from_sample.preamble, from_sample.documents, from_sample.task) == \
        (from_segments.preamble, from_segments.documents, from_segments.task)


def test_viewer_refuses_bad_arguments(smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    with pytest.raises(ValueError, match="needs wrapper"):
        AttentionViewer(model, tokenizer, SAMPLES)
    with pytest.raises(ValueError, match="choose one or more"):
        AttentionViewer(model, tokenizer, SAMPLES, methods=["epic"])
    with pytest.raises(TypeError, match="triple"):
        as_viewer_sample(tokenizer, "just text", 0)
