"""Notebook parameters: one annotated declaration, the checks it drives, what the values name."""

from __future__ import annotations

from typing import Optional, Union

import pytest

from kvp.adapters import NIAH_TRAIN_OPTIONS, RECIPES
from kvp.data import GENERATORS
from kvp.methods import get_method
from kvp.params import (ConfigError, check_params, dataset_options, load_wrapper, method_grid,
                        parameters_cell, training_dataset_options, validate_params)
from kvp.plots import setting_label


def test_parameters_cell_gives_defaults_and_types_once():
    source = ('MODEL: str = "smollm2-135m"  # a registry name\nN: Union[int, dict[str, int]] = 3\n'
              'BUDGET: Optional[int] = None\nRATIOS: list[float] = [0.1,\n                      0.5]\n')
    defaults, schema = parameters_cell(source)
    assert defaults == {"MODEL": "smollm2-135m", "N": 3, "BUDGET": None, "RATIOS": [0.1, 0.5]}
    assert schema == {"MODEL": str, "N": Union[int, dict[str, int]], "BUDGET": Optional[int],
                      "RATIOS": list[float]}
    assert parameters_cell("SEED = 42\n") == ({"SEED": 42}, {})
    with pytest.raises(ConfigError, match="only `NAME: type = literal` lines"):
        parameters_cell("import os\n")
    with pytest.raises(ConfigError, match="the type of N uses 'Tensor'"):
        parameters_cell("N: Tensor = 3\n")
    with pytest.raises(ValueError):
        parameters_cell("N: int = 1 + len([])\n")


def test_check_params_reads_the_annotations_and_returns_the_values():
    namespace = {"__annotations__": {"N": int, "M": list[str]}, "N": 3, "M": ["a"], "os": object()}
    assert check_params(namespace) == {"N": 3, "M": ["a"]}
    with pytest.raises(TypeError, match=r"N='3' has type str; expected int"):
        check_params({**namespace, "N": "3"})
    with pytest.raises(ConfigError, match="unknown parameter N_SAMPLE"):
        check_params({**namespace, "N_SAMPLE": 2})
    with pytest.raises(ConfigError, match="no annotated parameters"):
        check_params({"N": 3})


def test_training_options_come_from_the_recipes():
    assert training_dataset_options("niah") == NIAH_TRAIN_OPTIONS
    assert training_dataset_options("mixture") == RECIPES[("smollm2-135m", "mixture")].dataset_options
    assert training_dataset_options("biography") == {}
    assert training_dataset_options("jsonl", "/data/mine.jsonl") == {"path": "/data/mine.jsonl"}
    with pytest.raises(ConfigError, match="needs DATA_PATH"):
        training_dataset_options("jsonl")


def test_check_params_names_parameter_value_and_type():
    schema = {"N": int, "R": float, "M": list[str], "P": str | None}
    check_params({"N": 3, "R": 1, "M": ["a"], "P": None, "OTHER": object()}, schema)
    with pytest.raises(TypeError, match=r"N=True has type bool; expected int"):
        check_params({"N": True, "R": 1.0, "M": [], "P": None}, schema)
    with pytest.raises(TypeError, match=r"M=\['a', 2\].*expected list\[str\]"):
        check_params({"N": 1, "R": 1.0, "M": ["a", 2], "P": "x"}, schema)
    with pytest.raises(TypeError, match="parameter R is missing"):
        check_params({"N": 1}, schema)
    with pytest.raises(ConfigError, match="'magic'"):
        check_params({"METHODS": ["magic"]}, {"METHODS": list[str]})


def test_unknown_parameter_and_string_ratio_are_refused():
    schema = {"N_SAMPLES": int}
    with pytest.raises(ConfigError, match="unknown parameter N_SAMPLE; .*'N_SAMPLES'"):
        check_params({"N_SAMPLES": 2, "N_SAMPLE": 3}, schema)
    with pytest.raises(ValueError, match="ratio='0.3' is a str; pass a number"):
        get_method("a3", ratio="0.3")


def test_hub_ids_and_existing_paths_are_accepted_models(tmp_path):
    validate_params({"MODEL": "org/model", "MODELS": [str(tmp_path), "smollm2-135m"]})


def test_method_grid_expands_settings_and_wrapper_specs(smollm):
    grid = method_grid(["kv_packet", "cache_blend", "epic", "a3"], [0.1, 0.5], [16])
    assert [(m.name, m.setting) for m in grid] == [
        ("kv_packet", ""), ("cache_blend", "ratio=0.1,check_layer=1"),
        ("cache_blend", "ratio=0.5,check_layer=1"), ("epic", "n_tokens=16"), ("a3", "ratio=0.1"),
        ("a3", "ratio=0.5")]
    assert [setting_label(m.name, m.setting) for m in grid[1:4]] == [
        "CacheBlend r=0.1", "CacheBlend r=0.5", "EPIC 16 tok"]
    model = smollm.model
    wrapper = load_wrapper("untrained", model, "smollm2-135m", "biography")
    assert (wrapper.h, wrapper.t) == (8, 8)
    with pytest.raises(ConfigError, match="'no/such/file'.*untrained"):
        load_wrapper("no/such/file", model, "smollm2-135m", "biography")


def test_generated_datasets_are_valid_dataset_parameters():
    validate_params({"DATASET": "multihop", "DATASETS": list(GENERATORS)})
    for name in ("biography", "multihop", "tables", "codedocs"):
        assert dataset_options(name, 4, 1536, 1000) == {"num_docs": 4}
