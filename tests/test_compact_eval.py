"""What compact packets cost in answers: the fidelity table of kvp.compact_eval."""

from __future__ import annotations

import pytest

from kvp.compact_eval import fidelity
from kvp.data import load_dataset
from kvp.evaluate import EvalSettings


def test_fidelity_compares_each_packet_dtype_with_full_precision_packets(smollm, wrapper):
    samples = load_dataset("biography", "test", n=2, seed=42, num_docs=2)
    rows, table = fidelity(smollm.model, smollm.tokenizer, samples, wrapper,
                           EvalSettings("smollm2-135m", max_new_tokens=4), ("fp8", "int8"))
    assert list(table["packet_dtype"]) == ["model", "fp8", "int8"]
    assert (table["n"] == 2).all()
    # full-precision packets agree with themselves; every compact run is scored against them
    assert table.set_index("packet_dtype").loc["model", "agree_full_precision"] == 1.0
    assert table["agree_full_precision"].between(0, 1).all()
    kv = rows[rows["method"] == "kv_packet"]
    assert sorted(kv["packet_dtype"].unique()) == ["fp8", "int8", "model"]
    assert set(rows[rows["method"] == "full_recompute"]["packet_dtype"]) == {"model"}


def test_fidelity_refuses_an_unknown_packet_dtype(smollm, wrapper):
    with pytest.raises(ValueError, match="packet_dtype='fp4'"):
        fidelity(smollm.model, smollm.tokenizer, [], wrapper, EvalSettings("smollm2-135m"),
                 ("fp4",))
