"""Answer metrics: token F1 after answer cleaning, micro-averaged, with bootstrap CIs.

See docs/protocol.md#metrics.

Per sample, a prediction is compared with each acceptable gold answer over whitespace tokens of
the normalised strings; the gold with the best F1 counts (its tp/fp/fn). The paper's metric is
**micro** F1: tp, fp and fn are summed over samples before computing F1, so long answers weigh
more. Macro F1 averages the per-sample F1 instead.

Conventions: an empty prediction against a non-empty gold has tp = fp = 0, fn = len(gold) (F1 0);
an empty prediction against an empty gold counts as a perfect match (F1 = 1; it adds nothing to
the micro sums, and ``micro_f1`` of a run where every sample is like that is 1).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

Golds = Sequence[str] | str
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class Counts:
    """True positives, false positives and false negatives of token matching."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        """2PR / (P + R); 1 when there is nothing to find and nothing was predicted."""
        if self.tp == self.fp == self.fn == 0:
            return 1.0
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_counts(pred: str, gold: str) -> Counts:
    """tp/fp/fn of the normalised whitespace tokens of ``pred`` against one ``gold``."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    tp = sum((Counter(p) & Counter(g)).values())
    return Counts(tp, len(p) - tp, len(g) - tp)


def as_golds(golds: Golds) -> list[str]:
    """A gold answer or list of acceptable answers as a non-empty list."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("a sample has no gold answers; give at least one (it may be '')")
    return golds


def token_f1(pred: str, golds: Golds) -> Counts:
    """Counts (tp, fp, fn; ``.precision``, ``.recall``, ``.f1``) against the best-F1 gold.

    ``golds`` is one answer or a list of acceptable answers; ties go to the first gold.
    """
    return max((token_counts(pred, g) for g in as_golds(golds)), key=lambda c: c.f1)


def _pairs(preds: Sequence[str], golds: Sequence[Golds]) -> list[Counts]:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold entries; give one per sample")
    return [token_f1(p, g) for p, g in zip(preds, golds)]


def f1_micro(preds: Sequence[str], golds: Sequence[Golds]) -> float:
    """F1 of tp/fp/fn summed over samples (the paper's metric); 0 for no samples."""
    if not preds:
        return 0.0
    return sum(_pairs(preds, golds), Counts()).f1


def f1_macro(preds: Sequence[str], golds: Sequence[Golds]) -> float:
    """Mean per-sample F1; 0 for no samples."""
    scores = [c.f1 for c in _pairs(preds, golds)]
    return float(np.mean(scores)) if scores else 0.0


def exact_match(preds: Sequence[str], golds: Sequence[Golds]) -> float:
    """Share of samples whose normalised prediction equals a normalised gold."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold entries; give one per sample")
    hits = [any(normalize_answer(p) == normalize_answer(g) for g in as_golds(gs))
            for p, gs in zip(preds, golds)]
    return float(np.mean(hits)) if hits else 0.0


def agreement_f1(method_answers: Sequence[str], reference_answers: Sequence[str]) -> float:
    """Micro token F1 of a method's answers against the reference method's (full recompute)."""
    return f1_micro(method_answers, reference_answers)


Metric = Callable[[Sequence[str], Sequence[Golds]], float]


def _resample(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` bootstrap index rows over ``n`` samples, shape (n_boot, n)."""
    if n == 0:
        raise ValueError("cannot bootstrap zero samples")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _per_sample(metric: Metric, preds: Sequence[str], golds: Sequence[Golds]):
    """(table (n, k), combine) for a metric that is a function of per-sample sums: ``combine`` maps
    the column sums of resamples (B, k) to their metric values (B,); ``None`` for other metrics.

    Micro F1 (and agreement) sums tp/fp/fn; macro F1 and exact match average one value per sample.
    Resampling these sums gives exactly what calling ``metric`` on each resample gives, without
    re-scoring every answer ``n_boot`` times.
    """
    n = len(preds)
    if metric in (f1_micro, agreement_f1):
        table = np.array([(c.tp, c.fp, c.fn) for c in _pairs(preds, golds)], float).reshape(n, 3)

        def combine(s: np.ndarray) -> np.ndarray:
            denom = 2 * s[:, 0] + s[:, 1] + s[:, 2]
            return np.where(denom > 0, 2 * s[:, 0] / np.where(denom > 0, denom, 1), 1.0)
        return table, combine
    if metric is f1_macro:
        return np.array([[c.f1] for c in _pairs(preds, golds)]).reshape(n, 1), lambda s: s[:, 0] / n
    if metric is exact_match:
        hits = [[exact_match([p], [g])] for p, g in zip(preds, golds)]
        return np.array(hits, float).reshape(n, 1), lambda s: s[:, 0] / n
    return None


def _resampled(metric: Metric, preds: list[str], golds: list, rows: np.ndarray) -> np.ndarray:
    """``metric`` on each resample: rows (B, n) of sample indices → (B,)."""
    fast = _per_sample(metric, preds, golds)
    if fast is not None:
        table, combine = fast
        return combine(table[rows].sum(axis=1))
    return np.array([metric([preds[i] for i in row], [golds[i] for i in row]) for row in rows])


def bootstrap_ci(preds: Sequence[str], golds: Sequence[Golds], metric: Metric = f1_micro,
                 n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(point, low, high): the metric and its percentile ``1 - alpha`` CI over resampled samples."""
    preds, golds = list(preds), list(golds)
    stats = _resampled(metric, preds, golds, _resample(len(preds), n_boot, seed))
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return metric(preds, golds), float(low), float(high)


def paired_bootstrap(preds_a: Sequence[str], preds_b: Sequence[str], golds: Sequence[Golds],
                     metric: Metric = f1_micro, n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> tuple[float, float, float, float]:
    """(diff, low, high, p_value) of ``metric(a) - metric(b)`` with the same resampled samples.

    ``p_value`` is two-sided: twice the smaller share of resampled differences on either side of
    0 (capped at 1), so a CI that excludes 0 goes with a small p-value.
    """
    if not len(preds_a) == len(preds_b) == len(golds):
        raise ValueError(f"lengths differ: {len(preds_a)} / {len(preds_b)} predictions, "
                         f"{len(golds)} golds; both methods must answer the same samples")
    a, b, g = list(preds_a), list(preds_b), list(golds)
    rows = _resample(len(g), n_boot, seed)
    diffs = _resampled(metric, a, g, rows) - _resampled(metric, b, g, rows)
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    p_value = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    return metric(a, g) - metric(b, g), float(low), float(high), float(p_value)


def depth_bin(depth: float, bins: int = 5) -> str:
    """Label of the equal-width bin of a depth in [0, 1], e.g. ``"0.2-0.4"``."""
    k = min(int(depth * bins), bins - 1)
    return f"{k / bins:.1f}-{(k + 1) / bins:.1f}"


def breakdown(preds: Sequence[str], golds: Sequence[Golds],
              keys: Sequence[Hashable]) -> dict[Hashable, dict[str, float]]:
    """Micro F1 and sample count per key (e.g. target slot, ``depth_bin(needle_depth)``).

    Returns ``{key: {"f1": ..., "n": ...}}`` with keys in sorted order (first-seen order when
    the keys cannot be compared).
    """
    if not len(preds) == len(golds) == len(keys):
        raise ValueError(f"lengths differ: {len(preds)} predictions, {len(golds)} golds, "
                         f"{len(keys)} keys; give one key per sample")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    try:
        order = sorted(groups)
    except TypeError:
        order = list(groups)
    return {key: {"f1": f1_micro([preds[i] for i in groups[key]], [golds[i] for i in groups[key]]),
                  "n": len(groups[key])} for key in order}

