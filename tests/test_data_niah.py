"""NIAH generator: needles in the recorded chunk, chunk sizes, lengths, variants, determinism."""

from __future__ import annotations

import pytest

from kvp.data import load_dataset
from kvp.data.niah import NEEDLE, filler_paragraphs


def test_determinism():
    a = load_dataset("niah", "test", n=5, seed=1, context_tokens=512, chunk_chars=500)
    assert a == load_dataset("niah", "test", n=5, seed=1, context_tokens=512, chunk_chars=500)
    assert a != load_dataset("niah", "test", n=5, seed=2, context_tokens=512, chunk_chars=500)
    assert a != load_dataset("niah", "train", n=5, seed=1, context_tokens=512, chunk_chars=500)


@pytest.mark.parametrize("variant", ["single", "multikey", "multivalue"])
def test_needles_sit_exactly_in_their_recorded_chunk(variant):
    for s in load_dataset("niah", "test", n=30, seed=0, variant=variant, context_tokens=1024,
                          chunk_chars=600):
        assert all(len(doc) <= 600 for doc in s.documents)
        for needle in s.meta["needles"]:
            text = NEEDLE.format(key=needle["key"], value=needle["value"])
            holders = [i for i, doc in enumerate(s.documents) if text in doc]
            assert holders == [needle["chunk"]]
            context = " ".join(s.documents)
            assert abs(context.index(text) / len(context) - needle["depth"]) < 1e-3
        assert s.meta["needle_chunk"] == s.meta["needles"][0]["chunk"]
        targets = [n["value"] for n in s.meta["needles"] if n["target"]]
        assert s.answers == [" ".join(targets)]
        assert s.meta["needles"][0]["key"] in s.question


def test_variants_have_the_right_needles():
    multikey = load_dataset("niah", "test", n=1, seed=0, variant="multikey", num_distractors=4)[0]
    assert len({n["key"] for n in multikey.meta["needles"]}) == 5
    assert sum(n["target"] for n in multikey.meta["needles"]) == 1
    multivalue = load_dataset("niah", "test", n=1, seed=0, variant="multivalue", num_values=4)[0]
    assert len(multivalue.answers[0].split()) == 4 and "all" in multivalue.question


def test_context_length_and_forced_depth():
    samples = load_dataset("niah", "test", n=5, seed=0, context_tokens=2048, chunk_chars=1000, depth=0.0)
    for s in samples:
        chars = len(" ".join(s.documents))
        assert 0.9 * 2048 * 4 < chars <= 2048 * 4 + 4
        assert s.meta["needle_depth"] == 0.0 and s.meta["needle_chunk"] == 0
    deep = load_dataset("niah", "test", n=3, seed=0, depth=1.0)
    assert all(s.meta["needle_chunk"] == len(s.documents) - 1 for s in deep)


def test_tokenizer_measures_the_length(smollm):
    tokenizer = smollm.tokenizer
    for s in load_dataset("niah", "test", n=3, seed=0, tokenizer=tokenizer, context_tokens=1024):
        n = len(tokenizer(" ".join(s.documents), add_special_tokens=False)["input_ids"])
        assert 0.9 * 1024 < n <= 1024 * 1.02


def test_filler_is_varied_prose():
    paragraphs = filler_paragraphs()
    sentences = [x for p in paragraphs for x in p]
    assert len(paragraphs) >= 36 and len(set(sentences)) == len(sentences) > 150


@pytest.mark.parametrize("kw, match", [
    (dict(variant="multi"), "variant"), (dict(chunk_chars=50), "chunk_chars"),
    (dict(depth=1.5), "depth"), (dict(context_tokens=10), "context_tokens")])
def test_bad_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("niah", "test", n=1, seed=0, **kw)
