"""User datasets as JSON lines: one sample per line, validated before anything is returned.

Format of a line::

    {"id": "q1", "documents": ["first passage", "second passage"], "question": "...",
     "answers": ["gold", "another acceptable gold"], "meta": {...}}

``meta`` is optional. The validator checks every line and raises one :class:`JsonlError`
listing each problem with its line number and field; no partial dataset is returned. It refuses an
empty file, empty or whitespace-only ids, questions, documents and answers, duplicate ids and any
other top-level key (an unknown key is an error naming it: put extra fields inside ``meta``).
Check a file with ``python -m kvp.data validate FILE``.
:func:`write_jsonl` writes samples in this format, byte for byte the same for the same samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvp.data import Sample

REQUIRED = ("id", "documents", "question", "answers")
OPTIONAL = ("meta",)


@dataclass(frozen=True)
class Problem:
    """One validation problem: 1-based line number, field (``None`` for the whole line), message."""

    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field {self.field!r}" if self.field else "")
        return f"{where}: {self.message}"


class JsonlError(ValueError):
    """A JSONL file with problems; ``problems`` lists every one of them."""

    def __init__(self, path: str | Path, problems: list[Problem]):
        self.problems = problems
        listing = "\n  ".join(str(p) for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s), no samples loaded. Each line must be "
                         f'{{"id": str, "documents": [str, ...], "question": str, "answers": '
                         f"[str, ...], \"meta\": {{...}} (optional)}}. Fix:\n  {listing}")


def string_list_problems(value: object, name: str) -> list[str]:
    """Why ``value`` is not a non-empty list of strings (empty list when it is)."""
    if not isinstance(value, list):
        return [f"expected a non-empty list of strings, got {type(value).__name__}"]
    if not value:
        return ["expected a non-empty list of strings, got an empty list"]
    return [f"{name}[{i}] is {type(v).__name__}, expected a string" if not isinstance(v, str)
            else f"{name}[{i}] is empty or whitespace only" for i, v in enumerate(value)
            if not isinstance(v, str) or not v.strip()]


def record_problems(record: object, line: int) -> list[Problem]:
    """Every problem of one parsed line."""
    if not isinstance(record, dict):
        return [Problem(line, None, f"expected a JSON object, got {type(record).__name__}")]
    problems = [Problem(line, key, "missing") for key in REQUIRED if key not in record]
    problems += [Problem(line, key, f"unknown field; allowed: {list(REQUIRED + OPTIONAL)}")
                 for key in record if key not in REQUIRED + OPTIONAL]
    for key in ("id", "question"):
        if key in record and (not isinstance(record[key], str) or not record[key].strip()):
            problems.append(Problem(line, key, f"expected a non-empty string, got {record[key]!r}"))
    for key in ("documents", "answers"):
        if key in record:
            problems += [Problem(line, key, m) for m in string_list_problems(record[key], key)]
    if "meta" in record and not isinstance(record["meta"], dict):
        problems.append(Problem(line, "meta", f"expected an object, got {type(record['meta']).__name__}"))
    return problems


def read_jsonl(path: str | Path) -> list[Sample]:
    """All samples of ``path``; raises :class:`JsonlError` listing every problem (blank lines skip)."""
    problems: list[Problem] = []
    samples: list[Sample] = []
    first_line_of: dict[str, int] = {}
    for line_no, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(Problem(line_no, None, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        found = record_problems(record, line_no)
        if not found and record["id"] in first_line_of:
            found = [Problem(line_no, "id", f"duplicate id {record['id']!r} (first on line "
                                            f"{first_line_of[record['id']]})")]
        problems += found
        if not found:
            first_line_of[record["id"]] = line_no
            samples.append(Sample(id=record["id"], documents=record["documents"],
                                  question=record["question"], answers=record["answers"],
                                  meta=record.get("meta", {})))
    if not samples and not problems:
        problems.append(Problem(1, None, "the file holds no samples (it is empty)"))
    if problems:
        raise JsonlError(path, problems)
    return samples


def write_jsonl(samples: list[Sample], path: str | Path) -> None:
    """Write samples one per line (UTF-8, ``\\n`` endings, fixed key order): reproducible bytes."""
    lines = [json.dumps(s.to_dict(), ensure_ascii=False) for s in samples]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="\n")


def load_jsonl_dataset(split: str = "test", n: int | None = None, seed: int = 42,
                       path: str | Path | None = None) -> list[Sample]:
    """The first ``n`` samples of the JSONL file ``path`` (all if ``n`` is None), in file order.

    ``split`` fills ``meta["split"]`` and ``meta["dataset"]`` defaults to ``"jsonl"`` where the
    file does not set them; ``seed`` is unused (the file's order is the user's choice).
    """
    if path is None:
        raise ValueError("the jsonl dataset needs path=..., a file with one sample per line")
    if n is not None and n < 0:
        raise ValueError(f"n={n} must be >= 0 (or None for all)")
    samples = read_jsonl(path)
    if n is not None and n > len(samples):
        raise ValueError(f"n={n} but {path} holds {len(samples)} samples; pass n <= "
                         f"{len(samples)} (or None for all)")
    samples = samples[:n]
    return [Sample(s.id, s.documents, s.question, s.answers,
                   {"dataset": "jsonl", "split": split, **s.meta}) for s in samples]
