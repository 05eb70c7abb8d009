"""Shipped adapters: they load onto their model, carry their record, and the benchmark table works."""

from __future__ import annotations

import pytest

from kvp.adapters import (ADAPTER_DIR, RECIPES, SHIFTS, append_results, evaluate_adapters,
                          load_adapter, recipe, results_markdown)

SHIPPED = [(m, d) for (m, d) in RECIPES if (ADAPTER_DIR / m / f"{d}-seed0").exists()]


def test_smollm_adapters_are_shipped():
    assert {d for m, d in SHIPPED if m == "smollm2-135m"} >= {"biography", "niah"}


@pytest.mark.parametrize("model,dataset", SHIPPED)
def test_shipped_adapter_loads_with_record(model, dataset):
    wrapper = load_adapter(model, dataset)
    assert wrapper.model_name == model and (wrapper.h, wrapper.t) == (8, 8)
    record = wrapper.record
    assert record["config"] == recipe(model, dataset).to_dict()
    assert record["steps"] == recipe(model, dataset).total_steps and record["git_commit"]
    folder = ADAPTER_DIR / model / f"{dataset}-seed0"
    for name in ("config.json", "loss.csv", "loss.png", "loss.pdf"):
        assert (folder / name).exists(), name
    with pytest.raises(ValueError, match="trained for model 'smollm2-135m'"):
        from kvp.packet import PacketWrapper

        PacketWrapper.load(folder / "wrapper.safetensors", model_name="another-model")


def test_missing_adapter_error_lists_shipped():
    with pytest.raises(FileNotFoundError, match="shipped: .*smollm2-135m/biography-seed0"):
        load_adapter("smollm2-135m", "biography", seed=99)


def test_evaluation_table_on_two_samples(tmp_path, smollm):
    table = evaluate_adapters("smollm2-135m", "biography", "none", n=2, seeds=[0],
                              max_new_tokens=8)
    assert list(table.method) == ["full_recompute", "no_recompute", "kv_packet"]
    assert table.loc[table.method == "full_recompute", "agree_f1"].item() == 1.0
    append_results(table, tmp_path / "results.csv")
    append_results(table, tmp_path / "results.csv")  # idempotent: same cells replaced
    md = results_markdown(tmp_path / "results.csv")
    assert md.count("\n") == 2 + 3 and "kv_packet" in md
    assert set(SHIFTS["biography"]) == {"none", "docs10", "last_slot", "long_docs"}
