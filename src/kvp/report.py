"""The benchmark that grades the shipped adapters, and its tables and figures.

``evaluate_adapters`` runs full recompute, no recompute and KV Packet (one row per wrapper) on
the test samples of a (model, dataset, held-out shift) cell and keeps the per-sample answers
(``data/adapters/rows/``); the cells merge into ``data/adapters/results.csv``
(:data:`ADAPTER_COLUMNS`). ``seed_summary``, ``paired_gains``, the markdown tables and the
figures are built from those files alone. ``python -m kvp.adapters
train|evaluate|table|compare|rebuild|plot`` is :func:`main`; the recipes and the trained adapters
are :mod:`kvp.adapters`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from kvp import distributed
from kvp.adapters import (ADAPTER_DIR, HOLDOUT, RECIPES, SHIFTS, SWEEP, adapter_of,
                          load_adapter, parse_adapter, shift_options, sweep_variant,
                          train_recipe)
from kvp.data import DOMAINS, GENERATORS, load_dataset
from kvp.evaluate import (EvalSettings, evaluate, hop_breakdown, meta_breakdown, method_summary,
                          paired_gain)
from kvp.methods import get_method
from kvp.metrics import f1_micro
from kvp.models import load_model
from kvp.packet import PacketStore
from kvp.plots import (method_label, method_style, plot_fidelity_vs_size, save_fig,
                       save_loss_figure, set_theme)
from kvp.results import atomic_path, read_rows, write_rows


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


ADAPTER_COLUMNS = ["model", "dataset", "split_shift", "method", "seed", "n", "f1_micro", "ci_low",
                  "ci_high", "agree_f1", "wrapper", "max_new_tokens", "retention"]


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
    for the same (sample, method, wrapper, ``max_new_tokens``) and the same wrapper tensors (the
    ``wrapper_fingerprint`` column: a retrained adapter of the same name is evaluated again, never
    credited with its predecessor's answers): an interrupted run resumes, and a
    larger ``n`` evaluates only the new samples (the test samples of a seed are prefix-stable).
    The file only grows: rows of other samples or wrappers are kept, so a smaller ``n`` never
    shrinks it, and a file holding another decoding budget is refused (:func:`check_rows_budget`).
    """
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
        fingerprint = wrapper.fingerprint() if wrapper is not None else ""
        mine = previous[previous.method.isin(methods) & (previous.wrapper == wrapper_name)
                        & (fingerprints(previous) == fingerprint)]
        complete = mine.groupby("sample_id").method.nunique() == len(methods)
        kept = mine[mine.sample_id.isin(complete[complete].index)]
        have = set(kept.sample_id)
        todo = [s for s in samples if s.id not in have]
        done = [kept] if len(kept) else []
        if todo:
            new = evaluate(model, tokenizer, todo, [get_method(m) for m in methods], settings,
                           wrapper=wrapper, store=store)
            done.append(new.assign(seed=seed, wrapper=wrapper_name, max_new_tokens=max_new_tokens,
                                   wrapper_fingerprint=fingerprint))
        done = pd.concat(done, ignore_index=True)
        done = done.sort_values("sample_id", key=lambda ids: ids.map(order), kind="stable")
        parts.append(done.reset_index(drop=True))
        if rows_path is not None and distributed.is_main():
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
    return cell_results(pd.concat(parts, ignore_index=True), shift, max_new_tokens)


def cell_results(rows: pd.DataFrame, shift: str, max_new_tokens: int | None,
                   n_boot: int = 1000) -> pd.DataFrame:
    """``ADAPTER_COLUMNS`` rows from per-sample rows of one (model, dataset, shift): the baselines
    once, each wrapper scored against the same full recompute answers (``n_boot`` bootstrap
    resamples for the CIs)."""
    reference = rows[rows.method == "full_recompute"]
    out = []
    for (seed, wrapper), part in rows.groupby(["seed", "wrapper"], sort=False):
        with_ref = pd.concat([reference, part]).drop_duplicates(subset=["sample_id", "method"])
        summary = method_summary(with_ref, n_boot=n_boot)
        summary = summary[summary.method.isin(part.method.unique())]
        out.append(summary.assign(split_shift=shift, seed=seed, wrapper=wrapper,
                                  max_new_tokens=max_new_tokens))
    return pd.concat(out, ignore_index=True)[ADAPTER_COLUMNS]


def results_from_rows(rows_dir: Path, n_boot: int = 1000) -> pd.DataFrame:
    """The results table recomputed from every per-sample rows file under ``rows_dir``."""
    out = []
    for path in sorted(rows_dir.glob("*.csv.gz")):
        rows = read_rows(path)
        budget = budgets(rows["max_new_tokens"]) if "max_new_tokens" in rows else set()
        out.append(cell_results(rows, rows.split_shift.iloc[0],
                                  budget.pop() if len(budget) == 1 else None, n_boot))
    return pd.concat(out, ignore_index=True)


def slot_breakdown(rows: pd.DataFrame) -> pd.DataFrame:
    """Micro F1 per target-document slot (biography rows), one column per (method, wrapper)."""
    return meta_breakdown(rows, "target_slot", "target slot")


def attribute_breakdown(rows: pd.DataFrame) -> pd.DataFrame:
    """Micro F1 per asked field (rows of a kind of document: ``meta["attribute"]``), one column
    per (method, wrapper)."""
    return meta_breakdown(rows, "attribute", "attribute")


def breakdown_markdown(table: pd.DataFrame) -> str:
    """A :func:`kvp.evaluate.meta_breakdown` table as markdown."""
    lines = [f"| {table.index.name} | " + " | ".join(table.columns) + " |",
             "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {key} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
              for key, row in table.iterrows()]
    return "\n".join(lines) + "\n"


ROW_KEY = ["sample_id", "method", "wrapper"]


def fingerprints(rows: pd.DataFrame) -> pd.Series:
    """The ``wrapper_fingerprint`` of each row (``PacketWrapper.fingerprint``; empty for the
    baselines, and for rows of a file written before fingerprints were recorded)."""
    if "wrapper_fingerprint" not in rows:
        return pd.Series("", index=rows.index, dtype=str)
    return rows["wrapper_fingerprint"].fillna("").astype(str)


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


def plot_adapter_results(results: pd.DataFrame) -> plt.Figure:
    """The shipped adapters' table as small multiples: one column per (dataset, shift), F1 (with
    95% CIs) on top and agreement with full recompute below. KV Packet bars are the mean over
    wrapper seeds, each seed a dot; the mixture adapter is hatched.

    ``results`` has the columns of ``data/adapters/results.csv``.
    """
    results = results.assign(adapter=adapter_of(results.wrapper))
    cells = sorted(results.groupby(["model", "dataset", "split_shift"]).groups,
                   key=lambda c: (c[0], c[1], c[2] != "none", c[2]))  # the standard test first
    set_theme()
    fig, axes = plt.subplots(2, len(cells), figsize=(2.3 * len(cells) + 1, 5.5), squeeze=False,
                             sharey="row")
    for col, (model, dataset, shift) in enumerate(cells):
        cell = results[(results.model == model) & (results.dataset == dataset)
                       & (results.split_shift == shift)]
        bars = []  # (label, method, adapter, rows)
        for method in ("full_recompute", "no_recompute"):
            bars += [(method_label(method), method, "", cell[cell.method == method])]
        for adapter, g in cell[cell.method == "kv_packet"].groupby("adapter", sort=False):
            bars.append((f"KV Packet\n({adapter})", "kv_packet", adapter, g))
        bars = [b for b in bars if len(b[3])]
        for row, metric in enumerate(("f1_micro", "agree_f1")):
            ax = axes[row, col]
            for i, (label, method, adapter, g) in enumerate(bars):
                mean = g[metric].mean()
                err = None
                if metric == "f1_micro" and len(g) == 1:
                    err = [[max(mean - g.ci_low.iloc[0], 0)], [max(g.ci_high.iloc[0] - mean, 0)]]
                ax.bar(i, mean, color=method_style(method).color, yerr=err, capsize=3,
                       hatch="//" if adapter == "mixture" else None, edgecolor="white")
                if len(g) > 1:
                    ax.scatter([i] * len(g), g[metric], color="black", s=10, zorder=3)
            ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=60, ha="right",
                          fontsize=8)
            if row == 0:
                ax.set_title(f"{model}\n{dataset} · {shift} · n={int(cell.n.iloc[0])}", fontsize=9)
                ax.tick_params(labelbottom=False)
            if col == 0:
                ax.set_ylabel("micro F1 (95% CI)" if row == 0 else "agreement with full")
    fig.suptitle(f"Shipped adapters · {', '.join(sorted(results.model.unique()))} · "
                 "dots = wrapper seeds", y=1.01)
    fig.tight_layout()
    return fig


def paired_gains(rows_path: Path, n_boot: int = 1000, against: str = "no_recompute"
                 ) -> pd.DataFrame:
    """Per wrapper: kv_packet minus ``against`` on the same samples, in F1 against the gold answers
    (``f1_gain``) and in agreement with full recompute (``agree_gain``), each with a paired
    bootstrap 95% CI and p-value (reads the per-sample rows ``evaluate`` wrote).

    ``against`` is ``"no_recompute"`` or another wrapper of the cell (e.g. a general wrapper's
    in-domain reference ``products-seed0``); each wrapper is compared on the samples both answered.
    """
    rows = read_rows(rows_path)
    kv = rows[rows.method == "kv_packet"]
    if against == "no_recompute":
        other = rows[rows.method == "no_recompute"]
    else:
        other = kv[kv.wrapper == against]
        kv = kv[kv.wrapper != against]
    if other.empty:
        raise ValueError(f"{rows_path.name} has no answers of {against!r} to compare with; use "
                         f"'no_recompute' or one of its wrappers: {sorted(set(kv.wrapper))}")
    ref = rows[rows.method == "full_recompute"].set_index("sample_id")["answer"]
    out = []
    for wrapper, g in kv.groupby("wrapper", sort=False):
        out.append({"model": g.model.iloc[0], "dataset": g.dataset.iloc[0],
                    "split_shift": g.split_shift.iloc[0], "wrapper": wrapper, "against": against,
                    **paired_gain(g, other, ref, n_boot)})
    return pd.DataFrame(out)


def gains_markdown(gains: pd.DataFrame) -> list[str]:
    """Markdown table lines of :func:`paired_gains` rows (any mix of references)."""
    lines = ["| model | dataset | shift | wrapper | against | n | F1 gain (paired 95% CI) | p | "
             "agreement gain (paired 95% CI) | p |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in gains.itertuples():
        lines.append(f"| {r.model} | {r.dataset} | {r.split_shift} | {r.wrapper} | {r.against} | "
                     f"{r.n} | {r.f1_gain:+.3f} ({r.f1_ci_low:+.3f} to {r.f1_ci_high:+.3f}) | "
                     f"{r.f1_p_value:.3f} | "
                     f"{r.agree_gain:+.3f} ({r.agree_ci_low:+.3f} to {r.agree_ci_high:+.3f}) | "
                     f"{r.agree_p_value:.3f} |")
    return lines


def seed_summary_markdown(results: pd.DataFrame, rows_dir: Path | None = None) -> str:
    """Markdown of :func:`seed_summary` (and of :func:`paired_gains` for each rows file)."""
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
        lines += ["", *gains_markdown(pd.concat([paired_gains(f) for f in files]))]
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
                    "(default: DATASET-seed0)")
    ev.add_argument("--n", "--n-samples", type=int, default=100,
                    help="test samples (seed 42); under torchrun write --n-samples")
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
    cp = sub.add_parser("compare", help="paired F1 and agreement gains of every wrapper of each "
                        "rows file over a reference: no_recompute or another wrapper (e.g. a "
                        "general wrapper over its in-domain reference)")
    cp.add_argument("rows", type=Path, nargs="+",
                    help="per-sample rows files, e.g. data/adapters/rows/*__holdout-products.csv.gz")
    cp.add_argument("--against", default="no_recompute",
                    help="no_recompute or a wrapper of the cell (default: %(default)s)")
    cp.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    rb = sub.add_parser("rebuild", help="recompute ROOT/results.csv from the per-sample rows in "
                        "ROOT/rows (e.g. after a new column such as retention)")
    rb.add_argument("--root", type=Path, default=ADAPTER_DIR)
    pl = sub.add_parser("plot", help="draw the loss figure of every adapter under --root")
    pl.add_argument("--root", type=Path, default=ADAPTER_DIR)
    args = parser.parse_args(argv)
    if args.command == "train":
        runs = train_recipe(args.model, args.dataset, args.seeds, args.root, args.device,
                            teacher_only=args.teacher_only, variant=args.variant)
        if not args.no_plot:
            for out, config in runs.items():
                save_loss_figure(out, config.title)
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
        if not distributed.is_main():  # every rank has the merged rows; rank 0 writes
            return 0
        append_results(table, results)
        print(table.to_string(index=False))
        print(f"wrote {results} and {rows}")
    elif args.command == "compare":
        try:
            gains = pd.concat([paired_gains(f, args.n_boot, args.against) for f in args.rows])
        except ValueError as err:
            parser.error(str(err))
        print("\n".join(gains_markdown(gains)))
    elif args.command == "table":
        print(results_markdown(args.root / "results.csv"))
        results = pd.read_csv(args.root / "results.csv", keep_default_na=False)
        print(seed_summary_markdown(results, args.root / "rows"), end="")
        save_fig(plot_adapter_results(results), "results", fig_dir=args.root)
        sweep = sweep_table(args.root, results)
        if len(sweep):  # a results directory of evaluations only has no sweep
            print("\n" + sweep_markdown(sweep))
        for pattern, title, breakdown in [("*__biography__none", "target slot", slot_breakdown),
                                          ("*__multihop__*", "hop count", hop_breakdown),
                                          *((f"*__{kind}__*", "asked field", attribute_breakdown)
                                            for kind in DOMAINS)]:
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
        for csv in sorted(args.root.glob("*/*/loss.csv")):
            save_loss_figure(csv.parent, title=f"{csv.parent.parent.name} · {csv.parent.name}")
    return 0
