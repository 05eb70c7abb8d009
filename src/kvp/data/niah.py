"""Needle in a haystack, RULER style (docs/protocol.md#datasets), generated here.

The haystack is plain essay-like prose: the paragraphs of ``resources/niah_filler.txt`` in a
seeded order (reshuffled each time the corpus is used up) until the context reaches about
``context_tokens`` tokens. Needles are sentences "One of the special magic numbers for {key} is:
{value}." placed between haystack sentences. Variants:

* ``single`` — one needle, its value is the answer;
* ``multikey`` — the target needle plus ``num_distractors`` needles with other keys;
* ``multivalue`` — ``num_values`` needles with the same key; the one answer string holds all
  values (answers are alternatives, and token F1 then rewards finding each value).

The context is cut at sentence boundaries into chunks of at most ``chunk_chars`` characters, one
document each. ``meta`` records every needle's depth (fraction of the context's characters before
it) and chunk index, and ``needle_depth`` / ``needle_chunk`` of the target needle.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache

from kvp.data import Sample, check_count, check_split, resource_json, resource_text, seeded_rng

VARIANTS = ("single", "multikey", "multivalue")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTIONS = {
    "single": "What is the special magic number for {key} mentioned in the provided text?",
    "multikey": "What is the special magic number for {key} mentioned in the provided text?",
    "multivalue": "What are all the special magic numbers for {key} mentioned in the provided text?",
}
CHARS_PER_TOKEN = 4
MAX_NEEDLE_CHARS = len(NEEDLE) + 20  # keys are two short words, values seven digits


@dataclass(frozen=True)
class NiahConfig:
    """Options of :func:`generate_niah`.

    Attributes:
        variant: one of ``VARIANTS``.
        context_tokens: target length of the whole context (haystack + needles) in tokens.
        chunk_chars: maximum characters per document chunk (cut at sentence boundaries).
        num_distractors: needles with other keys (``multikey``).
        num_values: values of the target key (``multivalue``).
        depth: depth of the target needle in [0, 1]; ``None`` draws it uniformly per sample.
    """

    variant: str = "single"
    context_tokens: int = 2048
    chunk_chars: int = 1000
    num_distractors: int = 3
    num_values: int = 3
    depth: float | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}; use one of {list(VARIANTS)}")
        if self.context_tokens < 64:
            raise ValueError(f"context_tokens={self.context_tokens} is too small; use >= 64")
        longest = max(MAX_NEEDLE_CHARS, *(len(s) for s in filler_sentences()))
        if self.chunk_chars < longest:
            raise ValueError(f"chunk_chars={self.chunk_chars} is shorter than the longest sentence "
                             f"({longest} characters); use chunk_chars >= {longest}")
        if self.num_distractors < 0 or self.num_values < 1:
            raise ValueError(f"num_distractors={self.num_distractors} must be >= 0 and "
                             f"num_values={self.num_values} >= 1")
        if self.depth is not None and not 0 <= self.depth <= 1:
            raise ValueError(f"depth={self.depth} must lie in [0, 1] (or None for uniform)")


@cache
def filler_paragraphs() -> tuple[tuple[str, ...], ...]:
    """The filler corpus as paragraphs of sentences."""
    paragraphs = [p for p in resource_text("niah_filler.txt").split("\n\n") if p.strip()]
    return tuple(tuple(re.split(r"(?<=[.!?])\s+", " ".join(p.split()))) for p in paragraphs)


def filler_sentences() -> list[str]:
    """Every sentence of the filler corpus."""
    return [s for p in filler_paragraphs() for s in p]


def token_counter(tokenizer=None):
    """A function ``text -> tokens``: the tokenizer's count of ``" " + text`` (memoised), else
    ``ceil(len(text) / 4)``."""
    if tokenizer is None:
        return lambda text: -(-len(text) // CHARS_PER_TOKEN)
    return cache(lambda text: len(tokenizer(" " + text, add_special_tokens=False)["input_ids"]))


def build_haystack(rng: random.Random, budget: int, count) -> list[str]:
    """Filler sentences, paragraph by paragraph in seeded order, while the token sum <= budget."""
    sentences: list[str] = []
    used = 0
    while True:
        order = rng.sample(filler_paragraphs(), len(filler_paragraphs()))
        for paragraph in order:
            for sentence in paragraph:
                used += count(sentence)
                if used > budget:
                    return sentences
                sentences.append(sentence)


def make_keys(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct keys such as ``"misty-lantern"``."""
    words = resource_json("niah_words.json")
    keys: list[str] = []
    while len(keys) < k:
        key = f"{rng.choice(words['adjectives'])}-{rng.choice(words['nouns'])}"
        if key not in keys:
            keys.append(key)
    return keys


def chunk_sentences(sentences: list[str], chunk_chars: int) -> tuple[list[str], list[int]]:
    """Greedy chunks of whole sentences joined by spaces, each <= ``chunk_chars`` characters.

    Returns ``(chunks, chunk_of)`` where ``chunk_of[i]`` is the chunk holding sentence ``i``.
    """
    chunks: list[list[str]] = [[]]
    chunk_of: list[int] = []
    for sentence in sentences:
        if chunks[-1] and len(" ".join(chunks[-1])) + 1 + len(sentence) > chunk_chars:
            chunks.append([])
        chunks[-1].append(sentence)
        chunk_of.append(len(chunks) - 1)
    return [" ".join(c) for c in chunks], chunk_of


def make_sample(split: str, seed: int, index: int, config: NiahConfig, count) -> Sample:
    """Sample ``index`` of the stream ``(split, seed)``."""
    rng = seeded_rng("niah", split, seed, index)
    n_keys = 1 + (config.num_distractors if config.variant == "multikey" else 0)
    keys = make_keys(rng, n_keys)
    n_values = config.num_values if config.variant == "multivalue" else 1
    numbers = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), n_values + n_keys - 1)]
    values = numbers[:n_values]
    needles = [(keys[0], v, True) for v in values] + [
        (key, v, False) for key, v in zip(keys[1:], numbers[n_values:])]
    texts = [NEEDLE.format(key=key, value=value) for key, value, _ in needles]
    sentences = build_haystack(rng, config.context_tokens - sum(count(t) for t in texts), count)
    target_depth = rng.random() if config.depth is None else config.depth
    depths = [target_depth] + [rng.random() for _ in needles[1:]]
    # insert from the deepest so earlier insertion points stay valid
    for text, depth in sorted(zip(texts, depths), key=lambda td: -td[1]):
        sentences.insert(round(depth * len(sentences)), text)
    chunks, chunk_of = chunk_sentences(sentences, config.chunk_chars)
    context = " ".join(sentences)
    records = []
    for (key, value, is_target), text in zip(needles, texts):
        i = sentences.index(text)
        start = len(" ".join(sentences[:i])) + (1 if i else 0)
        records.append({"key": key, "value": value, "target": is_target,
                        "depth": round(start / len(context), 4), "chunk": chunk_of[i]})
    return Sample(
        id=f"niah-{split}-{seed}-{index}",
        documents=chunks,
        question=QUESTIONS[config.variant].format(key=keys[0]),
        answers=[" ".join(values)],
        meta={"dataset": "niah", "split": split, "variant": config.variant,
              "needle_depth": records[0]["depth"], "needle_chunk": records[0]["chunk"],
              "needles": records, "values": values, "context_tokens": config.context_tokens,
              "chunk_chars": config.chunk_chars},
    )


def generate_niah(split: str = "test", n: int | None = 100, seed: int = 42, tokenizer=None,
                  **options) -> list[Sample]:
    """``n`` needle-in-a-haystack samples of ``split`` for ``seed``.

    ``tokenizer`` (optional) measures ``context_tokens``; without one a token is ~4 characters.
    ``options`` are the fields of :class:`NiahConfig`. Sample ``i`` depends only on
    (split, seed, i, options, tokenizer).
    """
    check_split(split)
    check_count(n)
    config = NiahConfig(**options)
    count = token_counter(tokenizer)
    return [make_sample(split, seed, i, config, count) for i in range(n)]
