"""Multi-hop generator: determinism, hop counts, every hop's document present, distractors, splits."""

from __future__ import annotations

from collections import Counter

import pytest

from kvp.data import SPLITS, hash_split, load_dataset
from kvp.data.multihop import CHAINS, DISTRACTORS


def test_same_seed_same_samples_and_different_seed_differs():
    a = load_dataset("multihop", "test", n=20, seed=3)
    assert a == load_dataset("multihop", "test", n=20, seed=3)
    assert a != load_dataset("multihop", "test", n=20, seed=4)
    assert load_dataset("multihop", "test", n=5, seed=3) == a[:5]


def test_hop_counts_and_chains():
    samples = load_dataset("multihop", "train", n=200, seed=0)
    counts = Counter((s.meta["chain"], s.meta["hops"]) for s in samples)
    assert set(counts) == {(c, h) for c in CHAINS for h in (2, 3)}
    assert all(25 <= c <= 75 for c in counts.values())
    for s in samples:
        assert len(s.meta["hop_docs"]) == s.meta["hops"] == len(s.meta["bridge"]) - 1
        assert len(set(s.meta["hop_docs"])) == s.meta["hops"]
    two = load_dataset("multihop", "test", n=20, seed=0, hops=(2,), num_docs=4)
    assert {s.meta["hops"] for s in two} == {2} and {len(s.documents) for s in two} == {4}
    assert {s.meta["hops"] for s in load_dataset("multihop", "test", n=10, hops=[3])} == {3}


def test_every_hop_has_its_document_and_no_document_skips_a_hop():
    for s in load_dataset("multihop", "test", n=150, seed=5):
        bridge, slots = s.meta["bridge"], s.meta["hop_docs"]
        assert s.answers == [bridge[-1]] and bridge[0] in s.question
        for i, slot in enumerate(slots):  # document i links entity i to entity i + 1
            assert bridge[i] in s.documents[slot] and bridge[i + 1] in s.documents[slot]
            assert s.meta["subjects"][slot] in bridge[i:i + 2]
        for i, slot in enumerate(slots[1:], start=1):  # a later hop's document does not name
            assert bridge[i - 1] not in s.documents[slot]  # the entity before its own link
        assert s.answers[0] in s.documents[slots[-1]]


def test_distractors_share_an_entity_with_the_chain():
    kinds = Counter()
    for s in load_dataset("multihop", "test", n=100, seed=6):
        needed = [s.documents[i] for i in s.meta["hop_docs"]]
        slots = s.meta["distractor_docs"]
        assert sorted(slots + s.meta["hop_docs"]) == list(range(len(s.documents)))
        assert len(slots) == len(s.meta["distractors"]) == len(s.documents) - s.meta["hops"]
        for slot, shared in zip(slots, s.meta["shared"]):
            assert shared in s.documents[slot] and any(shared in d for d in needed)
            assert s.meta["subjects"][slot] not in s.meta["bridge"]
        kinds.update(s.meta["distractors"])
    assert set(kinds) == set(DISTRACTORS)


def test_entities_of_the_three_splits_are_disjoint():
    subjects = {split: {x for s in load_dataset("multihop", split, n=60, seed=1)
                        for x in s.meta["subjects"]} for split in SPLITS}
    assert not subjects["train"] & subjects["test"]
    assert not subjects["val"] & (subjects["train"] | subjects["test"])
    for split in SPLITS:
        assert all(hash_split(x) == split for x in subjects[split])


@pytest.mark.parametrize("kw, match", [(dict(hops=(4,)), "hops"), (dict(hops=()), "hops"),
                                       (dict(num_docs=2), "num_docs=2")])
def test_bad_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("multihop", "test", n=1, **kw)
