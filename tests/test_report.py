"""The adapters' benchmark: evaluation cells, resumable rows files, tables and figures."""

from __future__ import annotations

import ast
import hashlib
import shutil

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from kvp.adapters import (ADAPTER_DIR, BIOGRAPHY_CHOICE, SHIFTS, load_adapter, recipe,
                          shift_options)
from kvp.data import DOMAINS
from kvp.evaluate import hop_breakdown
from kvp.metrics import agreement_f1, f1_micro
from kvp.packet import PacketWrapper
from kvp.report import (append_results, attribute_breakdown, breakdown_markdown, check_rows_budget,
                        evaluate_adapters, main, paired_gains, plot_adapter_results, read_rows,
                        results_from_rows, results_markdown, seed_summary, seed_summary_markdown,
                        sweep_table)
from kvp.train import TrainConfig, training_samples


def test_evaluation_table_on_two_samples(tmp_path, smollm):
    rows_path = tmp_path / "rows" / "bio.csv.gz"
    table = evaluate_adapters("smollm2-135m", "biography", "none", n=2,
                              wrappers=["biography-seed0", "niah-seed1", "mixture-seed0",
                                        "mixture-seed1"], max_new_tokens=8, rows_path=rows_path)
    assert list(table.method) == ["full_recompute", "no_recompute"] + ["kv_packet"] * 4
    assert list(table.wrapper[2:]) == ["biography-seed0", "niah-seed1", "mixture-seed0",
                                       "mixture-seed1"]
    rows = pd.read_csv(rows_path, keep_default_na=False)
    gains = paired_gains(rows_path, n_boot=50)
    assert len(gains) == 4
    ref = rows[rows.method == "full_recompute"].answer.tolist()
    plain = agreement_f1(rows[rows.method == "no_recompute"].answer.tolist(), ref)
    kv = agreement_f1(rows[rows.wrapper == "mixture-seed1"].answer.tolist(), ref)
    assert gains.agree_gain.iloc[3] == pytest.approx(kv - plain)
    gold = rows[rows.method == "no_recompute"].gold.map(ast.literal_eval).tolist()
    f1_gain = (f1_micro(rows[rows.wrapper == "mixture-seed1"].answer.tolist(), gold)
               - f1_micro(rows[rows.method == "no_recompute"].answer.tolist(), gold))
    assert gains.f1_gain.iloc[3] == pytest.approx(f1_gain)
    summary = seed_summary(table)
    assert list(summary.adapter) == ["biography", "mixture", "niah"]
    assert list(summary.seeds) == [1, 2, 1]
    assert "mixture" in seed_summary_markdown(table, rows_path.parent)
    # a larger n with the same rows file reuses the two samples and evaluates only the third
    again = evaluate_adapters("smollm2-135m", "biography", "none", n=3, wrappers=["biography-seed0"],
                              max_new_tokens=8, rows_path=rows_path)
    resumed = read_rows(rows_path)
    assert list(again.n) == [3, 3, 3]
    assert len(resumed) == 3 * 3 + 2 * 3  # the other wrappers' rows of the first run are kept
    first = rows[rows.wrapper.isin(["", "biography-seed0"])]
    reused = resumed[resumed.sample_id.isin(first.sample_id)
                     & resumed.wrapper.isin(["", "biography-seed0"])]
    assert reused.ttft_ms.tolist() == pytest.approx(first.ttft_ms.tolist())  # not re-timed
    table = table[table.wrapper.isin(["", "biography-seed0"])]
    assert table.loc[table.method == "full_recompute", "agree_f1"].item() == 1.0
    append_results(table, tmp_path / "results.csv")
    append_results(table, tmp_path / "results.csv")  # idempotent: same cells replaced
    md = results_markdown(tmp_path / "results.csv")
    assert md.count("\n") == 2 + 3 and "kv_packet" in md
    assert set(SHIFTS["biography"]) == {"none", "docs10", "last_slot", "long_docs"}


def test_seed_summary_by_hand():
    base = dict(model="m", dataset="d", split_shift="none", n=10, ci_low=0.0, ci_high=1.0)
    results = pd.DataFrame([
        {**base, "method": "full_recompute", "seed": -1, "wrapper": "", "f1_micro": 0.8,
         "agree_f1": 1.0},
        {**base, "method": "no_recompute", "seed": -1, "wrapper": "", "f1_micro": 0.4,
         "agree_f1": 0.5},
        {**base, "method": "kv_packet", "seed": 0, "wrapper": "d-seed0", "f1_micro": 0.6,
         "agree_f1": 0.7},
        {**base, "method": "kv_packet", "seed": 1, "wrapper": "d-seed1", "f1_micro": 0.7,
         "agree_f1": 0.9}])
    row = seed_summary(results).iloc[0]
    assert (row.adapter, row.seeds) == ("d", 2)
    assert row.f1_mean == pytest.approx(0.65) and row.f1_sd == pytest.approx(0.05)
    assert row.agree_mean == pytest.approx(0.8) and row.f1_ratio == pytest.approx(0.65 / 0.8)
    assert (row.no_recompute_f1, row.no_recompute_agree) == (0.4, 0.5)


SHIPPED_ROWS = ADAPTER_DIR / "rows" / "smollm2-135m__biography__none.csv.gz"


def shipped_digests() -> dict[str, str]:
    files = [ADAPTER_DIR / "results.csv", *sorted((ADAPTER_DIR / "rows").glob("*.csv.gz"))]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_smaller_n_merges_into_the_rows_file_and_never_shrinks_it(tmp_path, smollm):
    rows_path = tmp_path / "rows.csv.gz"
    shutil.copy(SHIPPED_ROWS, rows_path)
    before = read_rows(rows_path)
    table = evaluate_adapters("smollm2-135m", "biography", "none", n=1, max_new_tokens=32,
                              rows_path=rows_path)  # the shipped answers of sample 1 are reused
    after = read_rows(rows_path)
    assert len(after) == len(before) > 600
    assert list(table.n) == [1, 1, 1]
    with pytest.raises(ValueError, match="max_new_tokens=\\[32\\], not 8.*--out DIR"):
        check_rows_budget(rows_path, 8)


def test_results_of_another_n_are_refused(tmp_path):
    path = tmp_path / "results.csv"
    shutil.copy(ADAPTER_DIR / "results.csv", path)
    shipped = pd.read_csv(path, keep_default_na=False)
    small = shipped[(shipped.dataset == "niah") & (shipped.model == "smollm2-135m")
                    & (shipped.split_shift == "none")].assign(n=2)
    with pytest.raises(ValueError, match="smollm2-135m · niah · none at n=200, not n=2"):
        append_results(small, path)
    assert pd.read_csv(path, keep_default_na=False).equals(shipped)
    other = small.assign(dataset="jsonl")  # a new cell merges, the shipped rows stay
    append_results(other, path)
    assert len(pd.read_csv(path)) == len(shipped) + len(other)


def test_cli_evaluate_writes_outside_the_shipped_directory(tmp_path, monkeypatch, capsys, smollm):
    before = shipped_digests()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):  # refused before anything runs
        main(["evaluate", "--dataset", "biography", "--n", "2", "--max-new-tokens", "32",
              "--update-shipped"])
    assert "at n=200, not n=2" in capsys.readouterr().err
    main(["evaluate", "--dataset", "biography", "--n", "1", "--max-new-tokens", "4"])
    assert len(pd.read_csv(tmp_path / "results" / "adapters" / "results.csv")) == 3
    assert (tmp_path / "results" / "adapters" / "rows" /
            "smollm2-135m__biography__none.csv.gz").is_file()
    assert shipped_digests() == before


def test_the_recipe_is_the_sweep_variant_with_the_lowest_validation_loss():
    table = sweep_table(ADAPTER_DIR)
    qwen = table[table.model == "qwen2.5-coder-0.5b"]
    assert len(qwen) >= 3 and qwen.val_loss.notna().all()
    assert qwen.loc[qwen.val_loss.idxmin(), "variant"] == BIOGRAPHY_CHOICE
    assert (qwen.teacher_topk_mass > 0.99).all()


def test_results_csv_is_what_the_rows_give():
    shipped = pd.read_csv(ADAPTER_DIR / "results.csv", keep_default_na=False)
    again = results_from_rows(ADAPTER_DIR / "rows", n_boot=2)  # point estimates only
    key = ["model", "dataset", "split_shift", "method", "wrapper"]
    merged = shipped.merge(again, on=key, suffixes=("", "_again"))
    assert len(merged) == len(shipped) == len(again)
    for column in ("n", "f1_micro", "agree_f1", "retention"):
        assert (merged[column] - merged[f"{column}_again"]).abs().max() < 1e-4, column


def test_paired_gains_against_another_wrapper_are_the_difference_of_their_scores(capsys):
    rows_path = ADAPTER_DIR / "rows" / "qwen2.5-coder-0.5b__products__holdout-products.csv.gz"
    rows = read_rows(rows_path)
    gains = paired_gains(rows_path, n_boot=50, against="biography-seed0")
    assert list(gains.wrapper) == [f"general-products-seed{k}" for k in range(3)]
    assert set(gains.against) == {"biography-seed0"} and set(gains.n) == {200}
    score = {}
    for wrapper in ("biography-seed0", "general-products-seed1"):
        g = rows[rows.wrapper == wrapper].sort_values("sample_id")
        ref = rows[rows.method == "full_recompute"].set_index("sample_id").answer.loc[g.sample_id]
        score[wrapper] = (f1_micro(g.answer.tolist(), g.gold.tolist()),
                          agreement_f1(g.answer.tolist(), ref.tolist()))
    row = gains.set_index("wrapper").loc["general-products-seed1"]
    assert row.f1_gain == pytest.approx(score["general-products-seed1"][0]
                                        - score["biography-seed0"][0])
    assert row.agree_gain == pytest.approx(score["general-products-seed1"][1]
                                           - score["biography-seed0"][1])
    assert row.f1_ci_low <= row.f1_gain <= row.f1_ci_high
    with pytest.raises(ValueError, match="products-seed0.*general-products-seed2"):
        paired_gains(rows_path, against="products-seed0")  # the in-domain wrapper is not in it
    main(["compare", str(rows_path), "--against", "biography-seed0", "--n-boot", "20"])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 3 and all("| biography-seed0 |" in line for line in table[2:])


def test_adapter_results_figure_has_one_column_per_cell():
    results = pd.read_csv(ADAPTER_DIR / "results.csv", keep_default_na=False)
    fig = plot_adapter_results(results)
    cells = results.groupby(["model", "dataset", "split_shift"]).ngroups
    assert len(fig.axes) == 2 * cells
    first = fig.axes[0]
    model = min(results.model)  # panels go by model, the standard test first
    assert first.get_title().startswith(f"{model}\nbiography · none")
    n_bars = len(results[(results.model == model) & (results.dataset == "biography")
                         & (results.split_shift == "none")]
                 .assign(a=lambda d: d.wrapper.str.replace(r"-seed\d+$", "", regex=True))
                 .drop_duplicates(["method", "a"]))
    assert len(first.patches) == n_bars
    plt.close(fig)


def test_a_retrained_adapter_of_the_same_name_is_evaluated_again(tmp_path, smollm):
    """Rows are reused only for the same wrapper tensors, not for the same adapter name."""
    root = tmp_path / "adapters"
    shutil.copytree(ADAPTER_DIR / "smollm2-135m" / "biography-seed0",
                    root / "smollm2-135m" / "biography-seed0")
    rows_path = tmp_path / "rows.csv.gz"
    evaluate_adapters("smollm2-135m", "biography", "none", n=1, root=root, max_new_tokens=6,
                      rows_path=rows_path)
    first = read_rows(rows_path)
    shipped = load_adapter("smollm2-135m", "biography", 0, root)
    assert set(first[first.method == "kv_packet"].wrapper_fingerprint) == {shipped.fingerprint()}
    retrained = PacketWrapper.init_from_embeddings(smollm.model, shipped.h, shipped.t, seed=9,
                                                   model_name="smollm2-135m")
    retrained.save(root / "smollm2-135m" / "biography-seed0" / "wrapper.safetensors")
    evaluate_adapters("smollm2-135m", "biography", "none", n=1, root=root, max_new_tokens=6,
                      rows_path=rows_path)
    second = read_rows(rows_path)
    kv = second[second.method == "kv_packet"]
    assert len(second) == len(first) == 3 and list(kv.wrapper_fingerprint) == [retrained.fingerprint()]
    base = lambda t: t[t.method != "kv_packet"].ttft_ms.tolist()  # noqa: E731
    assert base(second) == pytest.approx(base(first))  # the baselines were reused, not re-timed


def test_holdout_cells_use_the_standard_test_and_name_bad_shifts():
    assert shift_options("niah", "holdout-tables") == SHIFTS["niah"]["none"]
    assert shift_options("multihop", "holdout-products") == {"num_docs": 5}
    with pytest.raises(ValueError, match="holdout='squad'"):
        shift_options("products", "holdout-squad")
    with pytest.raises(ValueError, match="'docs10'.*holdout-<generator>"):
        shift_options("tables", "docs10")
    with pytest.raises(SystemExit):  # refused before any model loads
        main(["evaluate", "--dataset", "niah", "--holdout", "tables", "--shift", "long_docs"])


def test_general_recipes_train_on_every_generator_but_the_held_out_one():
    for held in DOMAINS:
        config = recipe("qwen2.5-coder-0.5b", f"general-{held}")
        assert config.dataset == "general" and config.dataset_options["holdout"] == held
    small = TrainConfig(**{**recipe("smollm2-135m", "general-tables").to_dict(),
                           "n_samples": 14, "batch_size": 7, "n_val": 7})
    seen = {s.meta["dataset"] for s in training_samples(small)}
    assert "tables" not in seen and len(seen) == 7
    assert {s.meta["split"] for s in training_samples(small, "val")} == {"val"}


def test_f1_per_hop_count_by_hand():
    def row(sample, method, wrapper, hops, answer, gold):
        return {"sample_id": sample, "method": method, "wrapper": wrapper, "meta_hops": hops,
                "answer": answer, "gold": [gold]}

    rows = pd.DataFrame([row(1, "full_recompute", "", 2, "Oslo", "Oslo"),
                         row(2, "full_recompute", "", 3, "Lima Peru", "Lima"),
                         row(3, "full_recompute", "", 3, "Rome", "Rome"),
                         row(1, "kv_packet", "general-tables-seed0", 2, "Bonn", "Oslo"),
                         row(2, "kv_packet", "general-tables-seed0", 3, "Lima", "Lima"),
                         row(3, "kv_packet", "general-tables-seed0", 3, "Rome", "Rome")])
    table = hop_breakdown(rows)
    assert list(table.index) == [2, 3] and table.index.name == "hops"
    # 3 hops, full recompute: tp = 2, fp = 1, fn = 0 over the two samples -> F1 = 0.8
    assert table.loc[3, "full_recompute"] == pytest.approx(0.8)
    assert table.loc[2, "kv_packet general-tables-seed0"] == 0.0
    assert table.loc[3, "kv_packet general-tables-seed0"] == 1.0
    assert breakdown_markdown(table).splitlines()[0] == (
        "| hops | full_recompute | kv_packet general-tables-seed0 |")
    plain = hop_breakdown(rows.drop(columns="wrapper").assign(setting=""))  # kvp.evaluate rows
    assert list(plain.columns) == ["full_recompute", "kv_packet"]
    assert plain.loc[3, "kv_packet"] == 1.0


def test_f1_per_asked_field_of_a_kind_of_document():
    rows = read_rows(ADAPTER_DIR / "rows" / "qwen2.5-coder-0.5b__products__holdout-products.csv.gz")
    table = attribute_breakdown(rows)
    assert table.index.name == "attribute" and set(table.index) == set(rows.meta_attribute)
    asked = rows[(rows.meta_attribute == "price") & (rows.wrapper == "biography-seed0")]
    assert len(asked) > 10
    assert table.loc["price", "kv_packet biography-seed0"] == pytest.approx(
        f1_micro(list(asked.answer), list(asked.gold)))


def test_cli_holdout_cell_names_the_held_out_domain(tmp_path, monkeypatch, smollm):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="general-products"):  # before any baseline runs
        main(["evaluate", "--dataset", "multihop", "--holdout", "products", "--n", "1"])
    assert not (tmp_path / "results").exists()
    main(["evaluate", "--dataset", "multihop", "--holdout", "products", "--wrappers",
          "biography-seed0", "--n", "1", "--max-new-tokens", "2"])
    out = tmp_path / "results" / "adapters"
    table = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert set(table.split_shift) == {"holdout-products"} and set(table.dataset) == {"multihop"}
    assert list(table.method) == ["full_recompute", "no_recompute", "kv_packet"]
    rows = read_rows(out / "rows" / "smollm2-135m__multihop__holdout-products.csv.gz")
    assert set(rows.meta_hops) <= {2, 3} and set(rows.split_shift) == {"holdout-products"}
    assert len(paired_gains(out / "rows" / "smollm2-135m__multihop__holdout-products.csv.gz",
                                n_boot=20)) == 1
