"""Metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from kvp.metrics import (
    Counts,
    agreement_f1,
    bootstrap_ci,
    breakdown,
    depth_bin,
    exact_match,
    f1_macro,
    f1_micro,
    normalize_answer,
    paired_bootstrap,
    token_f1,
)


def test_normalize_answer():
    assert normalize_answer("  The  Mirava, River! ") == "mirava river"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_token_f1_hand_computed():
    c = token_f1("the Royal Academy of Lenn", "Academy of Lenn in Orlan")
    # pred tokens: royal academy of lenn (4); gold: academy of lenn in orlan (5); tp = 3
    assert (c.tp, c.fp, c.fn) == (3, 1, 2)
    assert c.precision == pytest.approx(3 / 4) and c.recall == pytest.approx(3 / 5)
    assert c.f1 == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))


def test_empty_prediction_and_empty_gold():
    assert token_f1("", "March 4 1987") == Counts(0, 0, 3)
    assert token_f1("", "March 4 1987").f1 == 0
    assert token_f1("", "").f1 == 1.0  # nothing to find, nothing predicted
    assert token_f1("extra", "").f1 == 0.0


def test_several_golds_choose_the_best():
    golds = ["March 4, 1987", "4 March 1987", "1987-03-04"]
    assert token_f1("1987-03-04", golds).f1 == 1.0
    assert token_f1("March 4th 1987", golds) == Counts(2, 1, 1)
    with pytest.raises(ValueError, match="no gold answers"):
        token_f1("x", [])


def test_micro_and_macro_differ_on_a_designed_case():
    preds = ["b c d e f g h i", "x"]
    golds = ["b c d e f g h i", "y"]
    # micro: tp 8, fp 1, fn 1 -> 16/18; macro: (1 + 0) / 2
    assert f1_micro(preds, golds) == pytest.approx(16 / 18)
    assert f1_macro(preds, golds) == pytest.approx(0.5)
    assert exact_match(preds, golds) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        f1_micro(preds, golds[:1])


def test_agreement_with_reference_answers():
    assert agreement_f1(["Sofia", "Oslo city"], ["Sofia", "Oslo"]) == pytest.approx(2 * 2 / (2 * 2 + 1))


def test_bootstrap_ci_contains_point_and_is_seeded():
    preds = ["yes"] * 30 + ["no"] * 10
    golds = ["yes"] * 40
    point, low, high = bootstrap_ci(preds, golds, n_boot=300, seed=1)
    assert point == pytest.approx(0.75) and low < point < high
    assert bootstrap_ci(preds, golds, n_boot=300, seed=1) == (point, low, high)
    assert bootstrap_ci(["yes"] * 5, ["yes"] * 5, n_boot=50) == (1.0, 1.0, 1.0)


def test_paired_bootstrap_detects_a_clear_difference():
    golds = ["yes"] * 50
    better, worse = ["yes"] * 45 + ["no"] * 5, ["yes"] * 20 + ["no"] * 30
    diff, low, high, p = paired_bootstrap(better, worse, golds, n_boot=500, seed=0)
    assert diff == pytest.approx(f1_micro(better, golds) - f1_micro(worse, golds))
    assert 0 < low <= diff <= high and p < 0.01
    same = paired_bootstrap(better, better, golds, n_boot=100)
    assert same[0] == 0 and same[3] == 1.0


def test_breakdown_by_slot_and_depth_bin():
    preds, golds = ["yes", "no", "yes", "yes"], ["yes", "yes", "yes", "no"]
    table = breakdown(preds, golds, [0, 0, 1, 2])
    assert table == {0: {"f1": 0.5, "n": 2}, 1: {"f1": 1.0, "n": 1}, 2: {"f1": 0.0, "n": 1}}
    assert [depth_bin(d) for d in (0.0, 0.19, 0.2, 1.0)] == ["0.0-0.2", "0.0-0.2", "0.2-0.4", "0.8-1.0"]


@pytest.mark.parametrize("metric", [f1_micro, f1_macro, exact_match, agreement_f1])
def test_bootstrap_from_per_sample_sums_equals_rescoring_every_resample(metric):
    """The fast path (sums of per-sample counts) against calling the metric on each resample."""
    rng = np.random.default_rng(5)
    words = ["paris", "london", "1815", "the", "physics", "", "dance"]
    preds = [" ".join(rng.choice(words, size=rng.integers(0, 4))) for _ in range(40)]
    golds = [[" ".join(rng.choice(words, size=rng.integers(1, 3)))] for _ in range(40)]
    golds[3] = ["", "paris"]
    def rescored(p, g):  # the same metric, not recognised by the fast path
        return metric(p, g)
    assert bootstrap_ci(preds, golds, metric, n_boot=300, seed=2) == \
        bootstrap_ci(preds, golds, rescored, n_boot=300, seed=2)
    other = preds[::-1]
    assert paired_bootstrap(preds, other, golds, metric, n_boot=300, seed=4) == \
        paired_bootstrap(preds, other, golds, rescored, n_boot=300, seed=4)
