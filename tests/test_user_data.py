"""Your own JSONL file end to end: evaluate's errors and warnings, the evaluate command."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from kvp.adapters import load_adapter
from kvp.data import load_dataset
from kvp.evaluate import EvalSettings, SampleError, evaluate, main
from kvp.methods import get_method
from kvp.metrics import f1_micro
from kvp.results import read_rows

DOC = "Ada Lovelace was born in London in 1815. She wrote the first published program."


def user_file(tmp_path, *extra_docs: str):
    samples = [{"id": "ada", "documents": [DOC, "The sky is blue."],
                "question": "Where was Ada Lovelace born?", "answers": ["London"]},
               {"id": "year", "documents": [DOC, *extra_docs],
                "question": "When was Ada Lovelace born?", "answers": ["1815"]}]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def test_a_failing_sample_is_named_and_finished_rows_are_kept(tmp_path, smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    samples = load_dataset("jsonl", path=user_file(tmp_path, "word " * 9000), n=None)
    settings = EvalSettings("smollm2-135m", max_new_tokens=2, progress=False)
    with pytest.raises(SampleError, match=r"sample 'year' \(#1 of 2\): document 1: .*tokens") as info:
        evaluate(model, tokenizer, samples, [get_method("no_recompute")], settings)
    assert list(info.value.rows.sample_id) == ["ada"]


def test_warm_up_and_transfer_warning(tmp_path, smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    samples = load_dataset("jsonl", path=user_file(tmp_path), n=1)
    settings = EvalSettings("smollm2-135m", max_new_tokens=2, progress=False)
    with pytest.warns(UserWarning, match="trained on 'niah' and is applied to \\['jsonl'\\]"):
        rows = evaluate(model, tokenizer, samples, [get_method("kv_packet")], settings,
                        load_adapter("smollm2-135m", "niah"))
    assert rows.attrs["warmup_s"] > 0


def test_evaluate_command_on_a_user_file(tmp_path, capsys, smollm):
    out = tmp_path / "out"
    args = ["--jsonl", str(user_file(tmp_path)), "--out", str(out), "--max-new-tokens", "4",
            "--methods", "no_recompute", "kv_packet"]
    with pytest.warns(UserWarning, match="trained on 'biography'"):
        assert main(args) == 0
    results = pd.read_csv(out / "results.csv")
    assert list(results.method) == ["no_recompute", "kv_packet"] and set(results.n) == {2}
    rows = read_rows(out / "samples.csv")
    assert len(rows) == 4
    gains = pd.read_csv(out / "gains.csv")  # does the wrapper help on this file? paired
    assert list(gains.method) == ["kv_packet"] and list(gains.against) == ["no_recompute"]
    score = {m: f1_micro(list(g.answer), list(g.gold)) for m, g in rows.groupby("method")}
    assert gains.f1_gain.item() == pytest.approx(score["kv_packet"] - score["no_recompute"])
    assert gains.n.item() == 2 and gains.agree_gain.isna().all()  # no full recompute to agree with
    assert "paired gain over no_recompute" in capsys.readouterr().out
    assert main([*args[:-2], "full_recompute", "kv_packet", "--overwrite"]) == 0
    assert not (out / "gains.csv").exists()  # no no_recompute now: the old gains are not left
    with pytest.raises(SystemExit):
        main(args)  # an earlier run is not replaced silently
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--overwrite", "--n", "3"])
    assert "n=3 but" in capsys.readouterr().err
