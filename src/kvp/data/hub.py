"""Shared loading for the hub QA datasets (HotpotQA, MuSiQue): hub or local copy, selection.

``load_records`` reads either a local copy (``.json`` list or JSON lines, ``.jsonl``,
``.parquet``; the original schema) or the hub through ``datasets.load_dataset``. Without network
access it fails at once with an error saying how to point the loader at a local copy; the
``datasets`` library alone would retry for about half a minute first.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from kvp.data import check_split, seeded_rng

HUB_SPLITS = ("train", "test", "validation")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


class DatasetUnavailableError(RuntimeError):
    """The dataset cannot be downloaded here and no local copy was given."""


def hub_split(split: str) -> str:
    """The hub split for ``split``: ``"test"`` means ``"validation"`` (docs/protocol.md#datasets).
    """
    check_split(split, HUB_SPLITS)
    return "validation" if split == "test" else split


def read_local(path: str | Path) -> list[dict]:
    """Records of a local copy: a JSON list, JSON lines, or a parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r} is not a file; give a local copy of the "
                                f"dataset as {', '.join(LOCAL_SUFFIXES)}")
    if path.suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"path={str(path)!r} has suffix {path.suffix!r}; use one of "
                         f"{list(LOCAL_SUFFIXES)} in the dataset's original schema")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def offline_mode() -> bool:
    """True when the user asked the hub libraries to work from their cache only."""
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (``$HF_ENDPOINT``) opens within ``timeout``."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def unavailable(hub_id: str, loader: str, reason: str) -> DatasetUnavailableError:
    """The error for a hub dataset that cannot be loaded, with how to use a local copy."""
    return DatasetUnavailableError(
        f"dataset {hub_id!r} cannot be downloaded here ({reason}). Download it where the hub is "
        f"reachable and point the loader at the local copy, e.g. "
        f"load_dataset({loader!r}, split='test', path='{loader}_validation.jsonl') "
        f"(json, jsonl or parquet in the original schema); or, with the dataset already in the "
        f"local cache of the datasets library, set HF_DATASETS_OFFLINE=1")


def load_records(hub_id: str, config: str | None, split: str, loader: str,
                 path: str | Path | None = None) -> list[dict]:
    """Records of ``hub_id`` (``config``, hub ``split``), or of the local copy at ``path``."""
    if path is not None:
        return read_local(path)
    if not offline_mode() and not hub_reachable():
        raise unavailable(hub_id, loader, "the hub is not reachable")
    import datasets

    try:
        return list(datasets.load_dataset(hub_id, config, split=split))
    except (ConnectionError, OSError, FileNotFoundError) as err:
        raise unavailable(hub_id, loader, f"{type(err).__name__}: {err}") from err


def select(records: list, n: int | None, seed: int, name: str) -> list:
    """``n`` records drawn without replacement by ``seed`` (all, in order, when ``n`` is None)."""
    if n is None:
        return list(records)
    if n < 0:
        raise ValueError(f"n={n} must be >= 0 (or None for all)")
    rng = seeded_rng(name, seed)
    return [records[i] for i in rng.sample(range(len(records)), min(n, len(records)))]


def clean_answers(answers: list) -> list[str]:
    """Answers stripped of surrounding whitespace, empty ones and duplicates dropped, order kept."""
    out: list[str] = []
    for answer in answers:
        answer = str(answer).strip()
        if answer and answer not in out:
            out.append(answer)
    return out
