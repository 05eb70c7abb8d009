"""Prompt segments reproduce the chat template exactly, as text and as token ids, for both models."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvp.data import DOMAINS, Sample, load_dataset
from kvp.data.prompts import (
    ANSWER_INSTRUCTIONS,
    build_conversation,
    build_segments,
    extract_answer,
    segment_ids,
    stop_strings,
)
from kvp.models import load_tokenizer

QWEN = "qwen2.5-coder-0.5b"


def prompt_samples() -> list[Sample]:
    """A few samples of every kind, including fixture paragraphs with titles."""
    fixtures = Path(__file__).parent / "fixtures"
    return (load_dataset("biography", "test", n=4, seed=0)
            + load_dataset("niah", "test", n=2, seed=0, context_tokens=512, chunk_chars=500,
                           variant="multivalue")
            + load_dataset("hotpotqa", "test", n=None, path=fixtures / "hotpotqa_original.json")
            + load_dataset("musique", "test", n=None, path=fixtures / "musique_dev.jsonl")
            + [s for name in ("multihop", *DOMAINS)  # multi-line tables, code and sheets
               for s in load_dataset(name, "test", n=1, seed=0, num_docs=3)])


def template_ids(tokenizer, conversation) -> list[int]:
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def check_segments_match_template(tokenizer):
    for sample in prompt_samples():
        for kw in ({}, {"few_shot": "Example: Q: Who? A: Ann.", "system": "Be brief."},
                   {"instruction": ""}):
            segments = build_segments(tokenizer, sample, **kw)
            conversation = build_conversation(sample, **kw)
            text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=True)
            assert segments.preamble + "".join(segments.documents) + segments.task == text
            assert len(segments.documents) == len(sample.documents)
            expected = template_ids(tokenizer, conversation)
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected
            preamble, docs, task = segment_ids(tokenizer, segments)
            assert preamble + [t for d in docs for t in d] + task == expected


def test_segments_match_template_smollm(smollm):
    check_segments_match_template(smollm.tokenizer)


def test_segments_match_template_qwen():
    check_segments_match_template(load_tokenizer(QWEN))


def test_segment_roles(smollm):
    tokenizer = smollm.tokenizer
    sample = load_dataset("biography", "test", n=1, seed=0)[0]
    seg = build_segments(tokenizer, sample)
    assert seg.preamble.startswith("<|im_start|>system\n") and seg.preamble.endswith("\n")
    assert "<|im_start|>user\n" in seg.preamble and sample.question not in seg.preamble
    assert all(d == doc + "\n" for d, doc in zip(seg.documents, sample.documents))
    assert seg.task.startswith(sample.question)
    assert ANSWER_INSTRUCTIONS["biography"] in seg.task and seg.task.endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" in stop_strings(tokenizer)
    with pytest.raises(ValueError, match="no prompt for dataset 'squad'"):
        build_segments(tokenizer, sample, dataset="squad")


def test_template_that_alters_content_is_refused():
    class Flattening:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            flat = [f"<{m['role']}>{m['content'].replace(chr(10), ' ')}</>" for m in messages]
            return "".join(flat) + "<assistant>"

    sample = load_dataset("biography", "test", n=1, seed=0)[0]
    with pytest.raises(ValueError, match="transforms the message content"):
        build_segments(Flattening(), sample)


@pytest.mark.parametrize("text, dataset, expected", [
    ("Paris is the capital.\nShort Answer: Paris", "hotpotqa", "Paris"),
    ("step 1\nshort answer: the Mirava River.\nmore", "musique", "the Mirava River."),
    ("I think\nit is Oslo", "musique", "it is Oslo"),
    ("Answer: Sydney\nExplanation follows", "biography", "Sydney"),
    ("  \n", "biography", ""),
    ("1234567\n7654321", "niah", "1234567 7654321"),
    ("The special magic number for misty-canyon is: 4657455.", "niah", "4657455"),
])
def test_extract_answer(text, dataset, expected):
    assert extract_answer(text, dataset) == expected
