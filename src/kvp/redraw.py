"""Figures re-drawn from a finished run, on a CPU, without notebooks or models.

``python -m kvp.pipeline --redraw RUN_DIR [--fig-dir figures]``. ``RUN_DIR`` is what the pipeline
leaves in ``results/<profile>/`` (or a copy of it committed to the repository, e.g.
``data/paper_run/``): ``summary.csv`` and one sub-directory per notebook run holding ``DONE.json``
(it names the notebook), ``config.json``, ``metrics.json``, ``results.csv`` and the notebook's
other tidy tables, each of these tables plain or gzip-compressed (``samples.csv.gz``). Every figure
is drawn by the ``kvp.plots`` function its notebook uses, from the tables the notebook wrote:

* 01_attention_shift → ``attention_shift``: kv_deviation, attention_mass, document_spread, results;
* 03_evaluate → ``fig3_main_results``: results, and the paper's rows of the run's ``REFERENCE``;
* 04_attention_maps → ``fig5_segment_scores``: segment_scores (Figure 2 shows attention maps
  computed by the model: re-run the notebook for it);
* 05_compression → ``fig4_compression``: results (the sweep's rows name a press, the others are
  the uncompressed baselines);
* 06_latency → ``latency`` (and ``latency_tiers`` when packets left the GPU): results.

02_train_adapters draws only its loss curve, into its own run directory: nothing to re-draw.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from kvp import plots
from kvp.bench import tiered_run
from kvp.params import repo_path
from kvp.results import DONE_FILE, RunResults, read_json, read_run_results, read_table


def _save(fig: plt.Figure, base: str, run_dir: Path, config: dict, fig_dir: Path,
          dataset: bool = True, caption: bool = True) -> Path:
    """Save ``fig`` under its :func:`kvp.plots.figure_name`, with the caption its notebook gave it
    (:func:`kvp.plots.run_caption` of the run's ``DONE.json``)."""
    parts = {"model": config["MODEL"], "seed": config["SEED"]}
    if dataset:
        parts["dataset"] = config["DATASET"]
    done = read_json(run_dir / DONE_FILE)
    text = plots.run_caption(config["MODEL"], run_dir, done) if caption else None
    png, _ = plots.save_fig(fig, plots.figure_name(base, **parts), fig_dir, caption=text)
    plt.close(fig)
    return png


def attention_shift(run_dir: Path, run: RunResults, fig_dir: Path) -> list[Path]:
    tables = [read_table(run_dir, name) for name in ("kv_deviation", "attention_mass",
                                                     "document_spread")]
    fig = plots.plot_attention_shift(*tables, run.table)
    return [_save(fig, "attention_shift", run_dir, run.config, fig_dir)]


def main_results(run_dir: Path, run: RunResults, fig_dir: Path) -> list[Path]:
    config, reference = run.config, None
    if config.get("REFERENCE"):
        paper = pd.read_csv(repo_path(config["REFERENCE"]), keep_default_na=False)
        reference = paper[(paper.model == config["REFERENCE_MODEL_NAME"])
                          & (paper.dataset == config["DATASET"])
                          & paper.method.isin(config["METHODS"])]
        reference = reference if len(reference) else None
    title = f"{config['MODEL']} · {config['DATASET']} · n={run.metrics['n_samples']}"
    fig = plots.plot_main_results(run.table, reference, title=title)
    return [_save(fig, "fig3_main_results", run_dir, config, fig_dir)]


def segment_scores(run_dir: Path, run: RunResults, fig_dir: Path) -> list[Path]:
    scores = read_table(run_dir, "segment_scores")
    mean = scores.groupby(["method", "layer", "segment", "position_bin"], as_index=False)["score"].mean()
    fig = plots.plot_segment_scores(mean, n_samples=int(run.table["n"].max()))
    return [_save(fig, "fig5_segment_scores", run_dir, run.config, fig_dir)]


def compression(run_dir: Path, run: RunResults, fig_dir: Path) -> list[Path]:
    swept = run.table["press"].notna()
    fig = plots.plot_compression(run.table[swept], run.table[~swept])
    return [_save(fig, "fig4_compression", run_dir, run.config, fig_dir)]


def latency(run_dir: Path, run: RunResults, fig_dir: Path) -> list[Path]:
    bench = run.table
    # No run caption: the benchmark CSVs name their own card, not the notebook's machine.
    paths = [_save(plots.plot_latency_grid(bench), "latency", run_dir, run.config, fig_dir,
                   dataset=False, caption=False)]
    tiered = tiered_run(bench)
    if tiered is not None:
        fig = plots.plot_tier_latency(tiered)
        paths.append(_save(fig, "latency_tiers", run_dir, run.config, fig_dir, dataset=False,
                           caption=False))
    return paths


DRAWERS: dict[str, Callable[[Path, RunResults, Path], list[Path]]] = {
    "01_attention_shift": attention_shift,
    "03_evaluate": main_results,
    "04_attention_maps": segment_scores,
    "05_compression": compression,
    "06_latency": latency,
}


def redraw(run_dir: str | Path, fig_dir: str | Path = "figures") -> list[Path]:
    """Draw the figures of every finished notebook run under ``run_dir`` into ``fig_dir``; the
    PNG paths written (each with its PDF twin). Runs of notebooks that draw nothing re-drawable
    (02) are passed over; a directory without finished runs is an error."""
    run_dir, fig_dir = Path(run_dir), Path(fig_dir)
    done = sorted(run_dir.glob(f"*/{DONE_FILE}"))
    if not done:
        raise FileNotFoundError(f"{run_dir} holds no finished run (no */{DONE_FILE}); pass the "
                                "directory the pipeline wrote, e.g. results/quick or data/paper_run")
    plots.set_theme()
    written = []
    for path in done:
        drawer = DRAWERS.get(read_json(path).get("notebook", ""))
        if drawer is not None:
            written += drawer(path.parent, read_run_results(path.parent), fig_dir)
    return written
