"""Compact packets: keys/values stored in 8 bits with a scale per (layer, KV head, channel).

See docs/method.md#compact-packets.

A packet's KV (L, H_kv, S, D) is stored as fp8 e4m3 (``float8_e4m3fn``) or int8, with one fp32
scale per (layer, KV head, channel) taken over the packet's tokens: ``scale = absmax / limit``
(448 for e4m3, 127 for int8; 1 where a channel is all zeros), ``q = x / scale`` rounded (to the
nearest e4m3 value, or to the nearest integer), and ``x ≈ q · scale``. One scale per channel keeps
the few large rotary channels of the keys from flattening the others. Half the bytes of bf16 cross
PCIe or the disk; the dequantization happens where the packet is assembled (``dequantize`` in the
plain path, inside the Triton assembly kernel in the optimised one).

Error bounds (fp32 maths, checked by the tests): e4m3 has 3 mantissa bits, so each value is within
``2⁻⁴·|x|`` of the original, or ``2⁻¹⁰·scale`` below e4m3's normal range; int8 is within
``scale / 2``.
"""

from __future__ import annotations

import torch

PACKET_DTYPES = ("model", "fp8", "int8")  # "model": the model's own dtype (bf16 / fp32), no scale
STORAGE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
LIMIT = {"fp8": 448.0, "int8": 127.0}


def check_packet_dtype(packet_dtype: str) -> None:
    if packet_dtype not in PACKET_DTYPES:
        raise ValueError(f"packet_dtype={packet_dtype!r}: choose one of {PACKET_DTYPES} "
                         "('model' keeps the model's dtype)")


def kind_of(dtype: torch.dtype) -> str:
    """The ``packet_dtype`` of stored tensors of ``dtype`` ("model" for a float dtype)."""
    return next((k for k, v in STORAGE.items() if v == dtype), "model")


@torch.no_grad()
def quantize(x: torch.Tensor, packet_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (L, H_kv, S, D) → (q (L, H_kv, S, D) in 8 bits, scale (L, H_kv, 1, D) float32)."""
    check_packet_dtype(packet_dtype)
    if packet_dtype == "model":
        raise ValueError("packet_dtype='model' stores the KV as it is: there is nothing to quantize")
    limit = LIMIT[packet_dtype]
    h = x.float()
    amax = h.abs().amax(dim=-2, keepdim=True)  # (L, H_kv, 1, D)
    scale = torch.where(amax > 0, amax / limit, torch.ones_like(amax))
    y = (h / scale).clamp(-limit, limit)
    q = y.round().to(torch.int8) if packet_dtype == "int8" else y.to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q (…, S, D) · scale (…, 1, D), computed in fp32, returned in ``dtype``."""
    return (q.float() * scale.to(q.device)).to(dtype)


# --------------------------------------------------------------------------- fidelity cost
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
    import pandas as pd

    from kvp.evaluate import evaluate, summarize
    from kvp.methods import get_method
    from kvp.metrics import agreement_f1
    from kvp.packet import PacketStore

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
    table = summarize(rows)
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
    """``python -m kvp.compact``: the fidelity cost of compact packets on an embedded model."""
    import argparse
    from pathlib import Path

    from kvp.adapters import load_adapter
    from kvp.data import load_dataset
    from kvp.evaluate import EvalSettings
    from kvp.models import load_model
    from kvp.results import atomic_path

    parser = argparse.ArgumentParser(prog="python -m kvp.compact", description=main.__doc__)
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
