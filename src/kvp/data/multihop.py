"""Multi-hop questions over companies, people and universities (docs/protocol.md#datasets).

Our offline stand-in for MuSiQue: every question needs two or three documents, each linking one
entity to the next, and no single document answers it. Two chains (``CHAINS``):

* ``founder`` — company -> founder (company document) -> university (founder's document)
  [-> the university's city (university document)]: "Where did the founder of X study?";
* ``employee`` — person -> employer (person document) -> headquarters city (company document),
  or, with three hops, -> the company's founder (company document) -> university (founder's
  document): "Which university did the founder of the company that P works for attend?".

A document describes one entity in shuffled paraphrased facts (``resources/multihop.json``); the
founder's own document never names the company, so the company-to-founder link is only in the
company's document. The other ``num_docs - hops`` documents are distractors that share an entity
with the chain (``DISTRACTORS``): a colleague working at the chain's company, another graduate of
its university, a company headquartered in one of its cities, a university in one of its cities.
They never change the answer. Documents are in random order; ``meta`` records ``hops``, ``chain``,
``hop_docs`` (the needed documents' slots in hop order), ``bridge`` (anchor, linked entities,
answer), each document's ``subjects`` and ``kinds``, and per distractor (``distractors``: its
kind) its slot (``distractor_docs``) and the chain entity it ``shared``.

Facts hold within a sample (entities are drawn per sample); every person, company and university
with a document is an entity of the sample's split by :func:`kvp.data.hash_split` of its name, so
the splits share no such entity.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

from kvp.data import (Sample, check_count, check_split, hash_split, resource_json,
                      resource_lines, seeded_rng)

HOPS = (2, 3)
CHAINS = ("founder", "employee")
DISTRACTORS = ("colleague", "alumnus", "rival_company", "sister_university")


@dataclass(frozen=True)
class MultihopConfig:
    """Options of :func:`generate_multihop`.

    Attributes:
        num_docs: documents per sample: the ``hops`` needed ones plus distractors.
        hops: hop counts to draw from, uniformly (a subset of ``HOPS``).
    """

    num_docs: int = 5
    hops: tuple[int, ...] = HOPS

    def __post_init__(self):
        object.__setattr__(self, "hops", tuple(self.hops))
        if not self.hops or any(h not in HOPS for h in self.hops):
            raise ValueError(f"hops={list(self.hops)}: use a non-empty subset of {list(HOPS)}")
        if self.num_docs < max(self.hops):
            raise ValueError(f"num_docs={self.num_docs} cannot hold a {max(self.hops)}-hop chain; "
                             f"use num_docs >= {max(self.hops)}")


@dataclass
class Doc:
    """One document to write: its kind (company, person, university), subject and facts."""

    kind: str
    subject: str
    facts: dict[str, str | int]


@cache
def resource() -> dict:
    return resource_json("multihop.json")


class World:
    """The entities of one sample: fresh names of one split, never reused within the sample."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split, self.used = rng, split, set()

    def fresh(self, draw) -> str:
        while True:
            name = draw()
            if hash_split(name) == self.split and name not in self.used:
                self.used.add(name)
                return name

    def person(self) -> str:
        first, last = resource_lines("first_names.txt"), resource_lines("last_names.txt")
        return self.fresh(lambda: f"{self.rng.choice(first)} {self.rng.choice(last)}")

    def company(self) -> str:
        names = resource()["company_names"]
        return self.fresh(lambda: f"{self.rng.choice(names['prefix'])} "
                                  f"{self.rng.choice(names['suffix'])}")

    def university(self) -> str:
        names = resource()["university_names"]
        return self.fresh(lambda: self.rng.choice(names["format"]).format(
            self.rng.choice(names["place"])))

    def city(self) -> str:
        return self.rng.choice(resource_lines("cities.txt"))

    def year(self) -> int:
        return self.rng.randint(*resource()["years"])

    # one document per kind; ``facts`` override or drop (None) the drawn ones
    def company_doc(self, name: str, **facts) -> Doc:
        drawn = {"founder": self.person(), "hq": self.city(),
                 "industry": self.rng.choice(resource()["industry"]), "year": self.year()}
        return Doc("company", name, without_none({**drawn, **facts}))

    def person_doc(self, name: str, **facts) -> Doc:
        drawn = {"employer": self.company(), "university": self.university(),
                 "home": self.city(), "profession": self.rng.choice(resource()["profession"])}
        return Doc("person", name, without_none({**drawn, **facts}))

    def university_doc(self, name: str, **facts) -> Doc:
        drawn = {"city": self.city(), "year": self.year(),
                 "field": self.rng.choice(resource()["field"])}
        return Doc("university", name, without_none({**drawn, **facts}))


def without_none(facts: dict) -> dict:
    return {k: v for k, v in facts.items() if v is not None}


def chain_docs(world: World, chain: str, hops: int) -> tuple[list[Doc], list[str]]:
    """The needed documents in hop order and the bridge (anchor, linked entities, answer)."""
    if chain == "founder":
        company, founder, university = world.company(), world.person(), world.university()
        docs = [world.company_doc(company, founder=founder),
                world.person_doc(founder, university=university, employer=None)]
        bridge = [company, founder, university]
        if hops == 3:
            city = world.city()
            docs.append(world.university_doc(university, city=city))
            bridge.append(city)
        return docs, bridge
    person, company = world.person(), world.company()
    docs = [world.person_doc(person, employer=company)]
    if hops == 2:
        city = world.city()
        return docs + [world.company_doc(company, hq=city)], [person, company, city]
    founder, university = world.person(), world.university()
    docs += [world.company_doc(company, founder=founder),
             world.person_doc(founder, university=university, employer=None)]
    return docs, [person, company, founder, university]


def distractor_doc(world: World, kind: str, chain: list[Doc]) -> tuple[Doc, str]:
    """A document about a fresh entity, and the entity of the chain's documents it shares."""
    rng = world.rng
    facts = [(d, k, v) for d in chain for k, v in d.facts.items()]
    companies = [d.subject for d in chain if d.kind == "company"] + \
        [v for d, k, v in facts if k == "employer"]
    universities = [d.subject for d in chain if d.kind == "university"] + \
        [v for d, k, v in facts if k == "university"]
    cities = [v for d, k, v in facts if k in ("hq", "home", "city")]
    if kind == "colleague":
        shared = rng.choice(companies)
        return world.person_doc(world.person(), employer=shared), shared
    if kind == "alumnus":
        shared = rng.choice(universities)
        return world.person_doc(world.person(), university=shared), shared
    shared = rng.choice(cities)
    if kind == "rival_company":
        return world.company_doc(world.company(), hq=shared), shared
    return world.university_doc(world.university(), city=shared), shared


def render(doc: Doc, rng: random.Random) -> str:
    """The document: one randomly chosen paraphrase per fact, in shuffled order."""
    templates = resource()["facts"][doc.kind]
    keys = list(doc.facts)
    rng.shuffle(keys)
    return " ".join(rng.choice(templates[k]).format(subject=doc.subject, value=doc.facts[k])
                    for k in keys)


def make_sample(split: str, seed: int, index: int, config: MultihopConfig) -> Sample:
    """Sample ``index`` of the stream ``(split, seed)``; independent of how many are drawn."""
    rng = seeded_rng("multihop", split, seed, index)
    world = World(rng, split)
    hops = rng.choice(config.hops)
    chain = rng.choice(CHAINS)
    needed, bridge = chain_docs(world, chain, hops)
    kinds = []
    while len(kinds) < config.num_docs - hops:  # each round uses every distractor kind once
        kinds += rng.sample(DISTRACTORS, len(DISTRACTORS))
    distractors = [distractor_doc(world, k, needed) for k in kinds[:config.num_docs - hops]]
    docs = needed + [doc for doc, _ in distractors]
    order = rng.sample(range(len(docs)), len(docs))  # order[slot] = index into docs
    question = rng.choice(resource()["question"][f"{chain}/{hops}"]).format(anchor=bridge[0])
    return Sample(
        id=f"multihop-{split}-{seed}-{index}",
        documents=[render(docs[i], rng) for i in order], question=question,
        answers=[str(bridge[-1])],
        meta={"dataset": "multihop", "split": split, "hops": hops, "chain": chain,
              "hop_docs": [order.index(i) for i in range(hops)],
              "bridge": [str(b) for b in bridge],
              "subjects": [docs[i].subject for i in order], "kinds": [docs[i].kind for i in order],
              "distractors": kinds[:config.num_docs - hops],
              "distractor_docs": [order.index(hops + j) for j in range(len(distractors))],
              "shared": [shared for _, shared in distractors], "num_docs": config.num_docs})


def generate_multihop(split: str = "test", n: int | None = 100, seed: int = 42,
                      **options) -> list[Sample]:
    """``n`` multi-hop samples of ``split`` for ``seed``; ``options`` are the fields of
    :class:`MultihopConfig` (``num_docs``, ``hops``). Sample ``i`` depends only on
    (split, seed, i, options)."""
    check_split(split)
    check_count(n)
    config = MultihopConfig(**options)
    return [make_sample(split, seed, i, config) for i in range(n)]
