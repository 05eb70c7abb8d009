"""Biography generator: determinism, train/test disjointness, uniform target slot, options."""

from __future__ import annotations

from collections import Counter

import pytest

from kvp.data import load_dataset, resource_json, resource_lines
from kvp.data.biography import ATTRIBUTES, make_person, person_split, value_text


def test_same_seed_same_samples_and_different_seed_differs():
    a = load_dataset("biography", "test", n=20, seed=3)
    assert a == load_dataset("biography", "test", n=20, seed=3)
    assert a != load_dataset("biography", "test", n=20, seed=4)
    assert load_dataset("biography", "test", n=5, seed=3) == a[:5]  # prefix property


def test_known_sample_is_stable_across_machines():
    # pins the generator: a change here changes the frozen data/ files too
    s = load_dataset("biography", "test", n=1, seed=42)[0]
    assert (s.id, s.question, s.answers) == (
        "biography-test-42-0", "What is the birthplace of Fernanda Estrada?", ["Sofia"])


def test_train_val_and_test_people_are_disjoint():
    splits = ("train", "val", "test")
    names = {split: {name for s in load_dataset("biography", split, n=150, seed=1)
                     for name in s.meta["names"]} for split in splits}
    assert not names["train"] & names["test"]
    assert not names["val"] & (names["train"] | names["test"])
    for split in splits:
        assert all(person_split(name) == split for name in names[split])
    # all first x last names: half test; of the other half one in eight are validation people
    first, last = resource_lines("first_names.txt"), resource_lines("last_names.txt")
    pairs = [f"{f} {g}" for f in first for g in last]
    share = {split: sum(person_split(p) == split for p in pairs) / len(pairs) for split in splits}
    assert 0.48 < share["test"] < 0.52
    assert 0.05 < share["val"] < 0.075


def test_documents_are_distinct_people_in_slot_order():
    for s in load_dataset("biography", "test", n=30, seed=2, num_docs=4):
        assert len(s.documents) == len(set(s.meta["names"])) == 4
        assert all(doc.count(name) >= 6 for doc, name in zip(s.documents, s.meta["names"]))
        assert s.meta["names"][s.meta["target_slot"]] == s.meta["target_name"]


def test_target_document_states_the_answer_and_slot_is_recorded():
    for s in load_dataset("biography", "test", n=50, seed=5):
        target = s.documents[s.meta["target_slot"]]
        person = make_person(s.meta["target_name"])
        assert value_text(person, s.meta["attribute"]) in target
        assert s.answers[0] == value_text(person, s.meta["attribute"])
        others = [d for i, d in enumerate(s.documents) if i != s.meta["target_slot"]]
        assert all(s.meta["target_name"] not in d for d in others)


def test_target_slot_is_uniform():
    n, k = 1000, 5
    samples = load_dataset("biography", "train", n=n, seed=0, num_docs=k)
    counts = Counter(s.meta["target_slot"] for s in samples)
    expected = n / k
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(k))
    assert chi2 < 13.28  # chi-square, 4 degrees of freedom, p = 0.01


def test_forced_slot_and_longer_documents():
    last = load_dataset("biography", "test", n=10, seed=1, num_docs=3, target_slot=-1)
    assert {s.meta["target_slot"] for s in last} == {2}
    base = load_dataset("biography", "test", n=40, seed=1)
    long = load_dataset("biography", "test", n=40, seed=1, doc_length_factor=2)
    ratio = sum(len(d) for s in long for d in s.documents) / sum(len(d) for s in base for d in s.documents)
    assert 1.7 < ratio < 2.3


def test_birth_date_answers_have_variants():
    samples = load_dataset("biography", "test", n=100, seed=9)
    s = next(s for s in samples if s.meta["attribute"] == "birth_date")
    assert len(s.answers) == 3 and any("-" in a for a in s.answers)


def test_resources_are_rich_enough():
    templates = resource_json("biography_templates.json")
    for attr in ATTRIBUTES:
        assert len(templates["document"][attr]) >= 5 and len(templates["question"][attr]) >= 3
    for name, minimum in [("first_names.txt", 200), ("last_names.txt", 200), ("cities.txt", 100),
                          ("universities.txt", 60), ("majors.txt", 50), ("companies.txt", 80)]:
        lines = resource_lines(name)
        assert len(lines) >= minimum and len(set(lines)) == len(lines), name


@pytest.mark.parametrize("kw, match", [(dict(num_docs=0), "num_docs"), (dict(target_slot=5), "target_slot"),
                                       (dict(doc_length_factor=0.5), "doc_length_factor"),
                                       (dict(attributes=("age",)), "attributes")])
def test_bad_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("biography", "test", n=1, seed=0, **kw)


def test_bad_split_and_unknown_dataset():
    with pytest.raises(ValueError, match="'train', 'val', 'test'"):
        load_dataset("biography", "dev", n=1)
    with pytest.raises(ValueError, match="biography.*niah.*hotpotqa.*musique.*jsonl.*mixture"):
        load_dataset("squad")
