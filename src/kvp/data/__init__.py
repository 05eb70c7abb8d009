"""Datasets of the project behind one sample type (docs/protocol.md#datasets).

Every loader returns a list of :class:`Sample`: the documents (one packet each), the question, the
acceptable answers and free-form ``meta`` (dataset name, split, target slot, needle depth, ...).
``load_dataset(name, split, n, seed, **kw)`` dispatches by name:

* ``biography`` — synthetic people with six attributes (generated, :mod:`kvp.data.biography`);
* ``niah`` — needle in a haystack (generated, :mod:`kvp.data.niah`);
* ``multihop`` — questions that need two or three documents (generated, :mod:`kvp.data.multihop`);
* ``products`` / ``events`` / ``abstracts`` / ``tables`` / ``codedocs`` — five more kinds of
  document (generated, :mod:`kvp.data.domains`);
* ``hotpotqa`` / ``musique`` — multi-hop QA from the hub or a local copy (``path=``);
* ``jsonl`` — the user's own file (``path=``), validated line by line;
* ``mixture`` — a seeded mix of the above for training; ``general`` — every generator except
  one held out (``holdout=``), for a wrapper tested on a domain it never saw.

Generators are deterministic for a seed on every machine: randomness comes only from
:func:`seeded_rng`, never from ``hash()`` of a string or from set iteration order.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

DOMAINS = ("products", "events", "abstracts", "tables", "codedocs")  # kvp.data.domains
GENERATORS = ("biography", "niah", "multihop", *DOMAINS)  # generated here, no file or hub
DATASETS = (*GENERATORS, "hotpotqa", "musique", "jsonl", "mixture", "general")
SPLITS = ("train", "val", "test")  # val: held out from the training side, for model selection


@dataclass(frozen=True)
class Sample:
    """One query: documents (in prompt order), the question and its acceptable answers.

    ``answers`` are alternatives: a prediction is scored against the best-matching one.
    ``meta`` holds at least ``dataset`` and ``split``; generators add e.g. ``target_slot``,
    ``needle_depth`` and ``needle_chunk``.
    """

    id: str
    documents: list[str]
    question: str
    answers: list[str]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready dict with the keys of the JSONL format (see :mod:`kvp.data.jsonl`)."""
        return {"id": self.id, "documents": list(self.documents), "question": self.question,
                "answers": list(self.answers), "meta": dict(self.meta)}


def seeded_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from the string ``"/".join(parts)``.

    String seeds go through SHA-512 inside ``random``, so the stream is the same on every machine
    and Python version >= 3.2, unlike ``hash()`` of a string (salted per process).
    """
    return random.Random("/".join(str(p) for p in parts))


def hash_split(name: str) -> str:
    """``"train"``, ``"val"`` or ``"test"``, fixed by the SHA-256 of an entity's name.

    Half of all names are test entities; of the other half, one in eight are validation entities
    (for checkpoint and recipe selection), the rest training entities. Every generator assigns the
    entities it writes documents about this way, so no entity appears in two splits.
    """
    digest = hashlib.sha256(name.encode()).digest()
    if digest[0] % 2:
        return "test"
    return "val" if digest[1] % 8 == 0 else "train"


def check_slots(num_docs: int, target_slot: int | None) -> None:
    """Raise ``ValueError`` unless ``num_docs >= 1`` and ``target_slot`` is None or an index of
    the ``num_docs`` slots (negative counts from the end)."""
    if num_docs < 1:
        raise ValueError(f"num_docs={num_docs} must be >= 1")
    if target_slot is not None and not -num_docs <= target_slot < num_docs:
        raise ValueError(f"target_slot={target_slot} is outside the {num_docs} slots; "
                         f"use None (uniform) or an index in [-{num_docs}, {num_docs - 1}]")


def check_count(n: int | None) -> int:
    """``n`` if it is a sample count a generator can draw (>= 0), else ``ValueError``."""
    if n is None or n < 0:
        raise ValueError(f"n={n!r}: a generated dataset needs a sample count n >= 0")
    return n


def check_split(split: str, allowed: tuple[str, ...] = SPLITS) -> str:
    """Return ``split`` if allowed, else raise ``ValueError`` naming the allowed splits."""
    if split not in allowed:
        raise ValueError(f"split={split!r} is not available here; use one of {list(allowed)}")
    return split


@cache
def resource_lines(name: str) -> tuple[str, ...]:
    """Non-empty stripped lines of the package resource ``resources/<name>``."""
    text = resources.files("kvp.data").joinpath("resources", name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@cache
def resource_text(name: str) -> str:
    """Full text of the package resource ``resources/<name>``."""
    return resources.files("kvp.data").joinpath("resources", name).read_text(encoding="utf-8")


def resource_json(name: str) -> dict:
    """The package resource ``resources/<name>`` parsed as JSON (a fresh object each call)."""
    return json.loads(resource_text(name))


def load_dataset(name: str, split: str = "test", n: int | None = 100, seed: int = 42,
                 **kw) -> list[Sample]:
    """Load ``n`` samples of dataset ``name`` for ``split`` with ``seed``.

    Args:
        name: one of ``DATASETS``.
        split: ``"train"``, ``"val"`` (held out from the training side, for checkpoint and
            recipe selection) or ``"test"`` (hub datasets map ``"test"`` to their validation split).
        n: number of samples; ``None`` means all (only for finite datasets: hub, jsonl).
        seed: sampling seed (the paper evaluates 100 test samples with seed 42;
            docs/protocol.md#datasets).
        **kw: options of the dataset's loader, e.g. ``num_docs=5`` (biography),
            ``context_tokens=2048`` (niah), ``path=...`` (hotpotqa, musique, jsonl),
            ``components={...}`` (mixture), ``holdout="tables"`` (general), ``hops=(2,)``
            (multihop).
    """
    # Each loader's module imports this package (Sample, seeded_rng): it is imported on first use.
    if name == "biography":
        from kvp.data.biography import generate_biography as loader
    elif name == "niah":
        from kvp.data.niah import generate_niah as loader
    elif name == "multihop":
        from kvp.data.multihop import generate_multihop as loader
    elif name in DOMAINS:
        from kvp.data.domains import domain_loader

        loader = domain_loader(name)
    elif name == "hotpotqa":
        from kvp.data.hotpotqa import load_hotpotqa as loader
    elif name == "musique":
        from kvp.data.musique import load_musique as loader
    elif name == "jsonl":
        from kvp.data.jsonl import load_jsonl_dataset as loader
    elif name == "mixture":
        from kvp.data.mixture import load_mixture as loader
    elif name == "general":
        from kvp.data.mixture import load_general as loader
    else:
        raise ValueError(f"unknown dataset {name!r}; use one of {list(DATASETS)}")
    return loader(split=split, n=n, seed=seed, **kw)


__all__ = ["DATASETS", "DOMAINS", "GENERATORS", "SPLITS", "Sample", "hash_split", "load_dataset",
           "seeded_rng"]
