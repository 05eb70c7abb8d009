"""Shipped adapters: they load onto their model, carry their record and were selected on validation."""

from __future__ import annotations

import pytest

from kvp.adapters import ADAPTER_DIR, RECIPES, load_adapter, recipe
from kvp.packet import PacketWrapper
from kvp.train import TrainConfig


SHIPPED = [(m, d) for (m, d) in RECIPES if (ADAPTER_DIR / m / f"{d}-seed0").exists()]


def test_smollm_adapters_are_shipped():
    assert {d for m, d in SHIPPED if m == "smollm2-135m"} >= {"biography", "niah"}


@pytest.mark.parametrize("model,dataset", SHIPPED)
def test_shipped_adapter_loads_with_record(model, dataset):
    wrapper = load_adapter(model, dataset)
    assert wrapper.model_name == model and (wrapper.h, wrapper.t) == (8, 8)
    record = wrapper.record
    assert TrainConfig(**record["config"]) == recipe(model, dataset)  # fields added later: defaults
    assert record["steps"] == recipe(model, dataset).total_steps and record["git_commit"]
    folder = ADAPTER_DIR / model / f"{dataset}-seed0"
    for name in ("config.json", "loss.csv", "loss.png", "loss.pdf"):
        assert (folder / name).exists(), name
    with pytest.raises(ValueError, match=f"trained for model '{model}'"):
        PacketWrapper.load(folder / "wrapper.safetensors", model_name="another-model")


def test_missing_adapter_error_lists_shipped():
    with pytest.raises(FileNotFoundError, match="shipped: .*smollm2-135m/biography-seed0"):
        load_adapter("smollm2-135m", "biography", seed=99)


def test_shipped_seeds_match_their_records():
    for model, dataset in [("smollm2-135m", "niah"), ("smollm2-135m", "mixture"),
                           ("qwen2.5-coder-0.5b", "biography")]:
        for seed in (0, 1, 2):
            assert load_adapter(model, dataset, seed).record["config"]["seed"] == seed


@pytest.mark.parametrize("model,dataset", SHIPPED)
def test_shipped_adapters_were_selected_on_validation(model, dataset):
    record = load_adapter(model, dataset).record
    if recipe(model, dataset).n_val:
        assert 1 <= record["best_step"] <= record["steps"]
        assert record["best_val_loss"] <= record["final_val_loss"]
        assert record["teacher_truncated"] < 0.05


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_an_in_domain_reference_trains_like_its_general_wrapper_on_its_own_kind(model):
    """The in-domain reference of ``general-products`` differs from it only in its data: all of
    its samples are product sheets of the train split, whose products the test never names."""
    from kvp.data import load_dataset
    from kvp.train import training_samples

    general, own = recipe(model, "general-products"), recipe(model, "products")
    differ = {k for k, v in own.to_dict().items() if general.to_dict()[k] != v}
    assert differ == {"dataset", "dataset_options"}
    train = training_samples(own)
    assert len(train) == own.n_samples and {s.meta["dataset"] for s in train} == {"products"}
    tested = {n for s in load_dataset("products", "test", n=200, seed=42) for n in s.meta["names"]}
    assert not tested & {n for s in train for n in s.meta["names"]}
