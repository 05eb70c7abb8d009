"""Per-method summaries of evaluation rows."""

from __future__ import annotations

import pandas as pd
import pytest

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


def test_an_interrupted_evaluation_resumes_from_its_checkpoint(tmp_path, smollm, monkeypatch):
    import kvp.evaluate as ev
    from kvp.data import load_dataset
    from kvp.methods import get_method
    from kvp.results import read_rows, write_rows

    samples = load_dataset("biography", "test", 3, 42, num_docs=2)
    methods = [get_method("no_recompute"), get_method("epic", n_tokens=4)]
    settings = ev.EvalSettings("smollm2-135m", max_new_tokens=3, progress=False, warmup=False)
    checkpoint = tmp_path / "resume.csv.gz"
    whole = ev.evaluate(smollm.model, smollm.tokenizer, samples, methods, settings,
                        checkpoint=checkpoint)
    saved = read_rows(checkpoint)
    assert len(saved) == 6 and list(saved.sample_id) == list(whole.sample_id)
    # cut off during the third sample: its first method's row is there, its second is not
    write_rows(checkpoint, saved.iloc[:5])
    ran = []
    real = ev.run_methods
    monkeypatch.setattr(ev, "run_methods", lambda ms, ctx, cfg: ran.append(ctx) or real(ms, ctx, cfg))
    again = ev.evaluate(smollm.model, smollm.tokenizer, samples, methods, settings,
                        checkpoint=checkpoint)
    assert len(ran) == 1  # only the unfinished sample ran again
    assert list(again.sample_id) == list(whole.sample_id) and list(again.answer) == list(whole.answer)
    # finished samples are taken as saved (their TTFTs, to the CSV's float precision)
    assert again.ttft_ms[:4].tolist() == pytest.approx(saved.ttft_ms[:4].tolist(), rel=1e-12)
    assert len(read_rows(checkpoint)) == 6
