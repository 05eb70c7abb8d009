"""Five more kinds of document over one generator machinery (docs/protocol.md#datasets).

Each kind (``kvp.data.DOMAINS``) writes documents about named entities from its own value lists,
paraphrase templates and question templates (``resources/domain_<name>.json``):

* ``products`` — product sheets: a labelled spec sheet or a marketing blurb;
* ``events`` — event reports: a news report with colour sentences, or a short bulletin;
* ``abstracts`` — scientific-abstract-like paragraphs, plain or with section labels;
* ``tables`` — monthly weather tables rendered as text (pipe table, CSV or aligned columns);
* ``codedocs`` — documentation of a library function: a docstring, a reference entry or a
  manual page.

The machinery is the biography generator's: an entity's values are a pure function of its name
(the same name always has the same facts), :func:`kvp.data.hash_split` of the name fixes its split
(so no entity appears in two splits), a sample draws ``num_docs`` distinct entities of its split,
puts the target's document in a uniformly random slot (``meta["target_slot"]``, or the forced
``target_slot``) and asks about one field of the target (``meta["attribute"]``). The gold answer
is the field's text as the target document writes it (plus the bare number for values with a
unit, and other date formats for dates). A kind differs only in its resources and in how it lays
out a document (:meth:`Domain.render`) and, for tables, in what its entities hold.
"""

from __future__ import annotations

import datetime
import json
import random
from dataclasses import dataclass
from functools import cache, cached_property

from kvp.data import (DOMAINS, Sample, check_count, check_slots, check_split, hash_split,
                      resource_text, seeded_rng)
from kvp.data.biography import date_variants, format_date


@dataclass(frozen=True)
class DomainConfig:
    """Options of every domain generator.

    Attributes:
        num_docs: documents per sample (one per entity, all distinct).
        target_slot: force the target document into this slot (negative counts from the end);
            ``None`` places it uniformly at random.
    """

    num_docs: int = 5
    target_slot: int | None = None

    def __post_init__(self):
        check_slots(self.num_docs, self.target_slot)


@dataclass(frozen=True)
class Entity:
    """A named entity: each field's text as documents write it, and its acceptable answers."""

    name: str
    values: dict[str, str]
    answers: dict[str, list[str]]


def draw_value(rng: random.Random, spec) -> tuple[str, list[str]]:
    """(text, answers) of one value drawn by ``spec`` from ``resources/domain_<name>.json``.

    ``spec`` is a list (one item drawn), ``{"int": [lo, hi], "step": s, "format": "${}"}``
    (``"commas": true`` writes thousands separators),
    ``{"float": [lo, hi], "digits": d, "format": "{} kg"}`` (answers: the text and the bare
    number) or ``{"date": [first_year, last_year]}`` (answers: three date formats).
    """
    if isinstance(spec, list):
        text = rng.choice(spec)
        return text, [text]
    if "date" in spec:
        start = datetime.date(spec["date"][0], 1, 1).toordinal()
        date = datetime.date.fromordinal(rng.randint(start, datetime.date(spec["date"][1], 12, 31)
                                                     .toordinal()))
        return format_date(date), date_variants(date)
    if "int" in spec:
        lo, hi = spec["int"]
        step = spec.get("step", 1)
        number = f"{rng.randrange(lo, hi + 1, step):,}" if spec.get("commas") else \
            str(rng.randrange(lo, hi + 1, step))
    else:
        lo, hi = spec["float"]
        number = f"{rng.uniform(lo, hi):.{spec.get('digits', 1)}f}"
    text = spec.get("format", "{}").format(number)
    return text, [text] if text == number else [text, number]


class Domain:
    """One kind of document. Subclasses set ``name`` and implement :meth:`render`.

    Resource keys used by the shared machinery: ``names`` (``parts``: lists whose items fill the
    ``format``), ``values`` (field -> spec of :func:`draw_value`), ``question`` (field -> question
    templates; fields without one are never asked), ``sentence`` (field -> paraphrases), ``label``
    (field -> label synonyms) and per-style lists such as ``opener`` and ``filler``.
    """

    name = ""

    @cached_property
    def data(self) -> dict:
        """The parsed resource (read once per process; treat as read-only)."""
        return json.loads(resource_text(f"domain_{self.name}.json"))

    # ----------------------------------------------------------------------- entities
    def draw_name(self, rng: random.Random) -> str:
        names = self.data["names"]
        return names["format"].format(*(rng.choice(part) for part in names["parts"]))

    def entity(self, name: str) -> Entity:
        """The entity called ``name`` (memoised: the same name always has the same values)."""
        return entity_of(self.name, name)

    def make_entity(self, name: str) -> Entity:
        """Values drawn field by field from a generator seeded by the name."""
        rng = seeded_rng(self.name, "entity", name)
        drawn = {field: draw_value(rng, spec) for field, spec in self.data["values"].items()}
        return Entity(name, {f: text for f, (text, _) in drawn.items()},
                      {f: answers for f, (_, answers) in drawn.items()})

    def sample_entities(self, rng: random.Random, split: str, k: int) -> list[Entity]:
        """``k`` distinct entities of ``split``, drawn by rejection from the name parts."""
        names: list[str] = []
        while len(names) < k:
            name = self.draw_name(rng)
            if hash_split(name) == split and name not in names:
                names.append(name)
        return [self.entity(name) for name in names]

    # ----------------------------------------------------------------------- text
    def fill(self, template: str, entity: Entity) -> str:
        return template.format(name=entity.name, **entity.values)

    def sentences(self, entity: Entity, rng: random.Random, fields: list[str]) -> list[str]:
        """One randomly chosen paraphrase per field, in the order given."""
        return [self.fill(rng.choice(self.data["sentence"][f]), entity) for f in fields]

    def fillers(self, rng: random.Random, entity: Entity) -> list[str]:
        """``filler_count`` = [lo, hi] distinct filler sentences (no asked facts in them)."""
        lo, hi = self.data["filler_count"]
        return [self.fill(t, entity) for t in rng.sample(self.data["filler"], rng.randint(lo, hi))]

    def prose(self, entity: Entity, rng: random.Random, order: str = "shuffled") -> str:
        """A paragraph: an opener, one sentence per field (shuffled, or in resource order) and
        filler sentences at random places."""
        fields = list(self.data["sentence"])
        if order == "shuffled":
            rng.shuffle(fields)
        body = self.sentences(entity, rng, fields)
        for sentence in self.fillers(rng, entity) if "filler" in self.data else []:
            body.insert(rng.randint(0, len(body)), sentence)
        return " ".join([self.fill(rng.choice(self.data["opener"]), entity), *body])

    def sheet(self, entity: Entity, rng: random.Random) -> str:
        """A title line and one ``label: value`` line per labelled field (shuffled order)."""
        fields = list(self.data["label"])
        rng.shuffle(fields)
        separator = rng.choice([": ", " - ", " ... "])
        lines = [f"{rng.choice(self.data['label'][f])}{separator}{entity.values[f]}" for f in fields]
        return "\n".join([self.fill(rng.choice(self.data["title"]), entity), *lines])

    def render(self, entity: Entity, rng: random.Random) -> str:
        """The entity's document; every asked field's text appears in it."""
        raise NotImplementedError

    # ----------------------------------------------------------------------- samples
    def ask(self, entity: Entity, rng: random.Random) -> tuple[str, str, list[str]]:
        """(attribute, question, answers) about one asked field of ``entity``."""
        field = rng.choice(list(self.data["question"]))
        return field, self.fill(rng.choice(self.data["question"][field]), entity), \
            entity.answers[field]

    def make_sample(self, split: str, seed: int, index: int, config: DomainConfig) -> Sample:
        """Sample ``index`` of the stream ``(split, seed)``; independent of how many are drawn."""
        rng = seeded_rng(self.name, split, seed, index)
        entities = self.sample_entities(rng, split, config.num_docs)
        target = entities[0]
        slot = rng.randrange(config.num_docs) if config.target_slot is None \
            else config.target_slot % config.num_docs
        entities[0], entities[slot] = entities[slot], entities[0]
        attribute, question, answers = self.ask(target, rng)
        return Sample(
            id=f"{self.name}-{split}-{seed}-{index}",
            documents=[self.render(e, rng) for e in entities], question=question,
            answers=list(answers),
            meta={"dataset": self.name, "split": split, "target_slot": slot,
                  "attribute": attribute, "target_name": target.name,
                  "names": [e.name for e in entities], "num_docs": config.num_docs})

    def generate(self, split: str = "test", n: int | None = 100, seed: int = 42,
                 **options) -> list[Sample]:
        """``n`` samples of ``split`` for ``seed``; ``options`` are :class:`DomainConfig`'s
        fields. Sample ``i`` depends only on (split, seed, i, options): a smaller ``n`` gives a
        prefix of a larger one."""
        check_split(split)
        check_count(n)
        config = DomainConfig(**options)
        return [self.make_sample(split, seed, i, config) for i in range(n)]


class ProductSheet(Domain):
    """Product sheets: ``label: value`` lines under a title, or a marketing paragraph."""

    name = "products"

    def render(self, entity: Entity, rng: random.Random) -> str:
        return self.sheet(entity, rng) if rng.random() < 0.5 else self.prose(entity, rng)


class EventReport(Domain):
    """Event reports: a headline over a news paragraph with colour sentences, or a bulletin."""

    name = "events"

    def render(self, entity: Entity, rng: random.Random) -> str:
        if rng.random() < 0.3:
            return self.sheet(entity, rng)
        return self.fill(rng.choice(self.data["headline"]), entity) + "\n" + self.prose(entity, rng)


class Abstract(Domain):
    """Scientific-abstract-like paragraphs: the fields in an abstract's order, plain or under
    section labels (``sections``: label -> fields; the first opens with the entity's name)."""

    name = "abstracts"

    def render(self, entity: Entity, rng: random.Random) -> str:
        title = self.fill(rng.choice(self.data["title"]), entity)
        if rng.random() < 0.5:
            return title + "\n" + self.prose(entity, rng, order="fixed")
        parts = []
        for label, fields in self.data["sections"].items():
            body = self.sentences(entity, rng, fields)
            if not parts:  # the first section names the entity
                body.insert(0, self.fill(rng.choice(self.data["opener"]), entity))
            if label == "Methods":
                body += [self.fill(t, entity) for t in rng.sample(self.data["filler"], 1)]
            parts.append(f"{label}: " + " ".join(body))
        return "\n".join([title, *parts])


class StationTable(Domain):
    """Monthly weather tables: 3 to 6 consecutive months x the ``metrics`` columns, every cell
    distinct, as a pipe table, CSV lines or aligned columns. The attribute is ``metric/month``."""

    name = "tables"
    MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December")

    def make_entity(self, name: str) -> Entity:
        rng = seeded_rng(self.name, "entity", name)
        first = rng.randrange(12)
        months = [self.MONTHS[(first + i) % 12] for i in range(rng.randint(3, 6))]
        values: dict[str, str] = {}
        answers: dict[str, list[str]] = {}
        for month in months:
            for metric, spec in self.data["metrics"].items():
                text, alternatives = draw_value(rng, spec["value"])
                while text in values.values():  # a cell's text identifies it
                    text, alternatives = draw_value(rng, spec["value"])
                values[f"{metric}/{month}"] = text
                answers[f"{metric}/{month}"] = alternatives + [f"{text} {spec['unit']}"]
        return Entity(name, values, answers)

    def render(self, entity: Entity, rng: random.Random) -> str:
        metrics = list(self.data["metrics"])
        months = list(dict.fromkeys(key.split("/")[1] for key in entity.values))
        header = ["Month"] + [rng.choice(self.data["metrics"][m]["header"]) for m in metrics]
        rows = [[month] + [entity.values[f"{m}/{month}"] for m in metrics] for month in months]
        layout = rng.choice(["pipe", "csv", "aligned"])
        if layout == "pipe":
            lines = ["| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows]]
        elif layout == "csv":
            lines = [",".join(r) for r in [header, *rows]]
        else:
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
            lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [header, *rows]]
        note = [self.fill(rng.choice(self.data["note"]), entity)] if rng.random() < 0.5 else []
        return "\n".join([self.fill(rng.choice(self.data["title"]), entity), *lines, *note])

    def ask(self, entity: Entity, rng: random.Random) -> tuple[str, str, list[str]]:
        attribute = rng.choice(list(entity.values))
        metric, month = attribute.split("/")
        question = rng.choice(self.data["metrics"][metric]["question"])
        return attribute, question.format(name=entity.name, month=month), entity.answers[attribute]


class FunctionDoc(Domain):
    """Documentation of one library function: a Python docstring, a Markdown reference entry
    or a manual page (``layouts``: lists of line templates)."""

    name = "codedocs"

    def make_entity(self, name: str) -> Entity:
        entity = super().make_entity(name)
        rng = seeded_rng(self.name, "parameter", name)
        param = rng.choice(sorted(self.data["parameters"]))
        default = rng.choice(self.data["parameters"][param])
        verb = name.split("_")[0]
        summary = self.data["summaries"][verb].format(noun=name.split("_", 1)[1].replace("_", " "))
        return Entity(name, {**entity.values, "param": param, "default": default,
                             "summary": summary}, {**entity.answers, "default": [default]})

    def render(self, entity: Entity, rng: random.Random) -> str:
        layout = rng.choice(sorted(self.data["layouts"]))
        return "\n".join(self.fill(line, entity) for line in rng.choice(self.data["layouts"][layout]))


DOMAIN_CLASSES = {cls.name: cls for cls in (ProductSheet, EventReport, Abstract, StationTable,
                                            FunctionDoc)}  # in the order of kvp.data.DOMAINS


@cache
def domain(name: str) -> Domain:
    """The one instance of the kind ``name``; ``ValueError`` lists the kinds."""
    if name not in DOMAIN_CLASSES:
        raise ValueError(f"unknown kind of document {name!r}; use one of {list(DOMAINS)}")
    return DOMAIN_CLASSES[name]()


@cache
def entity_of(kind: str, name: str) -> Entity:
    return domain(kind).make_entity(name)


def domain_loader(name: str):
    """``load_dataset``'s loader for the kind ``name``: ``(split, n, seed, **options)``."""
    return domain(name).generate
