"""Per-method summaries of evaluation rows."""

from __future__ import annotations

import pandas as pd

from kvp.evaluate import method_summary


def test_retention_counts_full_recalls_where_full_recompute_recalls():
    def row(sample, method, tp, fn):
        return {"model": "m", "dataset": "d", "method": method, "setting": "", "sample_id": sample,
                "answer": "x", "gold": ["x"], "tp": tp, "fp": 0, "fn": fn, "ttft_ms": 1.0,
                "flops": 1.0}

    rows = pd.DataFrame([row(1, "full_recompute", 1, 0), row(2, "full_recompute", 1, 0),
                         row(3, "full_recompute", 0, 1),
                         row(1, "kv_packet", 1, 0), row(2, "kv_packet", 1, 1),
                         row(3, "kv_packet", 1, 0)])  # sample 3 does not count: full missed it
    out = method_summary(rows, n_boot=10).set_index("method")
    assert out.loc["full_recompute", "retention"] == 1.0
    assert out.loc["kv_packet", "retention"] == 0.5
