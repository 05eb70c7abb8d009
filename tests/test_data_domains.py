"""The five generated kinds of document: determinism, disjoint splits, answerable questions, layouts."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from kvp.data import DOMAINS, SPLITS, hash_split, load_dataset
from kvp.data.domains import DOMAIN_CLASSES, domain

pytestmark = pytest.mark.parametrize("name", DOMAINS)


def test_same_seed_same_samples_and_different_seed_differs(name):
    a = load_dataset(name, "test", n=12, seed=3)
    assert a == load_dataset(name, "test", n=12, seed=3)
    assert a != load_dataset(name, "test", n=12, seed=4)
    assert load_dataset(name, "test", n=4, seed=3) == a[:4]  # prefix property
    assert [s.id for s in a[:2]] == [f"{name}-test-3-0", f"{name}-test-3-1"]


def test_entities_of_the_three_splits_are_disjoint(name):
    names = {split: {n for s in load_dataset(name, split, n=60, seed=1) for n in s.meta["names"]}
             for split in SPLITS}
    assert not names["train"] & names["test"]
    assert not names["val"] & (names["train"] | names["test"])
    for split in SPLITS:
        assert all(hash_split(n) == split for n in names[split])


def test_every_question_is_answerable_from_its_target_document_only(name):
    for s in load_dataset(name, "test", n=60, seed=5):
        slot = s.meta["target_slot"]
        target = s.documents[slot]
        assert s.answers[0] in target and s.meta["names"][slot] == s.meta["target_name"]
        assert s.meta["target_name"] in target and s.meta["target_name"] in s.question
        others = [d for i, d in enumerate(s.documents) if i != slot]
        assert all(s.meta["target_name"] not in d for d in others)  # no name inside another
        assert len(set(s.meta["names"])) == len(s.documents) == 5
        # the answer is one entity's fact: it is what the target entity holds for the attribute
        assert s.answers == domain(name).entity(s.meta["target_name"]).answers[s.meta["attribute"]]


def test_target_slot_options_and_bad_options_are_named(name):
    last = load_dataset(name, "test", n=6, seed=1, num_docs=3, target_slot=-1)
    assert {s.meta["target_slot"] for s in last} == {2} and {len(s.documents) for s in last} == {3}
    slots = Counter(s.meta["target_slot"] for s in load_dataset(name, "train", n=200, seed=0))
    assert set(slots) == set(range(5))
    with pytest.raises(ValueError, match="target_slot=7"):
        load_dataset(name, "test", n=1, num_docs=3, target_slot=7)
    with pytest.raises(ValueError, match="num_docs=0"):
        load_dataset(name, "test", n=1, num_docs=0)
    with pytest.raises(ValueError, match="n=-1"):
        load_dataset(name, "test", n=-1)


def test_every_field_is_asked_and_resources_vary(name):
    samples = load_dataset(name, "train", n=300, seed=2)
    data = domain(name).data
    asked = {s.meta["attribute"] for s in samples}
    if name == "tables":
        assert {a.split("/")[0] for a in asked} == set(data["metrics"])
        assert all(len(m["question"]) >= 2 and len(m["header"]) >= 3
                   for m in data["metrics"].values())
    else:
        assert asked == set(data["question"])
        assert all(len(q) >= 2 for q in data["question"].values())
    assert all(len(p) >= 2 for p in data.get("sentence", {}).values())
    assert all(len(part) == len(set(part)) >= 10 for part in data["names"]["parts"][:2])
    lengths = [len(d) for s in samples for d in s.documents]
    assert max(lengths) > 1.5 * min(lengths)  # varied lengths within a kind


def test_registry_follows_the_dataset_names(name):
    assert tuple(DOMAIN_CLASSES) == DOMAINS and domain(name).name == name


def test_each_kind_has_its_layouts(name):
    docs = [d for s in load_dataset(name, "test", n=40, seed=0) for d in s.documents]
    if name == "products":  # a spec sheet (one labelled line per field) or a paragraph
        layouts = {"sheet" if d.count("\n") >= 6 else "prose" for d in docs}
    elif name == "events":  # headline over a report, or a bulletin
        layouts = {"bulletin" if d.count("\n") >= 6 else "report" for d in docs}
    elif name == "abstracts":
        layouts = {"sections" if "Results: " in d else "plain" for d in docs}
    elif name == "tables":
        layouts = {"pipe" if "| ---" in d else "csv" if re.search(r"^Month,", d, re.M)
                   else "aligned" for d in docs}
    else:
        layouts = {"docstring" if "def " in d else "manpage" if d.startswith("NAME")
                   else "markdown" for d in docs}
    assert len(layouts) == {"tables": 3, "codedocs": 3}.get(name, 2)
