"""Notebook parameters: their declaration, their checks, and the objects they name.

Every notebook declares its parameters once, in the cell tagged ``parameters``, as annotated
literals (``N_SAMPLES: int = 20``, ``MAX_NEW_TOKENS: Optional[int] = None``). The next cell
calls ``config = check_params(globals())``: the annotations are the schema, so a wrong type, an
unknown model / dataset / method name or a misspelt parameter stops the run there, and
``config`` holds the checked values. The pipeline reads the same cell
(:func:`parameters_cell`) to check a profile before it runs anything.

The helpers below turn parameter values into library objects: :func:`load_wrapper` (``ADAPTER``),
:func:`dataset_options` (the dataset parameters), :func:`training_dataset_options` (notebook 02)
and :func:`method_grid` (``METHODS`` with their settings).
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Optional, Union, get_args, get_origin

from kvp.adapters import ADAPTER_DIR, RECIPES, load_adapter
from kvp.data import DATASETS, DOMAINS
from kvp.methods import METHODS, get_method
from kvp.models import registry_names
from kvp.packet import PacketWrapper


class ConfigError(ValueError):
    """A profile or a parameter value that cannot be run; the message says how to fix it."""


REPO_ROOT = Path(__file__).resolve().parents[2]
# Datasets read from a file named by DATA_PATH (required for jsonl, optional for the hub ones).
FILE_DATASETS = ("jsonl", "hotpotqa", "musique")
# Names a parameter annotation may use (``Optional``/``Union``: papermill reads no ``X | Y``).
ANNOTATION_NAMES = {"list": list, "dict": dict, "int": int, "float": float, "str": str,
                    "bool": bool, "Optional": Optional, "Union": Union}


def repo_path(path: str) -> str:
    """``path`` resolved against the repository root when relative (``""`` stays ``""``): a
    notebook opened in ``notebooks/`` reads and writes where the pipeline's run does."""
    return str(REPO_ROOT / path) if path and not Path(path).is_absolute() else path


# ------------------------------------------------------------------------------- declaration
def parameters_cell(source: str, where: str = "parameters cell") -> tuple[dict[str, Any], dict[str, Any]]:
    """(defaults, schema) of a ``parameters`` cell of annotated literals ``NAME: type = value``.

    A plain ``NAME = value`` line has a default and no type (``schema`` lacks it); anything else
    than such assignments is refused, as is an annotation outside :data:`ANNOTATION_NAMES`.
    """
    defaults, schema = {}, {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            name = node.target.id
            try:
                schema[name] = eval(compile(ast.Expression(node.annotation), where, "eval"),  # noqa: S307
                                    {"__builtins__": {}}, ANNOTATION_NAMES)
            except NameError as err:
                raise ConfigError(f"{where}: the type of {name} uses {err.name!r}; use "
                                  f"{sorted(ANNOTATION_NAMES)}") from None
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name)):
            name = node.targets[0].id
        else:
            raise ConfigError(f"{where}, line {node.lineno}: only `NAME: type = literal` lines "
                              "belong in a parameters cell")
        defaults[name] = ast.literal_eval(node.value)
    return defaults, schema


# ------------------------------------------------------------------------------- value checks
def _check_names(key: str, values: Sequence[Any], allowed: Sequence[str], kind: str, where: str) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ConfigError(f"{where}: unknown {kind} {bad[0]!r} in {key}; allowed: {list(allowed)}. "
                          f"Correct the value of {key}.")


def _check_models(key: str, values: Sequence[Any], where: str) -> None:
    unresolved = [v for v in values if not (isinstance(v, str) and ("/" in v or Path(v).exists()))]
    if unresolved:
        _check_names(key, unresolved, registry_names(), "model", where + " (a hub id 'org/name' "
                     "or an existing local path is also accepted)")


def validate_params(params: Mapping[str, Any], where: str = "parameters") -> None:
    """Check model, dataset and method names in ``params``; raise :class:`ConfigError` if unknown.

    A parameter is checked by its name: ``MODEL``/``MODELS`` (or ending in ``_MODEL(S)``),
    likewise ``DATASET(S)`` and ``METHOD(S)``; a plural name holds a list. The allowed names are
    the registries' (``kvp.models``, ``kvp.data.DATASETS``, ``kvp.methods.METHODS``).
    """
    for key, value in params.items():
        values = value if isinstance(value, list) else [value]
        word = key.rsplit("_", 1)[-1].rstrip("S")
        if word == "MODEL":
            _check_models(key, values, where)
        elif word == "DATASET":
            _check_names(key, values, DATASETS, "dataset", where)
        elif word == "METHOD":
            _check_names(key, values, list(METHODS), "method", where)


def _matches(value: Any, expected: Any) -> bool:
    """Whether ``value`` fits the type hint ``expected`` (scalars, unions, list[T], dict[K, V])."""
    origin = get_origin(expected)
    if origin in (Union, UnionType):
        return any(_matches(value, arg) for arg in get_args(expected))
    if origin is list:
        (item,) = get_args(expected)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        k, v = get_args(expected)
        return isinstance(value, dict) and all(_matches(a, k) and _matches(b, v) for a, b in value.items())
    if expected in (None, NoneType):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _injectable(value: Any) -> bool:
    """Whether ``value`` is of a type papermill can inject as a parameter."""
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


def _imported(name: str, value: Any) -> bool:
    """Whether ``value`` is the constant ``name`` of a loaded kvp module (imported, not injected)."""
    return any(getattr(module, name, None) is value for key, module in list(sys.modules.items())
               if key.split(".")[0] == "kvp")


def check_params(values: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check a notebook's parameters against ``schema`` (name → type hint), then their names;
    return the checked values (name → value, in the schema's order).

    Call it in the first code cell after the ``parameters`` cell as
    ``config = check_params(globals())``: without ``schema``, the annotations of the parameters
    cell (``globals()["__annotations__"]``) are the schema.
    Raises ``TypeError`` naming the parameter, its value and the expected type, and
    :class:`ConfigError` for an unknown model / dataset / method (see :func:`validate_params`) or
    an upper-case global the schema does not name (a misspelt papermill parameter).
    """
    if schema is None:
        schema = values.get("__annotations__", {})
        if not schema:
            raise ConfigError("no annotated parameters: declare them as `NAME: type = value` in "
                              "the cell tagged 'parameters', or pass schema=")
    unknown = [k for k, v in values.items() if re.fullmatch(r"[A-Z][A-Z0-9_]*", k)
               and k not in schema and _injectable(v) and not _imported(k, v)]
    if unknown:
        raise ConfigError(f"unknown parameter {unknown[0]}; this notebook's parameters: "
                          f"{sorted(schema)}. Correct the name (papermill -p NAME VALUE).")
    for name, expected in schema.items():
        if name not in values:
            raise TypeError(f"parameter {name} is missing; declare it in the notebook's parameters cell")
        if not _matches(values[name], expected):
            shown = getattr(expected, "__name__", None) if get_origin(expected) is None else None
            raise TypeError(f"parameter {name}={values[name]!r} has type {type(values[name]).__name__}; "
                            f"expected {shown or expected}. Fix the parameters cell or the profile.")
    checked = {name: values[name] for name in schema}
    validate_params(checked, where="notebook parameters")
    return checked


# ---------------------------------------------------------------------- what parameters name
WRAPPER_SPECS = ("'untrained', 'shipped' (the shipped adapter of the run's dataset), "
                 "'shipped:<dataset>' (e.g. 'shipped:mixture') or the path of a "
                 "wrapper.safetensors file or of the directory holding one")


def load_wrapper(spec: str, model, model_name: str, dataset: str, seed: int = 0,
                 root: str | Path | None = None) -> PacketWrapper:
    """The ``PacketWrapper`` a notebook's ``ADAPTER`` parameter names (see :data:`WRAPPER_SPECS`).

    ``untrained`` is initialised from the embedding statistics (h = t = 8, ``seed``); ``shipped``
    loads ``kvp.adapters.load_adapter(model_name, dataset, seed, root)`` (``root`` defaults to the
    shipped ``data/adapters``); a path is loaded as it is.
    """
    if spec == "untrained":
        return PacketWrapper.init_from_embeddings(model, 8, 8, seed, model_name=model_name)
    if spec == "shipped" or spec.startswith("shipped:"):
        name = spec.partition(":")[2] or dataset
        wrapper = load_adapter(model_name, name, seed, Path(root) if root else ADAPTER_DIR)
    else:
        path = Path(spec)
        path = path / "wrapper.safetensors" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"ADAPTER={spec!r} is neither a known keyword nor an existing file; "
                              f"use {WRAPPER_SPECS}")
        wrapper = PacketWrapper.load(path, model_name=model_name)
    wrapper.check_model(model, model_name)
    return wrapper


def dataset_options(dataset: str, n_docs: int, context_tokens: int, chunk_chars: int,
                    data_path: str = "") -> dict:
    """``load_dataset`` keyword arguments from the notebooks' dataset parameters.

    Biography, multihop and the generated domains take ``N_DOCS`` documents per sample; NIAH a
    haystack of ``CONTEXT_TOKENS`` tokens cut into chunks of at most ``CHUNK_CHARS`` characters;
    jsonl (and a local copy of hotpotqa / musique) the file ``DATA_PATH``, resolved against the
    repository root.
    """
    if dataset in ("biography", "multihop", *DOMAINS):
        return {"num_docs": n_docs}
    if dataset == "niah":
        return {"context_tokens": context_tokens, "chunk_chars": chunk_chars}
    if dataset == "jsonl" and not data_path:
        raise ConfigError("DATASET='jsonl' needs DATA_PATH, the path of your .jsonl file (check "
                          "it with: python -m kvp.data validate FILE)")
    return {"path": repo_path(data_path)} if dataset in FILE_DATASETS and data_path else {}


def training_dataset_options(dataset: str, data_path: str = "") -> dict:
    """The ``TrainConfig.dataset_options`` a training run on ``dataset`` uses: those of the
    shipped recipes for the dataset (e.g. NIAH's haystack, the mixture's components), the file
    ``DATA_PATH`` for jsonl, none otherwise."""
    if dataset == "jsonl":
        return dataset_options(dataset, 0, 0, 0, data_path)
    return next((config.dataset_options for (_, name), config in RECIPES.items()
                 if name == dataset), {})


def method_grid(methods: Sequence[str], recompute_ratios: Sequence[float],
                epic_tokens: Sequence[int]) -> list:
    """One ``kvp.methods`` instance per (method, setting) of a notebook's method parameters.

    Methods with a recompute ``ratio`` (cache_blend, a3, rand_recompute) get one instance per
    value of ``recompute_ratios``, ``epic`` one per value of ``epic_tokens``, the others their
    defaults. E.g. ``method_grid(["kv_packet", "epic"], [0.3], [16, 32])`` has three entries.
    """
    grid = []
    for name in methods:
        if name in ("cache_blend", "a3", "rand_recompute"):
            grid += [get_method(name, ratio=r) for r in recompute_ratios]
        elif name == "epic":
            grid += [get_method(name, n_tokens=n) for n in epic_tokens]
        else:
            grid.append(get_method(name))
    return grid
