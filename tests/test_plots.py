"""Figure helpers: files written, every method styled."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from kvp import plots
from kvp.adapters import ADAPTER_DIR
from kvp.compress import VARIANTS
from kvp.methods import METHODS
from kvp.report import MODEL_PARAMETERS, PAPER_POINTS, seed_summary


def test_every_method_and_compression_variant_has_a_distinct_style():
    assert set(plots.VARIANT_STYLE) == set(VARIANTS)
    assert set(plots.METHOD_STYLE) == set(METHODS)
    assert len({s.color for s in plots.METHOD_STYLE.values()}) == len(METHODS)
    assert plots.method_label("kv_packet") == "KV Packet" and plots.method_label("new") == "new"


def test_save_fig_writes_png_and_pdf(tmp_path):
    plots.set_theme()
    df = pd.DataFrame({"method": ["kv_packet", "no_recompute", "full_recompute"],
                       "f1_micro": [0.8, 0.3, 0.9], "ci_low": [0.7, 0.2, 0.85], "ci_high": [0.9, 0.4, 0.95],
                       "flops": [1e6, 1e6, 1e12]})
    fig, (left, middle, right) = plt.subplots(1, 3)
    plots.plot_method_bars(df, "f1_micro", "ci_low", "ci_high", ax=left)
    plots.plot_method_bars(df, "flops", ax=middle, log=True)
    lines = pd.DataFrame({"method": ["kv_packet"] * 2 + ["epic"] * 2, "ratio": [0.1, 0.5] * 2,
                          "f1_micro": [0.8, 0.6, 0.7, 0.4]})
    plots.plot_method_lines(lines, "ratio", "f1_micro", ax=right, logx=True, logy=True)
    assert [t.get_text() for t in left.get_xticklabels()] == ["Full Recompute", "No Recompute", "KV Packet"]
    assert middle.get_yscale() == "log"

    png, pdf = plots.save_fig(fig, "demo", fig_dir=tmp_path / "figs")
    assert png.read_bytes().startswith(b"\x89PNG") and pdf.read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["demo.pdf", "demo.png"]
    assert b"/CreationDate" not in pdf.read_bytes()  # a re-drawn, unchanged figure is the same file
    first = pdf.read_bytes(), png.read_bytes()
    plots.save_fig(fig, "demo", fig_dir=tmp_path / "figs")
    assert (pdf.read_bytes(), png.read_bytes()) == first
    with pytest.raises(ValueError, match="'demo'"):
        plots.save_fig(fig, "demo.png", fig_dir=tmp_path)
    plt.close(fig)


def test_fidelity_figure_places_each_model_at_its_size():
    results = pd.read_csv(ADAPTER_DIR / "results.csv", keep_default_na=False)
    summary = seed_summary(results)
    fig = plots.plot_fidelity_vs_size(summary, PAPER_POINTS, MODEL_PARAMETERS)
    ax = fig.axes[0]
    ours = summary[(summary.dataset == "biography") & (summary.split_shift == "none")
                   & (summary.adapter == "biography")]
    f1_points = ax.containers[0].lines[0].get_data()  # the KV Packet F1 series
    assert sorted(f1_points[0]) == sorted(ours.model.map(MODEL_PARAMETERS))
    assert sorted(f1_points[1]) == pytest.approx(sorted(100 * ours.f1_ratio))
    plt.close(fig)


def test_figure_names_are_stable_for_the_primary_run():
    assert plots.figure_name("fig3_main_results", model="smollm2-135m", dataset="biography", seed=42) == \
        "fig3_main_results"
    assert plots.figure_name("fig3_main_results", model="smollm2-135m", dataset="niah", seed=42) == \
        "fig3_main_results_niah"
    assert plots.figure_name("latency", model="meta-llama/Llama-3.1-8B", seed=43) == \
        "latency_meta-llama-Llama-3.1-8B_43"
    with pytest.raises(ValueError, match="'press'"):
        plots.figure_name("x", press="knorm")


def test_figures_4_and_5_name_their_sample_count():
    scores = pd.DataFrame([dict(method=m, layer=layer, segment=seg, position_bin=b, score=float(layer + b))
                           for m in ("no_recompute", "kv_packet") for layer in range(3)
                           for seg in ("preamble", "header", "document", "trailer") for b in range(2)])
    fig = plots.plot_segment_scores(scores, n_samples=7)
    assert "N = 7 samples" in fig.get_suptitle()
    sweep = pd.DataFrame([dict(press="knorm", ratio=r, variant=v, f1_micro=0.5 - r, n=12)
                          for r in (0.1, 0.3) for v in ("packet", "joint")])
    assert "N = 12 samples" in plots.plot_compression(sweep).get_suptitle()


def test_a_figure_drawn_again_from_the_same_data_is_the_same_file(tmp_path):
    """What lets `make reproduce` leave git clean: an unchanged figure is rewritten byte for byte."""
    sweep = pd.DataFrame([dict(press="knorm", ratio=r, variant=v, f1_micro=0.5 - r, n=4)
                          for r in (0.1, 0.3) for v in ("packet", "joint")])
    files = []
    for run in ("a", "b"):
        plots.set_theme()
        files.append(plots.save_fig(plots.plot_compression(sweep), "fig4", fig_dir=tmp_path / run))
    assert [p.read_bytes() for p in files[0]] == [p.read_bytes() for p in files[1]]
