"""The small generated test sets committed under ``data/`` and how to rebuild them byte for byte.

``python -m kvp.data regenerate`` writes every file of ``FROZEN`` under ``data/``;
``python -m kvp.data regenerate --check`` only compares. Generation needs no model or network:
NIAH lengths use the ~4 characters/token estimate, so the files do not depend on a tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from kvp.data import DOMAINS, load_dataset
from kvp.data.jsonl import write_jsonl

# relative path under data/ -> (dataset, load_dataset arguments)
FROZEN: dict[str, tuple[str, dict]] = {
    "biography/test_5docs.jsonl": ("biography", dict(split="test", n=100, seed=42, num_docs=5)),
    "niah/test.jsonl": ("niah", dict(split="test", n=100, seed=42, context_tokens=1536,
                                     chunk_chars=1000)),
    "multihop/test_5docs.jsonl": ("multihop", dict(split="test", n=100, seed=42, num_docs=5)),
    **{f"{name}/test_5docs.jsonl": (name, dict(split="test", n=100, seed=42, num_docs=5))
       for name in DOMAINS},
}


def regenerate(out_dir: str | Path) -> list[Path]:
    """Write every frozen set under ``out_dir``; returns the written paths."""
    written = []
    for relpath, (name, kwargs) in FROZEN.items():
        path = Path(out_dir) / relpath
        write_jsonl(load_dataset(name, **kwargs), path)
        written.append(path)
    return written
