"""Notebook smoke tier: every notebook runs through papermill with its smallest parameters.

Each run writes into a temporary directory (``OUT_DIR`` and ``FIG_DIR``), never into results/ or
figures/, and must leave the tidy results files and its figures there. Wrappers are untrained
(``ADAPTER="untrained"``) so the tier does not depend on the shipped adapters.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kvp.pipeline import NOTEBOOKS, IPCKernelManager
from kvp.results import CONFIG_FILE, METRICS_FILE, RESULTS_FILE, read_run_results

pytestmark = pytest.mark.notebook
papermill = pytest.importorskip("papermill")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
SMALL_EVAL = {"N_DOCS": 2, "ADAPTER": "untrained", "MAX_NEW_TOKENS": 8}
# notebook -> (smoke parameters, figures it must write)
SMOKE: dict[str, tuple[dict, list[str]]] = {
    "01_attention_shift": ({**SMALL_EVAL, "N_SAMPLES": 1, "N_F1": 1}, ["attention_shift"]),
    "02_train_adapters": ({"STEPS": 1, "N_TRAIN": 2, "BATCH_SIZE": 2, "N_DOCS": [2],
                           "MAX_NEW_TOKENS": 4, "N_EVAL": 1}, []),
    "03_evaluate": ({**SMALL_EVAL, "N_SAMPLES": 2, "RECOMPUTE_RATIOS": [0.5], "EPIC_TOKENS": [8],
                     "METHODS": ["no_cache", "full_recompute", "no_recompute", "kv_packet",
                                 "cache_blend", "epic"]}, ["fig3_main_results"]),
    "04_attention_maps": ({"N_SAMPLES": 1, "N_DOCS": 2, "ADAPTER": "untrained", "VIEWER_SAMPLES": 1},
                          ["fig2_attention_maps", "fig5_segment_scores"]),
    "05_compression": ({**SMALL_EVAL, "N_SAMPLES": 1, "PRESSES": ["knorm", "streaming_llm"],
                        "COMPRESSION_RATIOS": [0.5]}, ["fig4_compression"]),
    "06_latency": ({"CONTEXT_TOKENS": [128, 256], "N_DOCS": [2], "N_REPEATS": 1,
                    "METHODS": ["full_recompute", "no_recompute", "kv_packet", "epic"]}, ["latency"]),
}


def execute(name: str, params: dict, tmp_path: Path, cwd: Path = ROOT) -> tuple[Path, Path]:
    """Run notebook ``name`` with ``params`` into ``tmp_path``; return (OUT_DIR, FIG_DIR)."""
    out_dir, fig_dir = tmp_path / "out", tmp_path / "figures"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"),
        parameters={**params, "OUT_DIR": str(out_dir), "FIG_DIR": str(fig_dir)},
        kernel_name="python3", cwd=str(cwd), progress_bar=False, log_output=False,
        kernel_manager_class=IPCKernelManager)
    return out_dir, fig_dir


def test_every_planned_notebook_has_a_smoke_run():
    assert set(SMOKE) == set(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_notebook_smoke(name, tmp_path):
    params, figures = SMOKE[name]
    out_dir, fig_dir = execute(name, params, tmp_path)
    for file in (CONFIG_FILE, METRICS_FILE, RESULTS_FILE):
        assert (out_dir / file).is_file(), f"{name} did not write {file}"
    results = read_run_results(out_dir)
    assert len(results.table) > 0 and results.config["SEED"] == 42
    for figure in figures:
        for suffix in (".png", ".pdf"):
            assert (fig_dir / f"{figure}{suffix}").stat().st_size > 1000, f"{figure}{suffix} missing"


def test_parameter_of_the_wrong_type_fails_in_the_check_cell(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as info:
        execute("03_evaluate", {"N_SAMPLES": "2"}, tmp_path)
    error = info.value
    assert error.ename == "TypeError"
    assert "N_SAMPLES='2' has type str" in error.evalue and "expected" in error.evalue
    executed = nbformat.read(tmp_path / "03_evaluate.ipynb", as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    failed = [i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.outputs)]
    assert len(failed) == 1 and "check_params" in code[failed[0]].source
    assert not (tmp_path / "out").exists()


def test_user_jsonl_through_notebook_03_started_in_notebooks(tmp_path):
    """DATA_PATH and REFERENCE are relative to the repository root, the kernel runs in notebooks/."""
    data = "tests/fixtures/user_samples.jsonl"
    out_dir, fig_dir = execute("03_evaluate", {
        "DATASET": "jsonl", "DATA_PATH": data, "N_SAMPLES": 2, "ADAPTER": "untrained",
        "MAX_NEW_TOKENS": 4, "METHODS": ["full_recompute", "kv_packet"]}, tmp_path,
        cwd=ROOT / "notebooks")
    table = read_run_results(out_dir).table
    assert set(table.dataset) == {"jsonl"} and set(table.n) == {2}
    assert (fig_dir / "fig3_main_results_jsonl.png").is_file()
    assert not (out_dir / "gains.csv").exists()  # no no_recompute to gain over


def test_generated_test_set_with_a_transferred_adapter_through_notebook_03(tmp_path):
    """Any generated dataset evaluates by name, with the adapter of another dataset."""
    out_dir, fig_dir = execute("03_evaluate", {
        "DATASET": "multihop", "N_SAMPLES": 2, "N_DOCS": 4, "ADAPTER": "shipped:biography",
        "MAX_NEW_TOKENS": 4, "METHODS": ["full_recompute", "no_recompute", "kv_packet"]},
        tmp_path)
    table = read_run_results(out_dir).table
    assert set(table.dataset) == {"multihop"} and set(table.n) == {2}
    assert (fig_dir / "fig3_main_results_multihop.png").is_file()


def test_general_wrapper_on_its_held_out_domain_through_notebook_03(tmp_path):
    """A shipped general wrapper (trained without product sheets) on product sheets, by name."""
    out_dir, _ = execute("03_evaluate", {
        "MODEL": "qwen2.5-coder-0.5b", "DATASET": "products", "N_SAMPLES": 1, "N_DOCS": 2,
        "ADAPTER": "shipped:general-products", "MAX_NEW_TOKENS": 4,
        "METHODS": ["no_recompute", "kv_packet"]}, tmp_path)
    run = read_run_results(out_dir)
    assert set(run.table.dataset) == {"products"} and set(run.table.n) == {1}
    assert run.config["ADAPTER"] == "shipped:general-products"
    gains = pd.read_csv(out_dir / "gains.csv")  # the transfer question, paired
    assert list(gains.method) == ["kv_packet"] and list(gains.against) == ["no_recompute"]
    assert set(gains.n) == {1}


def test_unknown_parameter_name_is_refused(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as info:
        execute("03_evaluate", {"N_SAMPLE": 2}, tmp_path)
    assert info.value.ename == "ConfigError" and "unknown parameter N_SAMPLE" in info.value.evalue
    assert not (tmp_path / "out").exists()


def test_notebook_03_evaluates_kv_packet_with_every_wrapper_seed(tmp_path):
    """EXTRA_ADAPTER_SEEDS: one kv_packet setting per shipped wrapper seed, the baselines once."""
    out_dir, _ = execute("03_evaluate", {
        "DATASET": "niah", "N_SAMPLES": 2, "CONTEXT_TOKENS": 384, "CHUNK_CHARS": 600,
        "MAX_NEW_TOKENS": 4, "METHODS": ["full_recompute", "no_recompute", "kv_packet"],
        "EXTRA_ADAPTER_SEEDS": [1, 2]}, tmp_path)
    table = read_run_results(out_dir).table
    packet = table[table.method == "kv_packet"]
    assert sorted(packet.setting) == ["seed0", "seed1", "seed2"] and set(packet.n) == {2}
    assert sorted(pd.read_csv(out_dir / "gains.csv").setting) == ["seed0", "seed1", "seed2"]
    assert packet.agree_f1.notna().all() and len(table[table.method != "kv_packet"]) == 2
    assert not list(out_dir.glob("resume*"))  # the checkpoints of a finished run are removed
