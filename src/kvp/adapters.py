"""Shipped adapters: their training recipes, the recipe sweep, and where the adapters live.

``load_adapter("smollm2-135m", "biography")`` returns the trained ``PacketWrapper`` shipped in
``data/adapters/<model>/<dataset>-seed<k>/wrapper.safetensors``; :func:`train_recipe` trains a
recipe into that layout. The benchmark that grades the adapters is :mod:`kvp.report`;
``python -m kvp.adapters train|evaluate|table|compare|rebuild|plot`` is the command line of both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from kvp import distributed
from kvp.data import DOMAINS, GENERATORS
from kvp.data.mixture import general_components
from kvp.models import load_model
from kvp.packet import PacketWrapper
from kvp.results import atomic_path
from kvp.train import TrainConfig, teacher_examples, train, training_samples

ADAPTER_DIR = Path(__file__).resolve().parents[2] / "data" / "adapters"

# Context sizes the 135M/0.5B models handle on a CPU: NIAH at ~1.5K tokens in ≤1000-char chunks.
NIAH_OPTIONS = {"context_tokens": 1536, "chunk_chars": 1000}

# Held-out context shifts (training used 2/3/5/7 documents, uniform slots, normal lengths).
SHIFTS: dict[str, dict[str, dict]] = {
    "biography": {"none": {"num_docs": 5}, "docs10": {"num_docs": 10},
                  "last_slot": {"num_docs": 5, "target_slot": -1},
                  "long_docs": {"num_docs": 5, "doc_length_factor": 2.0}},
    "niah": {"none": NIAH_OPTIONS,
             "long_docs": {**NIAH_OPTIONS, "chunk_chars": 2000},
             "long_context": {**NIAH_OPTIONS, "context_tokens": 3072}},
    **{name: {"none": {"num_docs": 5}} for name in ("multihop", *DOMAINS)},
}
# A cell "holdout-<generator>" is the standard ("none") test of a dataset, evaluated for general
# wrappers trained without that generator (kvp.data.mixture.load_general).
HOLDOUT = "holdout-"


def shift_options(dataset: str, shift: str) -> dict:
    """``load_dataset`` options of the test cell (``dataset``, ``shift``): a ``SHIFTS`` entry, or
    for ``holdout-<generator>`` the dataset's standard test; ``ValueError`` names the choices."""
    if dataset not in SHIFTS:
        raise ValueError(f"no test cells for dataset {dataset!r}; use one of {sorted(SHIFTS)}")
    if shift.startswith(HOLDOUT):
        general_components(shift.removeprefix(HOLDOUT))  # names the generators if unknown
        return SHIFTS[dataset]["none"]
    if shift not in SHIFTS[dataset]:
        raise ValueError(f"shift {shift!r}: use one of {sorted(SHIFTS[dataset])} or "
                         f"'{HOLDOUT}<generator>'")
    return SHIFTS[dataset][shift]
NIAH_TRAIN_OPTIONS = {"context_tokens": 1536, "chunk_chars": 1000, "variant": "single"}

# The recipe sweep (data/adapters/README.md, "Recipe sweep"): a base recipe and named one-factor
# changes to it, trained with seed 0 on qwen2.5-coder-0.5b biography as the adapters
# "biography.<variant>-seed0"; the variant with the lowest validation loss (never the test split)
# became the biography recipe of every model. ``lr`` is in units of the embedding matrix's std.
BIOGRAPHY_BASE = dict(dataset="biography", n_samples=256, num_docs=(2, 3, 5, 7), n_val=64,
                      epochs=20, batch_size=32, micro_batch=4, lr=0.2, lr_scale="embed_std",
                      max_new_tokens=32, autocast=False, tf32=True, checkpoint_every=20)
SWEEP: dict[str, dict] = {
    "base": {},
    "lr0.6": {"lr": 0.6},
    "h32": {"h": 32, "t": 32},
    "tokens": {"init": "tokens"},
    "bf16": {"autocast": True, "tf32": False},
    # Four times the training people at the same 160 steps (1,024 samples, 5 epochs): does more
    # data close the gap between training and validation KL?
    "n1024": {"n_samples": 1024, "epochs": 5},
}
BIOGRAPHY_CHOICE = "lr0.6"  # the sweep's winner by validation loss (0.983 vs base 0.991)
NIAH_BASE = dict(dataset="niah", n_samples=128, n_val=32, dataset_options=NIAH_TRAIN_OPTIONS,
                 epochs=8, batch_size=32, micro_batch=2, lr=0.2, lr_scale="embed_std",
                 max_new_tokens=16, autocast=False, tf32=True, checkpoint_every=8)


def sweep_config(model: str, dataset: str, variant: str, seed: int = 0) -> TrainConfig:
    """The recipe sweep's ``variant`` for ``model`` (only biography is swept)."""
    if dataset != "biography" or variant not in SWEEP:
        raise ValueError(f"no sweep variant ({dataset!r}, {variant!r}); the sweep is on "
                         f"'biography' with variants {sorted(SWEEP)}")
    return TrainConfig(model=model, seed=seed, **{**BIOGRAPHY_BASE, **SWEEP[variant]})


# The general wrappers' recipe (and their in-domain references'): 64 samples per generator of the
# mixture, the biography recipe's optimiser.
GENERAL_BASE = dict(n_samples=64 * (len(GENERATORS) - 1), n_val=8 * (len(GENERATORS) - 1),
                    epochs=12, batch_size=32, micro_batch=4, lr=0.6, lr_scale="embed_std",
                    max_new_tokens=32, autocast=False, tf32=True, checkpoint_every=20)

# The shipped adapters were trained on one GPU with these recipes. The smollm2 NIAH and mixture
# recipes are the earlier ones (batch 16, absolute lr, no validation split); NIAH met its target.
RECIPES: dict[tuple[str, str], TrainConfig] = {
    ("smollm2-135m", "niah"): TrainConfig(
        model="smollm2-135m", dataset="niah", n_samples=256, dataset_options=NIAH_TRAIN_OPTIONS,
        epochs=8, lr=1e-3, batch_size=16, max_new_tokens=16, checkpoint_every=16),
    ("smollm2-135m", "mixture"): TrainConfig(
        model="smollm2-135m", dataset="mixture", n_samples=256,
        dataset_options={"components": {"biography": 128, "niah": 128},
                         "options": {"biography": {"num_docs": 5}, "niah": NIAH_TRAIN_OPTIONS}},
        epochs=8, lr=1e-3, batch_size=16, max_new_tokens=16, checkpoint_every=16),
    **{(m, "biography"): sweep_config(m, "biography", BIOGRAPHY_CHOICE)
       for m in ("smollm2-135m", "qwen2.5-coder-0.5b")},
    # The 1.5B model trains 10 of the 20 epochs (80 steps): its validation KL flattens by then,
    # and it costs three times the 0.5B model's GPU time per step.
    ("qwen2.5-coder-1.5b", "biography"): TrainConfig(
        model="qwen2.5-coder-1.5b", **{**BIOGRAPHY_BASE, **SWEEP[BIOGRAPHY_CHOICE], "epochs": 10}),
    **{(m, "niah"): TrainConfig(model=m, **NIAH_BASE)
       for m in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")},
    # General wrappers, leave-one-domain-out: "general-<kind>" trains on every generator but that
    # kind of document, 64 samples each (NIAH at the CPU-sized context), with the biography recipe's
    # optimiser; it is then evaluated on the held-out kind (--holdout), on NIAH and on multihop.
    **{(m, f"general-{held}"): TrainConfig(
        model=m, dataset="general", dataset_options={"holdout": held,
                                                     "options": {"niah": NIAH_TRAIN_OPTIONS}},
        **GENERAL_BASE)
       for m in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b") for held in DOMAINS},
    # The in-domain reference of a general wrapper: the same recipe and number of samples, all of
    # the held-out kind (its train split: no entity of the test split).
    **{(m, kind): TrainConfig(model=m, dataset=kind, **GENERAL_BASE)
       for m in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b") for kind in DOMAINS},
}


def adapter_dir(model: str, dataset: str, seed: int = 0, root: Path = ADAPTER_DIR) -> Path:
    return root / model.replace("/", "__") / f"{dataset}-seed{seed}"


def load_adapter(model: str, dataset: str, seed: int = 0, root: Path = ADAPTER_DIR):
    """The shipped wrapper for (model, dataset, seed); a clear error lists what is shipped."""
    path = adapter_dir(model, dataset, seed, root) / "wrapper.safetensors"
    if not path.exists():
        shipped = sorted(str(p.parent.relative_to(root)) for p in root.glob("*/*/wrapper.safetensors"))
        raise FileNotFoundError(f"no adapter for model={model!r}, dataset={dataset!r}, seed={seed} "
                                f"at {path}; shipped: {shipped or 'none'}. Train one with: "
                                f"python -m kvp.adapters train --model {model} --dataset {dataset}")
    return PacketWrapper.load(path, model_name=model)


def recipe(model: str, dataset: str, seed: int = 0, variant: str | None = None) -> TrainConfig:
    """The shipped recipe for (model, dataset), or the sweep's ``variant`` of it."""
    if variant is not None:
        return sweep_config(model, dataset, variant, seed)
    if (model, dataset) not in RECIPES:
        raise ValueError(f"no recipe for ({model!r}, {dataset!r}); recipes: {sorted(RECIPES)}")
    base = RECIPES[(model, dataset)]
    return TrainConfig(**{**base.to_dict(), "seed": seed})


def adapter_name(dataset: str, variant: str | None = None) -> str:
    """Folder stem of an adapter: ``"biography"``, or ``"biography.h32"`` for a sweep variant."""
    return f"{dataset}.{variant}" if variant else dataset


def train_recipe(model_name: str, dataset: str, seeds: list[int], root: Path, device=None,
                 teacher_only: bool = False, variant: str | None = None) -> dict[Path, TrainConfig]:
    """Train the recipe (or sweep ``variant``) for each seed into ``adapter_dir``; each run writes
    its ``config.json`` with the command that reproduces it. Returns each run directory with its
    config (the loss figures are drawn above training: ``kvp.plots.save_loss_figure``).

    ``teacher_only`` fills the shared teacher cache (``root/<model>/teacher``, training and
    validation samples) and stops, returning no run: several seeds or variants can then train at
    once, as separate processes, without generating the targets twice.
    """
    model, tokenizer, spec = load_model(model_name, device=device, dtype="float32")
    spec.require_trained()
    name = adapter_name(dataset, variant)
    if teacher_only:
        config = recipe(model_name, dataset, variant=variant)
        for split in ("train", "val") if config.n_val else ("train",):
            teacher_examples(model, tokenizer, training_samples(config, split), config,
                             adapter_dir(model_name, name, 0, root).parent / "teacher")
        return {}
    runs = {}
    for seed in seeds:
        config = recipe(model_name, dataset, seed, variant)
        out = adapter_dir(model_name, name, seed, root)
        result = train(model, tokenizer, config, out)
        if not distributed.is_main():  # rank 0 writes
            continue
        (out / "checkpoint.pt").unlink(missing_ok=True)  # optimiser state: not shipped
        command = (f"python -m kvp.adapters train --model {model_name} --dataset {dataset} "
                   f"--seeds {seed}" + (f" --variant {variant}" if variant else ""))
        with atomic_path(out / "config.json") as tmp:
            tmp.write_text(json.dumps({**result.record, "command": command}, indent=1) + "\n")
        runs[out] = config
    return runs


def sweep_variant(record: dict) -> str | None:
    """The sweep variant whose seed-0 config an adapter's training record has, if any."""
    config = TrainConfig(**record["config"])
    if config.dataset != "biography" or config.seed != 0:
        return None
    return next((v for v in SWEEP if sweep_config(config.model, "biography", v) == config), None)


def parse_adapter(name: str) -> tuple[str, int]:
    """``"biography-seed2"`` → ``("biography", 2)``; a bare ``"biography"`` means seed 0."""
    dataset, sep, seed = name.rpartition("-seed")
    if not sep:
        return name, 0
    if not seed.isdigit():
        raise ValueError(f"adapter {name!r}: use <dataset>-seed<k>, e.g. biography-seed1")
    return dataset, int(seed)


def adapter_of(wrappers: pd.Series) -> pd.Series:
    """Wrapper names without their seed (``"mixture-seed1"`` → ``"mixture"``; baselines ``""``)."""
    return wrappers.fillna("").str.replace(r"-seed\d+$", "", regex=True)


if __name__ == "__main__":
    # The command line trains and grades: it is the report's, one layer above this registry.
    from kvp.report import main

    with distributed.process_group():  # torchrun: train / evaluate sharded across ranks
        raise SystemExit(main())
