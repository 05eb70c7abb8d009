"""HotpotQA / MuSiQue on fixture files, offline errors, the JSONL validator, mixtures (and the
general one), JSONL round trips of the generators."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from kvp.data import Sample, load_dataset
from kvp.data.hub import DatasetUnavailableError
from kvp.data.jsonl import JsonlError, write_jsonl
from kvp.data.mixture import component_counts

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["hotpotqa_original.json", "hotpotqa_hub.jsonl"])
def test_hotpotqa_both_schemas(name):
    samples = load_dataset("hotpotqa", "test", n=None, path=FIXTURES / name)
    assert samples and all(s.meta["dataset"] == "hotpotqa" for s in samples)
    first = samples[0]
    assert first.documents[0].split("\n")[0] in (
        "Lindenfeld Observatory", "Glass Harbour")  # title line, then the paragraph
    assert all("\n" in d and not d.endswith(" ") for d in first.documents)
    assert first.meta["supporting_slots"] == [0, 1]


def test_hotpotqa_answers_are_stripped_and_selection_is_seeded():
    samples = load_dataset("hotpotqa", "test", n=None, path=FIXTURES / "hotpotqa_hub.jsonl")
    assert samples[0].answers == ["1874"]
    a = load_dataset("hotpotqa", "test", n=2, seed=1, path=FIXTURES / "hotpotqa_hub.jsonl")
    assert len(a) == 2 and a == load_dataset("hotpotqa", "test", n=2, seed=1,
                                             path=FIXTURES / "hotpotqa_hub.jsonl")


def test_musique_aliases_and_unanswerable_skipped():
    samples = load_dataset("musique", "test", n=None, path=FIXTURES / "musique_dev.jsonl")
    assert [s.id for s in samples] == ["2hop__100_200", "2hop__300_400"]
    assert samples[0].answers == ["Tarvik", "Tarvik town"]
    assert samples[0].meta["supporting_slots"] == [1, 2] and samples[0].meta["hops"] == 2


def test_parquet_copy_reads_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in (FIXTURES / "musique_dev.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    assert (load_dataset("musique", "test", n=None, path=tmp_path / "m.parquet")
            == load_dataset("musique", "test", n=None, path=FIXTURES / "musique_dev.jsonl"))


@pytest.mark.parametrize("name", ["hotpotqa", "musique"])
def test_offline_failure_is_fast_and_says_how_to_fix(name, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match=r"cannot be downloaded here.*path="):
        load_dataset(name, "test", n=5)
    assert time.perf_counter() - start < 20


def test_local_copy_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_dataset("hotpotqa", path=tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.csv"):
        load_dataset("musique", path=tmp_path / "x.csv")


def test_jsonl_validator_reports_every_line_and_field():
    with pytest.raises(JsonlError) as info:
        load_dataset("jsonl", path=FIXTURES / "bad_samples.jsonl")
    reported = {(p.line, p.field) for p in info.value.problems}
    assert reported == {(2, "documents"), (3, "question"), (3, "answers"), (4, None), (6, "id"),
                        (7, "id"), (7, "answer"), (7, "documents"), (8, None), (9, "meta")}
    message = str(info.value)
    assert "line 7, field 'answer'" in message and "no samples loaded" in message


def test_jsonl_round_trip(tmp_path):
    samples = load_dataset("biography", "test", n=3, seed=0)
    write_jsonl(samples, tmp_path / "b.jsonl")
    assert load_dataset("jsonl", path=tmp_path / "b.jsonl", n=None) == samples
    assert load_dataset("jsonl", path=tmp_path / "b.jsonl", n=2) == samples[:2]
    plain = tmp_path / "p.jsonl"
    plain.write_text(json.dumps({"id": "a", "documents": ["d"], "question": "q", "answers": ["x"]}) + "\n")
    assert load_dataset("jsonl", "test", n=1, path=plain)[0] == Sample("a", ["d"], "q", ["x"],
                                                                    {"dataset": "jsonl", "split": "test"})
    with pytest.raises(ValueError, match="path="):
        load_dataset("jsonl")


def write_lines(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {"id": "a", "documents": ["d"], "question": "q", "answers": ["x"]}


def test_jsonl_refuses_blank_text_empty_files_and_unknown_keys(tmp_path):
    path = write_lines(tmp_path / "blank.jsonl", {**GOOD, "documents": ["fine", "  \n"]},
                       {**GOOD, "id": "b", "answers": [" "]}, {**GOOD, "id": "c", "source": "web"})
    with pytest.raises(JsonlError) as info:
        load_dataset("jsonl", path=path, n=None)
    assert [str(p) for p in info.value.problems] == [
        "line 1, field 'documents': documents[1] is empty or whitespace only",
        "line 2, field 'answers': answers[0] is empty or whitespace only",
        "line 3, field 'source': unknown field; allowed: ['id', 'documents', 'question', "
        "'answers', 'meta']"]
    for text in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(JsonlError, match="holds no samples"):
            load_dataset("jsonl", path=tmp_path / "empty.jsonl", n=None)


def test_jsonl_n_beyond_the_file_is_an_error(tmp_path):
    path = write_lines(tmp_path / "two.jsonl", GOOD, {**GOOD, "id": "b"})
    assert len(load_dataset("jsonl", path=path, n=2)) == 2
    with pytest.raises(ValueError, match="n=3 but .*two.jsonl holds 2 samples; pass n <= 2"):
        load_dataset("jsonl", path=path, n=3)


def test_validate_command(tmp_path, capsys):
    from kvp.data.__main__ import main

    good = write_lines(tmp_path / "good.jsonl", GOOD, {**GOOD, "id": "b", "documents": ["x", "y"]})
    assert main(["validate", str(good)]) == 0
    assert "holds 2 samples with 3 documents" in capsys.readouterr().out
    assert main(["validate", str(FIXTURES / "bad_samples.jsonl")]) == 1
    assert "line 7, field 'answer'" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "none.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_mixture_counts_determinism_and_split():
    kw = dict(components={"biography": 6, "niah": 4}, options={"niah": {"context_tokens": 256,
                                                                        "chunk_chars": 400}})
    mix = load_dataset("mixture", "train", n=None, seed=3, **kw)
    assert sorted(s.meta["dataset"] for s in mix) == ["biography"] * 6 + ["niah"] * 4
    assert all(s.meta["split"] == "train" for s in mix)
    assert mix == load_dataset("mixture", "train", n=None, seed=3, **kw)
    assert mix != load_dataset("mixture", "train", n=None, seed=4, **kw)
    with pytest.raises(ValueError, match="split='train'"):
        load_dataset("mixture", "test", n=None, **kw)
    with pytest.raises(ValueError, match="squad"):
        load_dataset("mixture", "train", n=None, components={"squad": 3})


def test_mixture_weights_round_to_the_total():
    assert component_counts({"a": 1.0, "b": 2.0}, 10) == {"a": 3, "b": 7}
    assert component_counts({"biography": 64, "niah": 128}, None) == {"biography": 64, "niah": 128}
    with pytest.raises(ValueError, match="weights"):
        component_counts({"a": 0.5}, None)


SMALL_NIAH = {"niah": {"context_tokens": 256, "chunk_chars": 400}}


def test_general_mixture_holds_every_generator_but_the_held_out_one():
    from kvp.data import GENERATORS

    mix = load_dataset("general", "train", n=29, seed=1, holdout="tables", options=SMALL_NIAH)
    counts = Counter(s.meta["dataset"] for s in mix)
    assert set(counts) == set(GENERATORS) - {"tables"}
    assert sorted(counts.values()) == [4] * 6 + [5]  # equal shares of n
    assert all(s.meta["split"] == "train" for s in mix)
    assert mix == load_dataset("general", "train", n=29, seed=1, holdout="tables",
                               options=SMALL_NIAH)
    val = load_dataset("general", "val", n=7, seed=1, holdout="multihop", options=SMALL_NIAH)
    assert {s.meta["split"] for s in val} == {"val"} and "multihop" not in {
        s.meta["dataset"] for s in val}
    with pytest.raises(ValueError, match="holdout='squad'.*biography.*codedocs"):
        load_dataset("general", "train", n=7, holdout="squad")
    with pytest.raises(ValueError, match="holdout=..."):
        load_dataset("general", "train", n=7)
    with pytest.raises(ValueError, match="held-out generator 'niah'"):
        load_dataset("general", "train", n=7, holdout="niah", options=SMALL_NIAH)


def test_trained_on_names_what_a_wrapper_has_seen():
    from kvp.data.mixture import trained_on

    assert trained_on("biography", {}) == {"biography"}
    assert trained_on("mixture", {"components": {"biography": 3, "niah": 2}}) == {
        "mixture", "biography", "niah"}
    seen = trained_on("general", {"holdout": "events"})
    assert "events" not in seen and {"products", "multihop", "niah"} <= seen


@pytest.mark.parametrize("name", ["multihop", "products", "events", "abstracts", "tables",
                                  "codedocs"])
def test_generated_samples_round_trip_through_jsonl(name, tmp_path):
    samples = load_dataset(name, "test", n=5, seed=2)
    write_jsonl(samples, tmp_path / "x.jsonl")
    assert load_dataset("jsonl", "test", n=None, path=tmp_path / "x.jsonl") == samples
