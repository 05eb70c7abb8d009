"""The committed test sets under data/ regenerate byte for byte."""

from __future__ import annotations

from pathlib import Path

from kvp.data import load_dataset
from kvp.data.frozen import FROZEN, regenerate

DATA = Path(__file__).resolve().parents[1] / "data"


def test_regeneration_is_byte_identical(tmp_path):
    for path in regenerate(tmp_path):
        rel = path.relative_to(tmp_path)
        assert path.read_bytes() == (DATA / rel).read_bytes(), f"data/{rel} is stale"


def test_frozen_files_load_and_have_100_samples():
    for rel, (name, _) in FROZEN.items():
        samples = load_dataset("jsonl", path=DATA / rel)
        assert len(samples) == 100 and {s.meta["dataset"] for s in samples} == {name}


def test_every_generator_has_a_frozen_test_copy():
    from kvp.data import GENERATORS

    assert sorted({name for name, _ in FROZEN.values()}) == sorted(GENERATORS)
