"""Shipped adapters: their training recipes, where they live, and the benchmark that grades them.

``load_adapter("smollm2-135m", "biography")`` returns the trained ``PacketWrapper`` shipped in
``data/adapters/<model>/<dataset>-seed<k>/wrapper.safetensors``. ``python -m kvp.adapters train``
re-trains every recipe (the command each adapter's README line quotes); ``python -m kvp.adapters
evaluate`` writes the table of issue "adapter training" (``data/adapters/results.csv``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from kvp.data import DOMAINS, GENERATORS
from kvp.results import atomic_path
from kvp.train import TrainConfig

ADAPTER_DIR = Path(__file__).resolve().parents[2] / "data" / "adapters"

# Context sizes the 135M/0.5B models handle on a CPU: NIAH at ~1.5K tokens in ≤1000-char chunks.
NIAH_OPTIONS = {"context_tokens": 1536, "chunk_chars": 1000}
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
    "lr0.06": {"lr": 0.06},
    "lr0.6": {"lr": 0.6},
    "h16": {"h": 16, "t": 16},
    "h32": {"h": 32, "t": 32},
    "tokens": {"init": "tokens"},
    "bf16": {"autocast": True, "tf32": False},
    "n512": {"n_samples": 512},
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
    # The 1.5B model got 6 of the 20 epochs: the GPU time of its session ran out.
    ("qwen2.5-coder-1.5b", "biography"): TrainConfig(
        model="qwen2.5-coder-1.5b", **{**BIOGRAPHY_BASE, **SWEEP[BIOGRAPHY_CHOICE], "epochs": 6}),
    **{(m, "niah"): TrainConfig(model=m, **NIAH_BASE)
       for m in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")},
    # General wrappers, leave-one-domain-out: "general-<kind>" trains on every generator but that
    # kind of document, 64 samples each (NIAH at the CPU-sized context), with the biography recipe's
    # optimiser; it is then evaluated on the held-out kind (--holdout), on NIAH and on multihop.
    **{(m, f"general-{held}"): TrainConfig(
        model=m, dataset="general", n_samples=64 * (len(GENERATORS) - 1),
        n_val=8 * (len(GENERATORS) - 1),
        dataset_options={"holdout": held, "options": {"niah": NIAH_TRAIN_OPTIONS}},
        epochs=12, batch_size=32, micro_batch=4, lr=0.6, lr_scale="embed_std", max_new_tokens=32,
        autocast=False, tf32=True, checkpoint_every=20)
       for m in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b") for held in DOMAINS},
}


def adapter_dir(model: str, dataset: str, seed: int = 0, root: Path = ADAPTER_DIR) -> Path:
    return root / model.replace("/", "__") / f"{dataset}-seed{seed}"


def load_adapter(model: str, dataset: str, seed: int = 0, root: Path = ADAPTER_DIR):
    """The shipped wrapper for (model, dataset, seed); a clear error lists what is shipped."""
    from kvp.packet import PacketWrapper

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
    """Folder stem of an adapter: ``"biography"``, or ``"biography.h16"`` for a sweep variant."""
    return f"{dataset}.{variant}" if variant else dataset


def train_recipe(model_name: str, dataset: str, seeds: list[int], root: Path, device=None,
                 plot: bool = True, teacher_only: bool = False,
                 variant: str | None = None) -> None:
    """Train the recipe (or sweep ``variant``) for each seed into ``adapter_dir``; each run writes
    its ``config.json`` with the command that reproduces it.

    ``teacher_only`` fills the shared teacher cache (``root/<model>/teacher``, training and
    validation samples) and stops: several seeds or variants can then train at once, as separate
    processes, without generating the targets twice.
    """
    from kvp.models import load_model
    from kvp.train import teacher_examples, train, training_samples

    model, tokenizer, spec = load_model(model_name, device=device, dtype="float32")
    spec.require_trained()
    name = adapter_name(dataset, variant)
    if teacher_only:
        config = recipe(model_name, dataset, variant=variant)
        for split in ("train", "val") if config.n_val else ("train",):
            teacher_examples(model, tokenizer, training_samples(config, split), config,
                             adapter_dir(model_name, name, 0, root).parent / "teacher")
        return
    for seed in seeds:
        config = recipe(model_name, dataset, seed, variant)
        out = adapter_dir(model_name, name, seed, root)
        result = train(model, tokenizer, config, out, plot=plot)
        (out / "checkpoint.pt").unlink(missing_ok=True)  # optimiser state: not shipped
        command = (f"python -m kvp.adapters train --model {model_name} --dataset {dataset} "
                   f"--seeds {seed}" + (f" --variant {variant}" if variant else ""))
        (out / "config.json").write_text(json.dumps({**result.record, "command": command},
                                                    indent=1) + "\n")


def sweep_variant(record: dict) -> str | None:
    """The sweep variant whose seed-0 config an adapter's training record has, if any."""
    config = TrainConfig(**record["config"])
    if config.dataset != "biography" or config.seed != 0:
        return None
    return next((v for v in SWEEP if sweep_config(config.model, "biography", v) == config), None)


def sweep_table(root: Path, results: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per trained sweep variant under ``root`` (any seed-0 adapter whose record is a
    variant's config): what it changes, its selected step, validation loss (all answer positions
    and the first), teacher truncation and, where ``results`` has them, test F1 and agreement."""
    out = []
    for path in sorted(root.glob("*/*-seed0/config.json")):
        record = json.loads(path.read_text())
        variant = sweep_variant(record)
        if variant is None:
            continue
        row = {"model": path.parent.parent.name, "variant": variant,
               "changes": ", ".join(f"{k}={v}" for k, v in SWEEP[variant].items()) or "(base)",
               "steps": record["steps"], "best_step": record.get("best_step"),
               "val_loss": record.get("best_val_loss"), "val_first": record.get("best_val_first"),
               "train_loss": record["final_loss"],
               "teacher_truncated": record.get("teacher_truncated"),
               "teacher_topk_mass": record.get("teacher_topk_mass"),
               "wall_s": record["wall_s"], "wrapper": path.parent.name}
        if results is not None:
            hit = results[(results.model == row["model"]) & (results.dataset == "biography")
                          & (results.split_shift == "none") & (results.wrapper == row["wrapper"])]
            if len(hit):
                row.update(test_f1=hit.f1_micro.iloc[-1], agreement=hit.agree_f1.iloc[-1])
        out.append(row)
    return pd.DataFrame(out)


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
RESULT_COLUMNS = ["model", "dataset", "split_shift", "method", "seed", "n", "f1_micro", "ci_low",
                  "ci_high", "agree_f1", "wrapper", "max_new_tokens", "retention"]


def shift_options(dataset: str, shift: str) -> dict:
    """``load_dataset`` options of the test cell (``dataset``, ``shift``): a ``SHIFTS`` entry, or
    for ``holdout-<generator>`` the dataset's standard test; ``ValueError`` names the choices."""
    if dataset not in SHIFTS:
        raise ValueError(f"no test cells for dataset {dataset!r}; use one of {sorted(SHIFTS)}")
    if shift.startswith(HOLDOUT):
        from kvp.data.mixture import general_components

        general_components(shift.removeprefix(HOLDOUT))  # names the generators if unknown
        return SHIFTS[dataset]["none"]
    if shift not in SHIFTS[dataset]:
        raise ValueError(f"shift {shift!r}: use one of {sorted(SHIFTS[dataset])} or "
                         f"'{HOLDOUT}<generator>'")
    return SHIFTS[dataset][shift]


def parse_adapter(name: str) -> tuple[str, int]:
    """``"biography-seed2"`` → ``("biography", 2)``; a bare ``"biography"`` means seed 0."""
    dataset, sep, seed = name.rpartition("-seed")
    if not sep:
        return name, 0
    if not seed.isdigit():
        raise ValueError(f"adapter {name!r}: use <dataset>-seed<k>, e.g. biography-seed1")
    return dataset, int(seed)


def evaluate_adapters(model_name: str, dataset: str, shift: str, n: int,
                      wrappers: list[str] | None = None, root: Path = ADAPTER_DIR,
                      max_new_tokens: int | None = None,
                      rows_path: Path | None = None, dtype: str = "float32") -> pd.DataFrame:
    """full_recompute, no_recompute and kv_packet (one row per wrapper) on ``n`` test samples; the
    baselines run once and every wrapper is compared on the same samples.

    ``wrappers`` names the adapters as ``<dataset>-seed<k>`` (default: the dataset's own, seed 0;
    add e.g. ``mixture-seed0`` for the transfer of the mixture adapter).
    The model runs in ``dtype`` (float32, the precision the adapters train in, on every device).
    ``rows_path`` (``.csv.gz``) keeps the per-sample answers, for paired comparisons later. It is
    rewritten after the baselines and after each wrapper, and a later call reuses the rows it holds
    for the same (sample, method, wrapper, ``max_new_tokens``): an interrupted run resumes, and a
    larger ``n`` evaluates only the new samples (the test samples of a seed are prefix-stable).
    The file only grows: rows of other samples or wrappers are kept, so a smaller ``n`` never
    shrinks it, and a file holding another decoding budget is refused (:func:`check_rows_budget`).
    """
    from kvp.data import load_dataset
    from kvp.evaluate import EvalSettings, evaluate
    from kvp.methods import get_method
    from kvp.models import load_model
    from kvp.packet import PacketStore

    if rows_path is not None:
        check_rows_budget(rows_path, max_new_tokens)
    model, tokenizer, spec = load_model(model_name, dtype=dtype)
    spec.require_trained()
    samples = load_dataset(dataset, "test", n=n, seed=42, **shift_options(dataset, shift))
    settings = EvalSettings(model_name, max_new_tokens=max_new_tokens)
    store = PacketStore(model, tokenizer, model_name, max_in_memory=64)  # documents don't recur
    order = {s.id: i for i, s in enumerate(samples)}
    everything = read_rows(rows_path) if rows_path is not None else None
    previous = reusable_rows(everything, max_new_tokens, order)
    parts: list[pd.DataFrame] = []

    def run(methods: list[str], seed: int, wrapper_name: str, wrapper=None) -> pd.DataFrame:
        """Rows of ``methods`` on every sample: reused from ``previous`` or evaluated now."""
        mine = previous[previous.method.isin(methods) & (previous.wrapper == wrapper_name)]
        complete = mine.groupby("sample_id").method.nunique() == len(methods)
        kept = mine[mine.sample_id.isin(complete[complete].index)]
        have = set(kept.sample_id)
        todo = [s for s in samples if s.id not in have]
        done = [kept] if len(kept) else []
        if todo:
            new = evaluate(model, tokenizer, todo, [get_method(m) for m in methods], settings,
                           wrapper=wrapper, store=store)
            done.append(new.assign(seed=seed, wrapper=wrapper_name, max_new_tokens=max_new_tokens))
        done = pd.concat(done, ignore_index=True)
        done = done.sort_values("sample_id", key=lambda ids: ids.map(order), kind="stable")
        parts.append(done.reset_index(drop=True))
        if rows_path is not None:
            write_rows(rows_path, merge_rows(everything, pd.concat(parts, ignore_index=True)
                                             .assign(split_shift=shift)))
        return parts[-1]

    loaded = []  # every wrapper loads before the baselines run: a missing one fails at once
    for name in wrappers or [f"{dataset}-seed0"]:
        wrapper_dataset, seed = parse_adapter(name)
        loaded.append((seed, f"{wrapper_dataset}-seed{seed}",
                       load_adapter(model_name, wrapper_dataset, seed, root)))
    run(["full_recompute", "no_recompute"], -1, "")
    for seed, name, wrapper in loaded:
        run(["kv_packet"], seed, name, wrapper)
    return summarize_rows(pd.concat(parts, ignore_index=True), shift, max_new_tokens)


def summarize_rows(rows: pd.DataFrame, shift: str, max_new_tokens: int | None,
                   n_boot: int = 1000) -> pd.DataFrame:
    """``RESULT_COLUMNS`` rows from per-sample rows of one (model, dataset, shift): the baselines
    once, each wrapper scored against the same full recompute answers (``n_boot`` bootstrap
    resamples for the CIs)."""
    from kvp.evaluate import summarize

    reference = rows[rows.method == "full_recompute"]
    out = []
    for (seed, wrapper), part in rows.groupby(["seed", "wrapper"], sort=False):
        with_ref = pd.concat([reference, part]).drop_duplicates(subset=["sample_id", "method"])
        summary = summarize(with_ref, n_boot=n_boot)
        summary = summary[summary.method.isin(part.method.unique())]
        out.append(summary.assign(split_shift=shift, seed=seed, wrapper=wrapper,
                                  max_new_tokens=max_new_tokens))
    return pd.concat(out, ignore_index=True)[RESULT_COLUMNS]


def results_from_rows(rows_dir: Path, n_boot: int = 1000) -> pd.DataFrame:
    """The results table recomputed from every per-sample rows file under ``rows_dir``."""
    out = []
    for path in sorted(rows_dir.glob("*.csv.gz")):
        rows = read_rows(path)
        budget = budgets(rows["max_new_tokens"]) if "max_new_tokens" in rows else set()
        out.append(summarize_rows(rows, rows.split_shift.iloc[0],
                                  budget.pop() if len(budget) == 1 else None, n_boot))
    return pd.concat(out, ignore_index=True)


def slot_breakdown(rows: pd.DataFrame) -> pd.DataFrame:
    """Micro F1 per target-document slot (biography rows), one column per (method, wrapper)."""
    from kvp.evaluate import meta_breakdown

    return meta_breakdown(rows, "target_slot", "target slot")


ROW_KEY = ["sample_id", "method", "wrapper"]


def read_rows(path: Path) -> pd.DataFrame | None:
    """Per-sample rows written by :func:`evaluate_adapters` (``gold`` parsed back into lists), or
    ``None`` when there is no file."""
    import ast

    if not path.exists():
        return None
    rows = pd.read_csv(path, keep_default_na=False, dtype={"answer": str, "raw_answer": str})
    rows["gold"] = rows["gold"].map(ast.literal_eval)
    return rows


def write_rows(path: Path, rows: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        rows.to_csv(tmp, index=False, compression="gzip")


def merge_rows(old: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """``new`` plus every row of ``old`` it does not replace (same sample, method and wrapper):
    a rows file only grows."""
    if old is None or not len(old):
        return new
    replaced = old.set_index(ROW_KEY).index.isin(new.set_index(ROW_KEY).index)
    return pd.concat([old[~replaced], new], ignore_index=True)


def budgets(values: pd.Series) -> set:
    """Decoding budgets of a column (``None`` for the dataset's default)."""
    return {None if v in ("", None) or pd.isna(v) else int(float(v)) for v in values}


def check_rows_budget(path: Path, max_new_tokens: int | None) -> None:
    """Refuse to add rows of budget ``max_new_tokens`` to a rows file holding another budget."""
    rows = read_rows(path)
    if rows is None or not len(rows):
        return
    if "max_new_tokens" not in rows:
        raise ValueError(f"{path} predates recorded decoding budgets, so rows of "
                         f"--max-new-tokens {max_new_tokens} cannot be merged into it safely; "
                         "write elsewhere with --out DIR, or delete the file to re-evaluate")
    held = budgets(rows["max_new_tokens"]) - {max_new_tokens}
    if held:
        raise ValueError(f"{path} holds rows of max_new_tokens={sorted(held, key=str)}, not "
                         f"{max_new_tokens}; one file keeps one decoding budget. Re-run with "
                         f"--max-new-tokens {sorted(held, key=str)[0]} or write elsewhere "
                         "with --out DIR")


def reusable_rows(rows: pd.DataFrame | None, max_new_tokens: int | None,
                  sample_ids) -> pd.DataFrame:
    """The rows of an earlier run that this one may reuse: same decoding budget, requested samples
    (none from a file written before the budget was recorded)."""
    if rows is None or "max_new_tokens" not in rows:
        return pd.DataFrame(columns=ROW_KEY)
    same = rows["max_new_tokens"].map(lambda v: budgets([v]) == {max_new_tokens})
    return rows[same & rows.sample_id.isin(sample_ids)]


CELL = ["model", "dataset", "split_shift"]


def check_results_compatible(path: Path, model: str, dataset: str, shift: str, n: int,
                             max_new_tokens: int | None) -> None:
    """Refuse rows of another ``n`` or decoding budget for a (model, dataset, shift) cell that
    ``path`` already holds: one table compares results of one sample count and budget."""
    if not path.exists():
        return
    old = pd.read_csv(path, keep_default_na=False)
    cell = old[(old.model == model) & (old.dataset == dataset) & (old.split_shift == shift)]
    other_n = sorted(set(cell.n.astype(int)) - {n})
    if other_n:
        raise ValueError(f"{path} holds {model} · {dataset} · {shift} at n={other_n[0]}, not "
                         f"n={n}; one table keeps one n per cell. Use --n {other_n[0]}, or write "
                         "elsewhere with --out DIR")
    if "max_new_tokens" in cell:
        known = {b for b in budgets(cell.max_new_tokens)} - {max_new_tokens}
        known.discard(None)  # rows written before the budget was recorded
        if known:
            raise ValueError(f"{path} holds {model} · {dataset} · {shift} at max_new_tokens="
                             f"{sorted(known)[0]}, not {max_new_tokens}; use --max-new-tokens "
                             f"{sorted(known)[0]}, or write elsewhere with --out DIR")


def append_results(table: pd.DataFrame, path: Path) -> None:
    """Merge rows into the results CSV (written whole through a temporary file): rows of the same
    cell, method, seed and wrapper are replaced, every other row is kept; a table of another ``n``
    or decoding budget for the same cell is refused (:func:`check_results_compatible`)."""
    for (model, dataset, shift), part in table.groupby(CELL):
        for n in sorted(set(part.n)):
            check_results_compatible(path, model, dataset, shift, int(n),
                                     (budgets(part.max_new_tokens) or {None}).pop()
                                     if "max_new_tokens" in part else None)
    merged = table
    if path.exists():
        old = pd.read_csv(path, keep_default_na=False)
        merged = pd.concat([old, table], ignore_index=True)
    merged = merged.drop_duplicates(
        subset=["model", "dataset", "split_shift", "method", "seed", "wrapper"], keep="last")
    with atomic_path(path) as tmp:
        merged.to_csv(tmp, index=False, float_format="%.4f")


# Parameter counts of the embedded models and the paper's (biography, 5 documents) F1 points.
MODEL_PARAMETERS = {"smollm2-135m": 134.5e6, "qwen2.5-coder-0.5b": 494e6,
                    "qwen2.5-coder-1.5b": 1.54e9}
PAPER_POINTS = [  # (model, parameters, full recompute F1, KV Packet F1), data/reference
    ("Qwen3-4B (paper)", 4.02e9, 0.9814, 0.8486),
    ("Llama-3.1-8B (paper)", 8.03e9, 0.9792, 0.9431),
]


def sweep_markdown(table: pd.DataFrame) -> str:
    """The recipe sweep as markdown (lowest validation loss first)."""
    lines = ["| model | variant | changes | selected step / steps | val KL | val KL, first token | "
             "train KL | test F1 | agreement |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table.sort_values(["model", "val_loss"]).itertuples():
        f1 = f"{r.test_f1:.3f}" if "test_f1" in table and pd.notna(r.test_f1) else "–"
        agree = f"{r.agreement:.3f}" if "agreement" in table and pd.notna(r.agreement) else "–"
        lines.append(f"| {r.model} | {r.variant} | {r.changes} | {r.best_step} / {r.steps} | "
                     f"{r.val_loss:.3f} | {r.val_first:.3f} | {r.train_loss:.3f} | {f1} | {agree} |")
    return "\n".join(lines) + "\n"


def breakdown_markdown(table: pd.DataFrame) -> str:
    """A :func:`meta_breakdown` table as markdown."""
    lines = [f"| {table.index.name} | " + " | ".join(table.columns) + " |",
             "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {key} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
              for key, row in table.iterrows()]
    return "\n".join(lines) + "\n"


def results_markdown(path: Path) -> str:
    """The results CSV as a markdown table (one row per measured cell)."""
    table = pd.read_csv(path)
    lines = ["| model | dataset | shift | method | wrapper | n | F1 (95% CI) | agreement | "
             "retention |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.model} | {r.dataset} | {r.split_shift} | {r.method} | "
                     f"{r.wrapper if isinstance(r.wrapper, str) else ''} | {r.n} | "
                     f"{r.f1_micro:.3f} ({r.ci_low:.3f}–{r.ci_high:.3f}) | {r.agree_f1:.3f} | "
                     f"{r.retention:.3f} |")
    return "\n".join(lines) + "\n"


def adapter_of(wrappers: pd.Series) -> pd.Series:
    """Wrapper names without their seed (``"mixture-seed1"`` → ``"mixture"``; baselines ``""``)."""
    return wrappers.fillna("").str.replace(r"-seed\d+$", "", regex=True)


def seed_summary(results: pd.DataFrame) -> pd.DataFrame:
    """kv_packet over wrapper seeds, beside the baselines of the same cells.

    One row per (model, dataset, split_shift, adapter): ``seeds``, F1 and agreement as mean and
    standard deviation over seeds, and ``f1_ratio`` = mean kv_packet F1 / full_recompute F1.
    """
    results = results.assign(adapter=adapter_of(results.wrapper))
    keys = ["model", "dataset", "split_shift"]
    base = results[results.method != "kv_packet"].set_index(keys + ["method"])
    out = []
    for (*key, adapter), g in results[results.method == "kv_packet"].groupby(keys + ["adapter"]):
        def baseline(method: str, metric: str) -> float:
            return base[metric].get((*key, method), float("nan"))

        full = baseline("full_recompute", "f1_micro")
        out.append({**dict(zip(keys, key)), "adapter": adapter, "n": int(g.n.iloc[0]),
                    "seeds": len(g), "f1_mean": g.f1_micro.mean(), "f1_sd": g.f1_micro.std(ddof=0),
                    "agree_mean": g.agree_f1.mean(), "agree_sd": g.agree_f1.std(ddof=0),
                    "full_f1": full,
                    "f1_ratio": g.f1_micro.mean() / full if full > 0 else float("nan"),
                    "no_recompute_f1": baseline("no_recompute", "f1_micro"),
                    "no_recompute_agree": baseline("no_recompute", "agree_f1")})
    out = pd.DataFrame(out)
    order = out.assign(standard=out.split_shift != "none")  # the standard test first
    return out.loc[order.sort_values(keys[:2] + ["standard", "split_shift"], kind="stable").index]


def paired_agreement(rows_path: Path, n_boot: int = 1000) -> pd.DataFrame:
    """Per wrapper: agreement of kv_packet minus that of no_recompute on the same samples, with a
    paired bootstrap 95% CI and p-value (reads the per-sample rows ``evaluate`` wrote)."""
    from kvp.metrics import agreement_f1, paired_bootstrap

    rows = read_rows(rows_path)
    ref = rows[rows.method == "full_recompute"].set_index("sample_id")["answer"]
    plain = rows[rows.method == "no_recompute"].set_index("sample_id")["answer"]
    out = []
    for wrapper, g in rows[rows.method == "kv_packet"].groupby("wrapper", sort=False):
        ids = list(g.sample_id)
        diff, low, high, p = paired_bootstrap(list(g.answer), list(plain.loc[ids]),
                                              list(ref.loc[ids]), agreement_f1, n_boot)
        out.append({"model": g.model.iloc[0], "dataset": g.dataset.iloc[0],
                    "split_shift": g.split_shift.iloc[0], "wrapper": wrapper, "n": len(ids),
                    "agree_gain": diff, "ci_low": low, "ci_high": high, "p_value": p})
    return pd.DataFrame(out)


def summary_markdown(results: pd.DataFrame, rows_dir: Path | None = None) -> str:
    """Markdown of :func:`seed_summary` (and of :func:`paired_agreement` for each rows file)."""
    lines = ["| model | dataset | shift | adapter | n | seeds | kv_packet F1 (mean ± sd) | "
             "% of full F1 | agreement (mean ± sd) | full F1 | no_recompute F1 / agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in seed_summary(results).itertuples():
        lines.append(f"| {r.model} | {r.dataset} | {r.split_shift} | {r.adapter} | {r.n} | "
                     f"{r.seeds} | {r.f1_mean:.3f} ± {r.f1_sd:.3f} | {100 * r.f1_ratio:.0f}% | "
                     f"{r.agree_mean:.3f} ± {r.agree_sd:.3f} | {r.full_f1:.3f} | "
                     f"{r.no_recompute_f1:.3f} / {r.no_recompute_agree:.3f} |")
    files = sorted(rows_dir.glob("*.csv.gz")) if rows_dir is not None else []
    if files:
        lines += ["", "| model | dataset | shift | wrapper | n | agreement gain over no_recompute "
                  "(paired 95% CI) | p |", "|---|---|---|---|---|---|---|"]
        for r in pd.concat([paired_agreement(f) for f in files]).itertuples():
            lines.append(f"| {r.model} | {r.dataset} | {r.split_shift} | {r.wrapper} | {r.n} | "
                         f"{r.agree_gain:+.3f} ({r.ci_low:+.3f} to {r.ci_high:+.3f}) | "
                         f"{r.p_value:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvp.adapters",
                                     description="Train or evaluate the shipped adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train recipes into data/adapters")
    tr.add_argument("--model", default="smollm2-135m",
                    help="registry name of the model (default: %(default)s)")
    tr.add_argument("--dataset", required=True, choices=sorted({d for _, d in RECIPES}),
                    help="which recipe of kvp.adapters.RECIPES")
    tr.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="training seeds, one adapter each (default: 0)")
    tr.add_argument("--root", type=Path, default=ADAPTER_DIR,
                    help="where adapters are written (default: data/adapters)")
    tr.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    tr.add_argument("--no-plot", action="store_true", help="skip loss figures (draw them later)")
    tr.add_argument("--variant", default=None, choices=sorted(SWEEP),
                    help="train a variant of the recipe sweep instead, as DATASET.VARIANT-seedK "
                    "(biography only; default: the shipped recipe)")
    tr.add_argument("--teacher-only", action="store_true",
                    help="only fill the teacher cache (then train seeds in parallel processes)")
    ev = sub.add_parser("evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="merge F1/agreement rows into OUT/results.csv and per-sample answers "
                        "into OUT/rows/ (OUT: results/adapters, or data/adapters with "
                        "--update-shipped)")
    ev.add_argument("--model", default="smollm2-135m", help="registry name of the model")
    ev.add_argument("--dataset", required=True, choices=sorted(SHIFTS), help="test set")
    ev.add_argument("--shift", default="none", help="held-out context shift (kvp.adapters.SHIFTS)")
    ev.add_argument("--holdout", default=None, choices=GENERATORS,
                    help="leave-one-domain-out: the cell 'holdout-HOLDOUT' (the standard test of "
                    "DATASET) with, by default, the wrapper general-HOLDOUT-seed0")
    ev.add_argument("--wrappers", nargs="+", default=None,
                    help="adapters to compare, e.g. niah-seed0 niah-seed1 mixture-seed0 "
                    "(default: DATASET-seed0, or general-HOLDOUT-seed0)")
    ev.add_argument("--n", type=int, default=100, help="test samples (seed 42)")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="decoding budget (default: the dataset's)")
    ev.add_argument("--root", type=Path, default=ADAPTER_DIR, help="where the adapters are read")
    ev.add_argument("--out", type=Path, default=None,
                    help="directory of results.csv and rows/ (default: results/adapters)")
    ev.add_argument("--update-shipped", action="store_true",
                    help="write into the shipped data/adapters (refused for another n or budget "
                    "than the shipped cell's)")
    ev.add_argument("--dtype", default="float32",
                    help="precision of the model (default float32, as the adapters train)")
    ev.add_argument("--results", type=Path, default=None,
                    help="CSV to merge into (default: OUT/results.csv)")
    tb = sub.add_parser("table", help="print results.csv, its seed summary and paired gains as "
                        "markdown, and draw ROOT/results.png")
    tb.add_argument("--root", type=Path, default=ADAPTER_DIR)
    rb = sub.add_parser("rebuild", help="recompute ROOT/results.csv from the per-sample rows in "
                        "ROOT/rows (e.g. after a new column such as retention)")
    rb.add_argument("--root", type=Path, default=ADAPTER_DIR)
    pl = sub.add_parser("plot", help="draw the loss figure of every adapter under --root")
    pl.add_argument("--root", type=Path, default=ADAPTER_DIR)
    args = parser.parse_args(argv)
    if args.command == "train":
        train_recipe(args.model, args.dataset, args.seeds, args.root, args.device,
                     plot=not args.no_plot, teacher_only=args.teacher_only,
                     variant=args.variant)
    elif args.command == "evaluate":
        if args.holdout is not None:
            if args.shift != "none":
                parser.error("--holdout names the cell itself; drop --shift")
            args.shift = HOLDOUT + args.holdout
            args.wrappers = args.wrappers or [f"general-{args.holdout}-seed0"]
        try:
            shift_options(args.dataset, args.shift)
        except ValueError as err:
            parser.error(f"--shift: {err}")
        if args.update_shipped and args.out is not None:
            parser.error("--update-shipped writes into data/adapters; drop --out or it")
        out = ADAPTER_DIR if args.update_shipped else args.out or Path("results") / "adapters"
        rows = out / "rows" / f"{args.model}__{args.dataset}__{args.shift}.csv.gz"
        results = args.results or out / "results.csv"
        try:  # before the long evaluation: nothing would be written
            check_rows_budget(rows, args.max_new_tokens)
            check_results_compatible(results, args.model, args.dataset, args.shift, args.n,
                                     args.max_new_tokens)
        except ValueError as err:
            parser.error(str(err))
        table = evaluate_adapters(args.model, args.dataset, args.shift, args.n, args.wrappers,
                                  args.root, args.max_new_tokens, rows, args.dtype)
        append_results(table, results)
        print(table.to_string(index=False))
        print(f"wrote {results} and {rows}")
    elif args.command == "table":
        print(results_markdown(args.root / "results.csv"))
        results = pd.read_csv(args.root / "results.csv", keep_default_na=False)
        print(summary_markdown(results, args.root / "rows"), end="")
        from kvp.plots import plot_adapter_results, plot_fidelity_vs_size, save_fig

        save_fig(plot_adapter_results(results), "results", fig_dir=args.root)
        sweep = sweep_table(args.root, results)
        if len(sweep):  # a results directory of evaluations only has no sweep
            print("\n" + sweep_markdown(sweep))
        from kvp.evaluate import hop_breakdown

        for pattern, title, breakdown in [("*__biography__none", "target slot", slot_breakdown),
                                          ("*__multihop__*", "hop count", hop_breakdown)]:
            for path in sorted(args.root.glob(f"rows/{pattern}.csv.gz")):
                model, _, shift = path.name.removesuffix(".csv.gz").split("__")
                print(f"\nF1 by {title}, {model} ({shift}):\n")
                print(breakdown_markdown(breakdown(read_rows(path))), end="")
        save_fig(plot_fidelity_vs_size(seed_summary(results), PAPER_POINTS, MODEL_PARAMETERS),
                 "fidelity", fig_dir=args.root)
    elif args.command == "rebuild":
        table = results_from_rows(args.root / "rows")
        with atomic_path(args.root / "results.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.4f")
        print(f"wrote {args.root / 'results.csv'} ({len(table)} rows)")
    elif args.command == "plot":
        from kvp.train import plot_loss

        for csv in sorted(args.root.glob("*/*/loss.csv")):
            plot_loss(csv.parent, title=f"{csv.parent.parent.name} · {csv.parent.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
