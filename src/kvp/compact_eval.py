"""What compact packets cost in answers: ``kv_packet`` on full-precision and on fp8 / int8 packets
of the same samples (see docs/method.md#compact-packets). ``python -m kvp.compact_eval``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from kvp.adapters import load_adapter
from kvp.compact import check_packet_dtype
from kvp.data import load_dataset
from kvp.evaluate import EvalSettings, evaluate, method_summary
from kvp.methods import get_method
from kvp.metrics import agreement_f1
from kvp.models import load_model
from kvp.packet import PacketStore
from kvp.results import atomic_path


def fidelity(model, tokenizer, samples, wrapper, settings, packet_dtypes=("fp8", "int8")):
    """What compact packets cost in answers: ``full_recompute``, ``kv_packet`` on full-precision
    packets and ``kv_packet`` on each of ``packet_dtypes``, on the same samples.

    Args:
        samples: ``kvp.data`` samples; wrapper: the trained ``PacketWrapper``;
        settings: ``kvp.evaluate.EvalSettings`` (model name, decoding budget).
    Returns:
        (rows, table): the per-(sample, method) rows of ``kvp.evaluate.evaluate`` (compact runs
        with setting ``packet_dtype=…``), and one row per packet dtype: micro F1 with its 95%
        bootstrap CI, agreement with full recompute, and ``agree_full_precision``, the micro token
        F1 of its answers against ``kv_packet``'s answers on full-precision packets.
    """
    for packet_dtype in packet_dtypes:
        check_packet_dtype(packet_dtype)
    runs = []
    for packet_dtype in ("model", *[d for d in packet_dtypes if d != "model"]):
        store = PacketStore(model, tokenizer, settings.model_name, packet_dtype=packet_dtype)
        methods = [get_method("kv_packet")]
        if packet_dtype == "model":
            methods.insert(0, get_method("full_recompute"))
        rows = evaluate(model, tokenizer, samples, methods, settings, wrapper, store)
        packet = rows["method"] == "kv_packet"
        rows.loc[packet, "setting"] = f"packet_dtype={packet_dtype}" if packet_dtype != "model" else ""
        runs.append(rows.assign(packet_dtype=packet_dtype))
    rows = pd.concat(runs, ignore_index=True)
    table = method_summary(rows)
    table = table[table["method"] == "kv_packet"].copy()
    table["packet_dtype"] = [s.removeprefix("packet_dtype=") or "model" for s in table["setting"]]
    full = rows[(rows["method"] == "kv_packet") & (rows["packet_dtype"] == "model")]
    full = full.set_index("sample_id")["answer"]
    table["agree_full_precision"] = [
        agreement_f1(list(g["answer"]), list(full.loc[g["sample_id"]]))
        for _, g in ((d, rows[(rows["method"] == "kv_packet") & (rows["packet_dtype"] == d)])
                     for d in table["packet_dtype"])]
    columns = ["model", "dataset", "packet_dtype", "n", "f1_micro", "ci_low", "ci_high", "agree_f1",
               "agree_full_precision"]
    return rows, table[columns].reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m kvp.compact_eval``: the fidelity cost of compact packets on an embedded model."""
    parser = argparse.ArgumentParser(prog="python -m kvp.compact_eval", description=main.__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="an embedded model with a shipped adapter")
    parser.add_argument("--dataset", default="biography")
    parser.add_argument("--n", type=int, default=200, help="samples of the test split")
    parser.add_argument("--num-docs", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--packet-dtypes", nargs="+", default=["fp8", "int8"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="directory for fidelity.csv / rows.csv")
    args = parser.parse_args(argv)
    model, tokenizer, _ = load_model(args.model)
    options = {"num_docs": args.num_docs} if args.dataset in ("biography", "niah") else {}
    samples = load_dataset(args.dataset, "test", n=args.n, seed=args.seed, **options)
    wrapper = load_adapter(args.model, args.dataset)
    rows, table = fidelity(model, tokenizer, samples, wrapper,
                           EvalSettings(args.model, args.max_new_tokens), tuple(args.packet_dtypes))
    print(table.round(3).to_string(index=False))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, frame in (("fidelity.csv", table), ("rows.csv", rows)):
            with atomic_path(args.out / name) as tmp:
                frame.to_csv(tmp, index=False)
        print(f"wrote {args.out / 'fidelity.csv'} and {args.out / 'rows.csv'}")


if __name__ == "__main__":
    main()
