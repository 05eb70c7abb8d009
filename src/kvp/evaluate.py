"""Run methods over dataset samples and summarise: answers → F1, agreement, TTFT, FLOPs.

See docs/protocol.md#metrics.

``evaluate`` builds each sample's context once (documents encoded once per wrapper through the
``PacketStore``), runs every method on it (each query step timed alone, the answers decoded in batches
of equal cache length) and returns one tidy row per (sample, method).
``method_summary`` turns those rows into one row per (method, setting) with micro-F1 and its
bootstrap CI, agreement with ``full_recompute``'s answers, median TTFT and mean FLOPs.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kvp import distributed
from kvp.data import Sample, load_dataset
from kvp.data.mixture import trained_on
from kvp.data.prompts import build_segments, dataset_of, extract_answer, generation_config
from kvp.methods import Method, QueryContext, make_context, run_method, run_methods
from kvp.metrics import agreement_f1, bootstrap_ci, f1_micro, paired_bootstrap, token_f1
from kvp.models import load_model
from kvp.packet import PacketStore, PacketWrapper, check_length, tokenize_document
from kvp.params import WRAPPER_SPECS, load_wrapper, method_grid
from kvp.results import RESULTS_FILE, atomic_path, read_rows, write_rows, write_run_results


class SampleError(RuntimeError):
    """A sample that could not be evaluated; ``rows`` holds the rows finished before it."""

    def __init__(self, message: str, sample_id: str, rows: pd.DataFrame):
        super().__init__(message)
        self.sample_id = sample_id
        self.rows = rows

def sample_context(model, tokenizer, store: PacketStore, sample: Sample,
                   wrapper: PacketWrapper | None = None) -> QueryContext:
    """The sample's chat prompt split into preamble / documents / task, preamble encoded."""
    seg = build_segments(tokenizer, sample)
    return make_context(model, tokenizer, store, seg.preamble, seg.documents, seg.task, wrapper)


@dataclass
class EvalSettings:
    """What ``evaluate`` needs besides the samples: the model's registry name and decoding budget."""

    model_name: str
    max_new_tokens: int | None = None
    progress: bool = True
    warmup: bool = True  # run every method once (one new token) on the first sample, untimed
    decode_batch: int = 16  # answers of at most this many methods decoded together


def check_documents(model, tokenizer, sample: Sample, wrapper: PacketWrapper | None) -> None:
    """Raise naming the document index of the first document that cannot become a packet."""
    h_t = wrapper.h + wrapper.t if wrapper is not None else 0
    for i, document in enumerate(sample.documents):
        try:
            check_length(model, len(tokenize_document(tokenizer, document)) + h_t, "it")
        except ValueError as err:
            raise ValueError(f"document {i}: {err}") from err


def warn_on_transfer(wrapper: PacketWrapper | None, samples: list[Sample]) -> None:
    """Warn when the wrapper was trained on another dataset than the samples' (a mixture covers its
    components, the general mixture every generator but its held-out one)."""
    config = (wrapper.record or {}).get("config", {}) if wrapper is not None else {}
    trained = config.get("dataset")
    if not trained or not samples:
        return
    covered = trained_on(trained, config.get("dataset_options", {}))
    evaluated = sorted({s.meta.get("dataset", "jsonl") for s in samples} - covered)
    if evaluated:
        warnings.warn(f"the wrapper was trained on {trained!r} and is applied to {evaluated}: "
                      "kv_packet measures a transfer here; train a wrapper on this data for an "
                      "in-distribution number", stacklevel=3)


def evaluate(model, tokenizer, samples: list[Sample], methods: list[Method],
             settings: EvalSettings, wrapper: PacketWrapper | None = None,
             store: PacketStore | None = None, checkpoint: str | Path | None = None
             ) -> pd.DataFrame:
    """One row per (sample, method): answer, gold answers, token F1 parts, TTFT, FLOPs, meta.

    With ``settings.warmup`` every method first runs once, untimed, on the first sample (a cold
    first run would otherwise inflate the first method's TTFT); ``rows.attrs["warmup_s"]`` is its
    wall time. A sample that fails raises :class:`SampleError` naming its id (and the document
    index where a document is at fault), with the rows finished before it in ``error.rows``.

    Under torchrun (:mod:`kvp.distributed`) each rank evaluates its shard of the samples (warming
    up on its own first one) and every rank returns the rows of all samples, in sample order: the
    rows of one process, timings aside.

    With ``checkpoint`` (a ``.csv.gz`` path) the rows are saved there, atomically, after every
    sample, and a later call with the same path takes from it every sample whose rows it holds for
    all of ``methods`` instead of running it again: an interrupted evaluation resumes where it
    stopped (the resumed rows keep the TTFTs their own process measured). One process only.
    """
    store = store or PacketStore(model, tokenizer, settings.model_name)
    if wrapper is not None:
        wrapper.check_model(model, settings.model_name)
    warn_on_transfer(wrapper, samples)
    rows, row_samples = [], []
    warmup_s = 0.0
    if checkpoint is not None and distributed.world_size() > 1:
        raise ValueError("checkpoint= resumes the evaluation of one process; under torchrun pass "
                         "checkpoint=None")
    resumed = resumed_rows(checkpoint, samples, methods)
    finished = set(resumed.sample_id)
    mine = [i for i in distributed.shard(len(samples)) if samples[i].id not in finished]
    bar = tqdm(total=len(mine) * len(methods), desc="evaluate",
               disable=not settings.progress or not distributed.is_main())
    for index in mine:
        sample = samples[index]
        try:
            check_documents(model, tokenizer, sample, wrapper)
            dataset = dataset_of(sample, None)
            config = generation_config(tokenizer, dataset, settings.max_new_tokens)
            ctx = sample_context(model, tokenizer, store, sample, wrapper)
            if settings.warmup and index == mine[0]:
                t0 = time.perf_counter()
                for method in methods:
                    run_method(method, ctx, generation_config(tokenizer, dataset, 1))
                warmup_s = time.perf_counter() - t0
            results = [result for start in range(0, len(methods), settings.decode_batch)
                       for result in run_methods(methods[start:start + settings.decode_batch],
                                                 ctx, config)]
            bar.update(len(methods))
        except Exception as err:
            bar.close()
            raise SampleError(f"sample {sample.id!r} (#{index} of {len(samples)}): {err}. The "
                              f"{len(rows)} rows finished before it are in error.rows; fix or "
                              "drop this sample and run again", sample.id, pd.DataFrame(rows)
                              ) from err
        for result in results:
            row_samples.append(index)
            answer = extract_answer(result.answer, dataset)
            counts = token_f1(answer, sample.answers)
            rows.append({
                "model": settings.model_name, "dataset": dataset, "sample_id": sample.id,
                "method": result.method, "setting": result.setting, "answer": answer,
                "raw_answer": result.answer, "gold": list(sample.answers),
                "tp": counts.tp, "fp": counts.fp, "fn": counts.fn,
                "ttft_ms": result.ttft_s * 1e3, "preamble_ms": result.preamble_s * 1e3,
                "flops": result.flops, "n_recomputed": result.n_recomputed,
                "context_tokens": result.context_tokens,
                **{f"meta_{k}": v for k, v in sample.meta.items()},
            })
        if checkpoint is not None:
            write_rows(checkpoint, pd.concat([resumed, pd.DataFrame(rows)], ignore_index=True)
                       if len(resumed) else pd.DataFrame(rows))
    bar.close()
    out = pd.DataFrame(distributed.gather_by_index(row_samples, rows))
    if len(resumed):
        order = {s.id: i for i, s in enumerate(samples)}
        out = pd.concat([resumed, out], ignore_index=True).sort_values(
            "sample_id", key=lambda ids: ids.map(order), kind="stable").reset_index(drop=True)
    out.attrs["warmup_s"] = warmup_s
    return out


def resumed_rows(checkpoint: str | Path | None, samples: list[Sample],
                 methods: list[Method]) -> pd.DataFrame:
    """The rows of a :func:`evaluate` checkpoint for the samples it finished for every one of
    ``methods`` (an empty frame without a file); rows of unfinished samples are dropped."""
    rows = read_rows(checkpoint) if checkpoint is not None else None
    if rows is None or not len(rows):
        return pd.DataFrame(columns=["sample_id"])
    rows["setting"] = rows["setting"].astype(str)
    wanted = {(m.name, m.setting) for m in methods}
    asked = pd.Series([pair in wanted for pair in zip(rows.method, rows.setting)], index=rows.index)
    rows = rows[asked & rows.sample_id.isin({s.id for s in samples})]
    if not len(rows):
        return pd.DataFrame(columns=["sample_id"])
    complete = rows.groupby("sample_id").apply(
        lambda g: set(zip(g.method, g.setting)) == wanted, include_groups=False)
    return rows[rows.sample_id.isin(complete[complete].index)].reset_index(drop=True)


def fully_recalled(rows: pd.DataFrame) -> pd.Series:
    """Per row: the answer holds every token of its best-matching gold answer (no false negative)."""
    return (rows.fn == 0) & (rows.tp > 0)


def method_summary(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (model, dataset, method, setting): n, f1_micro with 95% CI, agree_f1,
    retention, TTFT, FLOPs.

    ``agree_f1`` is the micro token F1 of the method's answers against ``full_recompute``'s answers
    on the same samples; ``retention`` is P(the method fully recalls the gold answer | full
    recompute does), on the same samples (both NaN when full recompute was not run).
    """
    out = []
    for (model, dataset), part in rows.groupby(["model", "dataset"], sort=False):
        full = part[part.method == "full_recompute"].set_index("sample_id")
        right = set(full.index[fully_recalled(full)])
        for (method, setting), g in part.groupby(["method", "setting"], sort=False):
            f1, low, high = bootstrap_ci(list(g.answer), list(g.gold), f1_micro, n_boot, seed)
            agree = (agreement_f1(list(g.answer), list(full.answer.loc[g.sample_id]))
                     if len(full) else float("nan"))
            kept = g[g.sample_id.isin(right)]
            retention = fully_recalled(kept).mean() if len(kept) else float("nan")
            out.append({"model": model, "dataset": dataset, "method": method, "setting": setting,
                        "n": len(g), "f1_micro": f1, "ci_low": low, "ci_high": high,
                        "agree_f1": agree, "retention": retention,
                        "ttft_ms": g.ttft_ms.median(), "flops": g.flops.mean()})
    return pd.DataFrame(out)


def paired_gain(rows: pd.DataFrame, other: pd.DataFrame, reference: pd.Series | None = None,
                n_boot: int = 1000) -> dict[str, float]:
    """``rows`` minus ``other`` (two methods' rows: sample_id, answer, gold) on the samples both
    answered: ``f1_gain`` against the gold answers and ``agree_gain`` in agreement with
    ``reference`` (full recompute's answers indexed by sample_id; NaN without it), each with a
    paired bootstrap 95% CI and two-sided p-value, and ``n`` the samples compared."""
    other = other.set_index("sample_id")
    rows = rows[rows.sample_id.isin(other.index)]
    ids, answers = list(rows.sample_id), list(rows.answer)
    theirs = list(other.answer.loc[ids])
    f1 = paired_bootstrap(answers, theirs, list(rows.gold), f1_micro, n_boot)
    agree = ((float("nan"),) * 4 if reference is None else
             paired_bootstrap(answers, theirs, list(reference.loc[ids]), agreement_f1, n_boot))
    return {"n": len(ids),
            **dict(zip(("f1_gain", "f1_ci_low", "f1_ci_high", "f1_p_value"), f1)),
            **dict(zip(("agree_gain", "agree_ci_low", "agree_ci_high", "agree_p_value"), agree))}


def gains_over(rows: pd.DataFrame, against: str = "no_recompute",
               n_boot: int = 1000) -> pd.DataFrame:
    """One row per (model, dataset, method, setting) but ``against`` and full recompute: its
    :func:`paired_gain` over the method ``against`` on the same samples (empty without it)."""
    out = []
    for (model, dataset), part in rows.groupby(["model", "dataset"], sort=False):
        other, full = part[part.method == against], part[part.method == "full_recompute"]
        if other.empty:
            continue
        reference = full.set_index("sample_id").answer if len(full) else None
        for (method, setting), g in part.groupby(["method", "setting"], sort=False):
            if method not in (against, "full_recompute"):
                out.append({"model": model, "dataset": dataset, "method": method,
                            "setting": setting, "against": against,
                            **paired_gain(g, other, reference, n_boot)})
    return pd.DataFrame(out)


def save_gains(rows: pd.DataFrame, out_dir: str | Path) -> pd.DataFrame:
    """:func:`gains_over` no recompute, written to ``out_dir/gains.csv`` (atomically); without
    no recompute there are none, and a ``gains.csv`` of an earlier run there is removed."""
    gains, path = gains_over(rows), Path(out_dir) / "gains.csv"
    if len(gains):
        with atomic_path(path) as tmp:
            gains.to_csv(tmp, index=False)
    else:
        path.unlink(missing_ok=True)
    return gains


def meta_breakdown(rows: pd.DataFrame, key: str, label: str) -> pd.DataFrame:
    """Micro F1 per value of the sample meta field ``key`` (row column ``meta_<key>``; numbers are
    grouped as integers, e.g. slots and hop counts, anything else as written, e.g. attributes).

    One column per method and setting (rows of :func:`evaluate`) or per method and wrapper (rows
    of ``kvp.adapters.evaluate_adapters``); the index is named ``label``.
    """
    extra = rows["wrapper"] if "wrapper" in rows else rows["setting"]
    group = rows[f"meta_{key}"]
    rows = rows.assign(column=rows.method + extra.fillna("").map(lambda w: f" {w}" if w else ""),
                       group=group.astype(int) if pd.api.types.is_numeric_dtype(group) else group)
    table = rows.groupby(["group", "column"], sort=True).apply(
        lambda g: f1_micro(list(g.answer), list(g.gold)), include_groups=False).unstack()
    table.index.name = label
    table.columns.name = None
    return table


def hop_breakdown(rows: pd.DataFrame) -> pd.DataFrame:
    """Micro F1 per hop count of multihop rows (``meta["hops"]``), one column per method."""
    return meta_breakdown(rows, "hops", "hops")


def main(argv: list[str] | None = None) -> int:
    """``python -m kvp.evaluate --jsonl FILE --out DIR``: methods and an adapter on a user file."""
    parser = argparse.ArgumentParser(
        prog="python -m kvp.evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate reuse methods on your own JSONL file (see python -m kvp.data "
        "validate); writes OUT/results.csv (one row per method setting), OUT/samples.csv (one "
        "row per sample and method), OUT/gains.csv (each method's paired F1 and agreement gain "
        "over no_recompute, with bootstrap CIs), config.json and metrics.json.")
    parser.add_argument("--jsonl", type=Path, required=True, help="dataset file, one sample a line")
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--model", default="smollm2-135m", help="registry name, hub id or path")
    parser.add_argument("--methods", nargs="+", default=["full_recompute", "no_recompute",
                                                         "kv_packet"], help="kvp.methods names")
    parser.add_argument("--adapter", default="shipped:biography",
                        help=f"wrapper for kv_packet: {WRAPPER_SPECS}")
    parser.add_argument("--adapter-seed", type=int, default=0, help="seed of a shipped adapter")
    parser.add_argument("--n", "--n-samples", type=int, default=None,
                        help="first N samples (default: all); under torchrun write --n-samples")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="decoding budget (default: the jsonl dataset's, 64)")
    parser.add_argument("--recompute-ratios", type=float, nargs="+", default=[0.3],
                        help="ratios of cache_blend, a3 and rand_recompute")
    parser.add_argument("--epic-tokens", type=int, nargs="+", default=[32],
                        help="tokens recomputed per document by epic")
    parser.add_argument("--seed", type=int, default=42, help="bootstrap seed")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in OUT")
    args = parser.parse_args(argv)
    if (args.out / RESULTS_FILE).exists() and not args.overwrite:
        parser.error(f"{args.out / RESULTS_FILE} exists; pass --overwrite to replace it, or "
                     "another --out")
    try:
        samples = load_dataset("jsonl", "test", n=args.n, path=args.jsonl)
        methods = method_grid(args.methods, args.recompute_ratios, args.epic_tokens)
    except ValueError as err:
        parser.error(str(err))
    model, tokenizer, spec = load_model(args.model)  # under torchrun: this rank's GPU
    spec.require_trained()
    wrapper = (load_wrapper(args.adapter, model, args.model, "jsonl", args.adapter_seed)
               if "kv_packet" in args.methods else None)
    store = PacketStore(model, tokenizer, args.model)
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    try:
        rows = evaluate(model, tokenizer, samples, methods,
                        EvalSettings(args.model, args.max_new_tokens), wrapper, store)
    except SampleError as err:
        with atomic_path(args.out / "samples.partial.csv") as tmp:
            err.rows.to_csv(tmp, index=False)
        print(f"error: {err}\nfinished rows: {args.out / 'samples.partial.csv'}", file=sys.stderr)
        return 1
    encoded = int(distributed.all_reduce_sum([store.n_encoded])[0])
    if not distributed.is_main():
        return 0
    summary = method_summary(rows, seed=args.seed)
    write_run_results(args.out, summary, config, {"n_samples": len(samples),
                                                   "packets_encoded": encoded})
    with atomic_path(args.out / "samples.csv") as tmp:
        rows.to_csv(tmp, index=False)
    print(summary.round(3).to_string(index=False))
    gains = save_gains(rows, args.out)
    written = [args.out / RESULTS_FILE, args.out / "samples.csv"]
    if len(gains):  # does the wrapper help on this corpus? the paired test says
        written.append(args.out / "gains.csv")
        print("\npaired gain over no_recompute (95% CI):")
        print(gains.round(3).to_string(index=False))
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    with distributed.process_group():  # torchrun: one rank per process; otherwise one process
        raise SystemExit(main())
