"""Synthetic biographies: one document per person, a question about one attribute.

See docs/protocol.md#datasets.

Every person has six attributes (``ATTRIBUTES``). A person's attributes are a pure function of
the full name, so the same name always describes the same life; the name also fixes the person's
split (a SHA-256 of the name: half test, the other half train with one in eight held out as
validation people), so no person appears in two splits.

A sample draws ``num_docs`` distinct people of its split; the target person's document goes to a
uniformly random slot (recorded in ``meta["target_slot"]``) unless ``target_slot`` forces one.
Each document states every attribute once, in one randomly chosen paraphrase each; with
``doc_length_factor`` > 1, filler sentences about hobbies and habits make it longer.
"""

from __future__ import annotations

import calendar
import datetime
import random
from dataclasses import dataclass
from functools import cache

from kvp.data import (Sample, check_count, check_slots, check_split, hash_split, resource_json,
                      resource_lines, seeded_rng)

ATTRIBUTES = ("birth_date", "birth_place", "current_location", "university", "major", "company")
BIRTH_YEARS = (1950, 2002)


@dataclass(frozen=True)
class Person:
    """A synthetic person; ``birth_date`` is a ``datetime.date``, the rest are strings."""

    name: str
    birth_date: datetime.date
    birth_place: str
    current_location: str
    university: str
    major: str
    company: str


@dataclass(frozen=True)
class BiographyConfig:
    """Options of :func:`generate_biography`.

    Attributes:
        num_docs: documents per sample (one per person, all distinct).
        target_slot: force the target document into this slot (negative counts from the end,
            e.g. -1 = last); ``None`` places it uniformly at random.
        doc_length_factor: >= 1; documents get ``round((f - 1) * 6)`` extra filler sentences, so
            2 makes them about twice as long.
        attributes: the attributes questions may ask about.
    """

    num_docs: int = 5
    target_slot: int | None = None
    doc_length_factor: float = 1.0
    attributes: tuple[str, ...] = ATTRIBUTES

    def __post_init__(self):
        check_slots(self.num_docs, self.target_slot)
        if self.doc_length_factor < 1:
            raise ValueError(f"doc_length_factor={self.doc_length_factor} must be >= 1 "
                             "(1 = six attribute sentences, 2 = about twice as long)")
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown or not self.attributes:
            raise ValueError(f"attributes={list(self.attributes)}: use a non-empty subset of "
                             f"{list(ATTRIBUTES)}")


# --------------------------------------------------------------------------- people
def person_split(name: str) -> str:
    """``"train"``, ``"val"`` or ``"test"`` of the person called ``name`` (:func:`hash_split`)."""
    return hash_split(name)


@cache
def make_person(name: str) -> Person:
    """The person called ``name``: attributes drawn from a generator seeded by the name."""
    rng = seeded_rng("biography-person", name)
    year = rng.randint(*BIRTH_YEARS)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    birth_place, current_location = rng.sample(resource_lines("cities.txt"), 2)
    return Person(name=name, birth_date=datetime.date(year, month, day), birth_place=birth_place,
                  current_location=current_location,
                  university=rng.choice(resource_lines("universities.txt")),
                  major=rng.choice(resource_lines("majors.txt")),
                  company=rng.choice(resource_lines("companies.txt")))


def sample_people(rng: random.Random, split: str, k: int) -> list[Person]:
    """``k`` distinct people of ``split``, drawn by rejection from first x last name pairs."""
    first, last = resource_lines("first_names.txt"), resource_lines("last_names.txt")
    names: list[str] = []
    while len(names) < k:
        name = f"{rng.choice(first)} {rng.choice(last)}"
        if person_split(name) == split and name not in names:
            names.append(name)
    return [make_person(name) for name in names]


# --------------------------------------------------------------------------- text
def format_date(date: datetime.date) -> str:
    """The date as written in documents, e.g. ``"March 4, 1987"``."""
    return f"{calendar.month_name[date.month]} {date.day}, {date.year}"


def date_variants(date: datetime.date) -> list[str]:
    """Acceptable answers for a date: as written in documents, day first, and ISO."""
    return [format_date(date), f"{date.day} {calendar.month_name[date.month]} {date.year}",
            date.isoformat()]


def answer_variants(person: Person, attribute: str) -> list[str]:
    """Acceptable answers for ``attribute``: the value, plus other date formats for dates."""
    if attribute != "birth_date":
        return [getattr(person, attribute)]
    return date_variants(person.birth_date)


def value_text(person: Person, attribute: str) -> str:
    """The attribute's value as it appears in a document."""
    return format_date(person.birth_date) if attribute == "birth_date" else getattr(person, attribute)


def filler_sentence(rng: random.Random, name: str, template: str) -> str:
    """A filler template with the name and random values for every other placeholder."""
    values = {key: rng.choice(options)
              for key, options in resource_json("biography_templates.json")["filler_values"].items()}
    return template.format(name=name, **values)


def render_document(person: Person, rng: random.Random, doc_length_factor: float = 1.0) -> str:
    """One paragraph: a random paraphrase per attribute, plus filler sentences at random places."""
    templates = resource_json("biography_templates.json")
    sentences = [rng.choice(templates["document"][attr]).format(name=person.name,
                                                                value=value_text(person, attr))
                 for attr in ATTRIBUTES]
    n_filler = round((doc_length_factor - 1) * len(ATTRIBUTES))
    fillers: list[str] = []
    while len(fillers) < n_filler:  # each round uses every filler template once, in random order
        fillers += rng.sample(templates["filler"], len(templates["filler"]))
    for template in fillers[:n_filler]:
        sentences.insert(rng.randint(0, len(sentences)), filler_sentence(rng, person.name, template))
    return " ".join(sentences)


# --------------------------------------------------------------------------- samples
def make_sample(split: str, seed: int, index: int, config: BiographyConfig) -> Sample:
    """Sample ``index`` of the stream ``(split, seed)``; independent of how many are drawn."""
    rng = seeded_rng("biography", split, seed, index)
    people = sample_people(rng, split, config.num_docs)
    target = people[0]
    slot = rng.randrange(config.num_docs) if config.target_slot is None \
        else config.target_slot % config.num_docs
    people[0], people[slot] = people[slot], people[0]
    attribute = rng.choice(config.attributes)
    question = rng.choice(resource_json("biography_templates.json")["question"][attribute])
    return Sample(
        id=f"biography-{split}-{seed}-{index}",
        documents=[render_document(p, rng, config.doc_length_factor) for p in people],
        question=question.format(name=target.name),
        answers=answer_variants(target, attribute),
        meta={"dataset": "biography", "split": split, "target_slot": slot, "attribute": attribute,
              "target_name": target.name, "names": [p.name for p in people], "num_docs": config.num_docs,
              "doc_length_factor": config.doc_length_factor},
    )


def generate_biography(split: str = "test", n: int | None = 100, seed: int = 42,
                       **options) -> list[Sample]:
    """``n`` biography samples of ``split`` (``"train"``/``"test"``) for ``seed``.

    ``options`` are the fields of :class:`BiographyConfig` (``num_docs``, ``target_slot``,
    ``doc_length_factor``, ``attributes``). Sample ``i`` depends only on (split, seed, i, options),
    so a smaller ``n`` gives a prefix of a larger one.
    """
    check_split(split)
    check_count(n)
    config = BiographyConfig(**options)
    return [make_sample(split, seed, i, config) for i in range(n)]
