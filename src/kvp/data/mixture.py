"""Training mixtures: several datasets' train splits, shuffled together.

See docs/method.md#training-objective.

``components`` maps dataset names to integer counts (``{"biography": 64, "niah": 128}``), or to
float weights together with a total ``n`` (counts are the weights' largest-remainder rounding).
``options`` passes loader options per component, e.g. ``{"hotpotqa": {"path": ...},
"biography": {"num_docs": 3}}``. Each component draws from its own seed derived from ``seed``.

``general`` is the mixture of every generator (``kvp.data.GENERATORS``) except the ``holdout``
one, in equal shares of ``n``: the training data of a wrapper that is then tested on the domain
it never saw (leave-one-domain-out, docs/protocol.md#context-shifts).
"""

from __future__ import annotations

import math

from kvp.data import DATASETS, GENERATORS, Sample, load_dataset, seeded_rng


def component_counts(components: dict[str, float], n: int | None) -> dict[str, int]:
    """Integer counts: the given ints when ``n`` is None, else ``n`` split by the weights."""
    if not components:
        raise ValueError("components is empty; give e.g. {'biography': 64, 'niah': 128}")
    if any(w < 0 for w in components.values()):
        raise ValueError(f"components={components}: counts and weights must be >= 0")
    if n is None:
        if not all(float(w).is_integer() for w in components.values()):
            raise ValueError(f"components={components} holds weights but n is None; give integer "
                             "counts, or weights with a total n")
        return {name: int(w) for name, w in components.items()}
    total = sum(components.values())
    if total <= 0:
        raise ValueError(f"components={components}: the weights must not all be 0")
    exact = {name: n * w / total for name, w in components.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: (counts[name] - exact[name], name))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def load_mixture(split: str = "train", n: int | None = None, seed: int = 0,
                 components: dict[str, float] | None = None,
                 options: dict[str, dict] | None = None) -> list[Sample]:
    """A seeded shuffle of the ``split`` samples of every component (``"train"`` or ``"val"``)."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: mixtures are for training; use split='train' (or "
                         "'val' for its validation samples)")
    counts = component_counts(components or {}, n)
    options = options or {}
    allowed = [d for d in DATASETS if d not in ("mixture", "general")]
    bad = [name for name in [*counts, *options] if name not in allowed]
    if bad:
        raise ValueError(f"unknown mixture component(s) {bad}; use names from {allowed}")
    samples: list[Sample] = []
    for name, count in counts.items():
        component_seed = seeded_rng("mixture", seed, name).randrange(2**31)
        samples += load_dataset(name, split, count, component_seed, **options.get(name, {}))
    seeded_rng("mixture-order", seed).shuffle(samples)
    return samples


def general_components(holdout: str) -> list[str]:
    """The generators of the ``general`` mixture: every one but ``holdout``."""
    if holdout not in GENERATORS:
        raise ValueError(f"holdout={holdout!r}: hold out one of the generators {list(GENERATORS)}")
    return [g for g in GENERATORS if g != holdout]


def load_general(split: str = "train", n: int | None = None, seed: int = 0,
                 holdout: str | None = None, options: dict[str, dict] | None = None
                 ) -> list[Sample]:
    """``n`` samples of ``split``: every generator except ``holdout``, in equal shares (the
    largest-remainder rounding of :func:`component_counts`); ``options`` as in
    :func:`load_mixture` (an option for the held-out generator is an error)."""
    if holdout is None:
        raise ValueError(f"the general mixture needs holdout=..., the generator to leave out: "
                         f"one of {list(GENERATORS)}")
    components = general_components(holdout)
    if holdout in (options or {}):
        raise ValueError(f"options name the held-out generator {holdout!r}; drop its options")
    if n is None:
        raise ValueError("the general mixture needs a total sample count n")
    return load_mixture(split, n, seed, {name: 1 for name in components}, options)


def trained_on(dataset: str, options: dict) -> set[str]:
    """The datasets whose samples a wrapper trained on ``dataset`` with ``options`` has seen."""
    if dataset == "mixture":
        return {dataset, *options.get("components", {})}
    if dataset == "general" and "holdout" in options:
        return {dataset, *general_components(options["holdout"])}
    return {dataset}
