"""MuSiQue (docs/protocol.md#datasets): answerable multi-hop questions, each paragraph one document.

Reads the hub dataset ``dgslibisey/MuSiQue`` or a local copy (``path=``) of the original release
(``musique_ans_v1.0_dev.jsonl`` schema: ``paragraphs = [{"idx", "title", "paragraph_text",
"is_supporting"}]``, ``answer``, ``answer_aliases``, ``answerable``). Unanswerable records of the
"full" release are skipped. Answers are the answer plus its aliases.
"""

from __future__ import annotations

from pathlib import Path

from kvp.data import Sample
from kvp.data.hub import clean_answers, hub_split, load_records, select

HUB_ID = "dgslibisey/MuSiQue"


def to_sample(record: dict, split: str) -> Sample:
    """One record as a :class:`Sample`; a document is ``"title\\nparagraph_text"``."""
    paras = record["paragraphs"]
    return Sample(
        id=str(record["id"]),
        documents=[f"{p['title']}\n{p['paragraph_text'].strip()}" for p in paras],
        question=record["question"].strip(),
        answers=clean_answers([record["answer"], *(record.get("answer_aliases") or [])]),
        meta={"dataset": "musique", "split": split,
              "hops": len(record.get("question_decomposition") or []),
              "supporting_slots": [i for i, p in enumerate(paras) if p.get("is_supporting")]},
    )


def load_musique(split: str = "test", n: int | None = 100, seed: int = 42,
                 path: str | Path | None = None) -> list[Sample]:
    """``n`` answerable MuSiQue samples drawn by ``seed`` (``"test"`` = the validation split).

    ``path``: a local copy (json, jsonl or parquet) used instead of the hub.
    """
    records = load_records(HUB_ID, None, hub_split(split), "musique", path)
    records = [r for r in records if r.get("answerable", True)]
    return [to_sample(r, split) for r in select(records, n, seed, "musique")]
