"""HotpotQA (docs/protocol.md#datasets): fullwiki validation, each context paragraph one document.

Reads the hub dataset ``hotpot_qa`` (config ``fullwiki``) or a local copy (``path=``) in either
published schema: the hub's (``context = {"title": [...], "sentences": [[...]]}``) or the
original JSON release's (``context = [[title, [sentences]], ...]``, id under ``_id``).
"""

from __future__ import annotations

from pathlib import Path

from kvp.data import Sample
from kvp.data.hub import clean_answers, hub_split, load_records, select

HUB_ID = "hotpot_qa"
HUB_CONFIG = "fullwiki"


def paragraphs(record: dict) -> list[tuple[str, list[str]]]:
    """``(title, sentences)`` per context paragraph, from either schema."""
    context = record["context"]
    if isinstance(context, dict):
        return list(zip(context["title"], context["sentences"]))
    return [(title, sentences) for title, sentences in context]


def supporting_titles(record: dict) -> list[str]:
    """Titles of the paragraphs holding supporting facts, from either schema."""
    facts = record.get("supporting_facts") or []
    titles = facts["title"] if isinstance(facts, dict) else [title for title, _ in facts]
    return list(dict.fromkeys(titles))


def to_sample(record: dict, split: str) -> Sample:
    """One record as a :class:`Sample`; a document is ``"title\\ntext"``."""
    paras = paragraphs(record)
    support = supporting_titles(record)
    return Sample(
        id=str(record.get("id", record.get("_id"))),
        documents=[f"{title}\n{''.join(sentences).strip()}" for title, sentences in paras],
        question=record["question"].strip(),
        answers=clean_answers([record["answer"]]),
        meta={"dataset": "hotpotqa", "split": split, "type": record.get("type"),
              "level": record.get("level"),
              "supporting_slots": [i for i, (title, _) in enumerate(paras) if title in support]},
    )


def load_hotpotqa(split: str = "test", n: int | None = 100, seed: int = 42,
                  path: str | Path | None = None) -> list[Sample]:
    """``n`` HotpotQA samples drawn by ``seed`` (``"test"`` = the validation split).

    ``path``: a local copy (json, jsonl or parquet) used instead of the hub.
    """
    records = load_records(HUB_ID, HUB_CONFIG, hub_split(split), "hotpotqa", path)
    return [to_sample(r, split) for r in select(records, n, seed, "hotpotqa")]
