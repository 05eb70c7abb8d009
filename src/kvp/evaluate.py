"""Run methods over dataset samples and summarise: answers → F1, agreement, TTFT, FLOPs.

See docs/protocol.md#metrics.

``evaluate`` builds each sample's context once (documents encoded once per wrapper through the
``PacketStore``), runs every method on it and returns one tidy row per (sample, method).
``summarize`` turns those rows into one row per (method, setting) with micro-F1 and its bootstrap
CI, agreement with ``full_recompute``'s answers, median TTFT and mean FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from tqdm.auto import tqdm

from kvp.data import Sample
from kvp.data.prompts import build_segments, dataset_of, extract_answer, generation_config
from kvp.methods import Method, QueryContext, make_context, run_method
from kvp.metrics import agreement_f1, bootstrap_ci, f1_micro, token_f1
from kvp.packet import PacketStore, PacketWrapper

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


def evaluate(model, tokenizer, samples: list[Sample], methods: list[Method],
             settings: EvalSettings, wrapper: PacketWrapper | None = None,
             store: PacketStore | None = None) -> pd.DataFrame:
    """One row per (sample, method): answer, gold answers, token F1 parts, TTFT, FLOPs, meta."""
    store = store or PacketStore(model, tokenizer, settings.model_name)
    rows = []
    bar = tqdm(total=len(samples) * len(methods), desc="evaluate", disable=not settings.progress)
    for sample in samples:
        dataset = dataset_of(sample, None)
        config = generation_config(tokenizer, dataset, settings.max_new_tokens)
        ctx = sample_context(model, tokenizer, store, sample, wrapper)
        for method in methods:
            result = run_method(method, ctx, config)
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
            bar.set_postfix(method=result.method)
            bar.update()
    bar.close()
    return pd.DataFrame(rows)


def summarize(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (model, dataset, method, setting): n, f1_micro with 95% CI, agree_f1, TTFT, FLOPs.

    ``agree_f1`` is the micro token F1 of the method's answers against ``full_recompute``'s answers
    on the same samples (NaN when full recompute was not run).
    """
    out = []
    for (model, dataset), part in rows.groupby(["model", "dataset"], sort=False):
        reference = part[part.method == "full_recompute"].set_index("sample_id")["answer"]
        for (method, setting), g in part.groupby(["method", "setting"], sort=False):
            f1, low, high = bootstrap_ci(list(g.answer), list(g.gold), f1_micro, n_boot, seed)
            agree = (agreement_f1(list(g.answer), list(reference.loc[g.sample_id]))
                     if len(reference) else float("nan"))
            out.append({"model": model, "dataset": dataset, "method": method, "setting": setting,
                        "n": len(g), "f1_micro": f1, "ci_low": low, "ci_high": high,
                        "agree_f1": agree, "ttft_ms": g.ttft_ms.median(), "flops": g.flops.mean()})
    return pd.DataFrame(out)
