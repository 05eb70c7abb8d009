"""The papermill matrix runner and the tidy results files it collects."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
import yaml

from kvp import pipeline
from kvp.methods import METHODS
from kvp.params import ConfigError
from kvp.pipeline import load_profile, parse_profile, validate
from kvp.results import (
    ATTEMPTS_FILE, DONE_FILE, RESULT_COLUMNS, SOURCE_COLUMNS, AttemptLog, collect_summary,
    read_json, read_run_results, read_table, restore_runs, resume_path, total_wall_s, write_json,
    write_run_results,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "pipeline"
SOURCE = Path("test.yaml")


def profile_of(data: dict, name: str = "test") -> pipeline.Profile:
    return parse_profile(name, data, SOURCE)


def cli(profile: str, results_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kvp.pipeline", "--profile", profile, "--config-dir", str(FIXTURES),
            "--notebook-dir", str(FIXTURES), "--results-dir", str(results_dir), *extra]


# --------------------------------------------------------------------------- matrix expansion
def test_expansion_is_the_product_of_the_expanded_axes_with_precedence():
    profile = profile_of({
        "defaults": {"MODEL": "smollm2-135m", "SEED": 1, "FIG_DIR": "figures"},
        "axes": {"DATASET": ["biography", "niah"], "SEED": [42, 43], "UNUSED": [0]},
        "notebooks": {"03_evaluate": {"expand": ["DATASET", "SEED"], "params": {"N_SAMPLES": 3}},
                      "06_latency": {"params": {"SEED": 7}}},
    })
    runs = profile.runs("results")
    assert [r.notebook for r in runs] == ["03_evaluate"] * 4 + ["06_latency"]
    assert [(r.params["DATASET"], r.params["SEED"]) for r in runs[:4]] == [
        ("biography", 42), ("biography", 43), ("niah", 42), ("niah", 43)]
    assert runs[4].params == {"MODEL": "smollm2-135m", "SEED": 7, "FIG_DIR": "figures",
                              "OUT_DIR": str(Path("results", "test", runs[4].run_id))}
    assert all(r.params["N_SAMPLES"] == 3 and r.params["MODEL"] == "smollm2-135m" for r in runs[:4])
    assert len({r.run_id for r in runs}) == len(runs)


def test_run_id_is_readable_and_deterministic():
    run_id = pipeline.make_run_id("03_evaluate", {"MODEL": "Qwen/Qwen3-4B", "DATASET": "niah", "SEED": 42},
                                  {"MODEL": "Qwen/Qwen3-4B", "DATASET": "niah", "SEED": 42, "N": 5})
    assert re.fullmatch(r"03_evaluate__Qwen-Qwen3-4B__niah__seed42__[0-9a-f]{6}", run_id)
    same = pipeline.make_run_id("03_evaluate", {"MODEL": "Qwen/Qwen3-4B", "DATASET": "niah", "SEED": 42},
                                {"N": 5, "SEED": 42, "DATASET": "niah", "MODEL": "Qwen/Qwen3-4B"})
    other = pipeline.make_run_id("03_evaluate", {"MODEL": "Qwen/Qwen3-4B", "DATASET": "niah", "SEED": 42},
                                 {"MODEL": "Qwen/Qwen3-4B", "DATASET": "niah", "SEED": 42, "N": 6})
    assert same == run_id and other != run_id


@pytest.mark.parametrize("name", ["quick", "paper", "hub"])
def test_shipped_profiles_expand_and_validate(name):
    profile = load_profile(name, ROOT / "configs")
    runs = profile.runs("results")
    validate(profile, runs, ROOT / "notebooks", need_files=False)
    assert set(profile.notebooks) <= set(pipeline.NOTEBOOKS)
    assert len({r.run_id for r in runs}) == len(runs)
    evaluate = [r for r in runs if r.notebook == "03_evaluate"]
    assert {r.params["DATASET"] for r in evaluate} >= {"biography", "niah"}
    assert all(set(r.params["METHODS"]) == set(METHODS) for r in evaluate)
    models = {r.params["MODEL"] for r in evaluate}
    if name == "quick":
        assert {r.params["MODEL"] for r in runs} == {"smollm2-135m"}
    elif name == "paper":  # the paper's sizes on the embedded models, three wrapper seeds
        assert models == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
        assert all(r.params["N_SAMPLES"] >= 200 and r.params["EXTRA_ADAPTER_SEEDS"] == [1, 2]
                   and r.params["RECOMPUTE_RATIOS"] == [0.1, 0.3, 0.5, 0.7, 0.9] for r in evaluate)
    else:
        assert models == {"meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-4B"}


def test_match_keeps_the_runs_whose_parameter_has_the_value():
    profile = load_profile("paper", ROOT / "configs")
    runs = profile.runs("results")
    chosen = pipeline.select(runs, profile, ["03_evaluate"], ["MODEL=smollm2-135m", "DATASET=niah"])
    assert [(r.notebook, r.params["MODEL"], r.params["DATASET"]) for r in chosen] == [
        ("03_evaluate", "smollm2-135m", "niah")]
    assert {r.notebook for r in pipeline.select(runs, profile, None, ["MODEL=qwen2.5-coder-1.5b"])} \
        == {"01_attention_shift", "03_evaluate", "04_attention_maps", "05_compression"}
    with pytest.raises(ConfigError, match=r"MODEL takes the values \[.*'smollm2-135m'.*pick one"):
        pipeline.select(runs, profile, None, ["MODEL=qwen3"])
    with pytest.raises(ConfigError, match="no run of profile paper has a parameter NOPE"):
        pipeline.select(runs, profile, None, ["NOPE=1"])
    with pytest.raises(ConfigError, match="is not NAME=VALUE"):
        pipeline.select(runs, profile, None, ["MODEL"])


def test_waves_finish_the_training_runs_before_later_notebooks_start():
    profile = load_profile("hub", ROOT / "configs")
    runs = profile.runs("results")
    groups = pipeline.waves(runs)
    assert [i for group in groups for i in group] == list(range(len(runs)))
    notebooks = [{runs[i].notebook for i in group} for group in groups]
    assert notebooks[0] == {"02_train_adapters"} and "02_train_adapters" not in set().union(*notebooks[1:])
    paper = load_profile("paper", ROOT / "configs").runs("results")
    groups = pipeline.waves(paper)  # everything side by side, but the latency run alone
    assert [[paper[i].notebook for i in g] for g in groups][1:] == [["06_latency"]]
    assert len(groups[0]) == len(paper) - 1


def test_each_kernel_gets_its_own_ipc_socket_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = pipeline.IPCKernelManager(), pipeline.IPCKernelManager()
    assert first.transport == second.transport == "ipc"
    assert first.ip != second.ip and Path(first.ip).is_absolute()
    assert Path(first.ip).parent != tmp_path  # not the shared default in the working directory


# ------------------------------------------------------------------------------- validation
GOOD = {"axes": {"DATASET": ["biography"]},
        "notebooks": {"03_evaluate": {"expand": ["DATASET"], "params": {"METHODS": ["kv_packet"]}}}}


def with_changes(**notebook: object) -> dict:
    return {"axes": GOOD["axes"], "notebooks": {"03_evaluate": {**GOOD["notebooks"]["03_evaluate"], **notebook}}}


@pytest.mark.parametrize("data, bad, allowed", [
    ({**GOOD, "axis": {}}, "'axis'", "notebooks"),
    (with_changes(param={}), "'param'", "expand"),
    (with_changes(expand=["DATASETS"]), "'DATASETS'", "DATASET"),
    (with_changes(params={"DATASET": "niah"}), "DATASET", "keep one"),
    ({**GOOD, "defaults": {"OUT_DIR": "x"}}, "OUT_DIR", "set by the pipeline"),
    ({"axes": {"DATASET": []}, "notebooks": GOOD["notebooks"]}, "DATASET", "non-empty list"),
])
def test_structural_errors_name_the_key(data, bad, allowed):
    with pytest.raises(ConfigError, match=re.escape(bad)) as info:
        profile_of(data)
    assert allowed in str(info.value)


@pytest.mark.parametrize("params, bad, allowed", [
    ({"MODEL": "gpt-17"}, "'gpt-17'", "smollm2-135m"),
    ({"METHODS": ["kv_packet", "kv_pakcet"]}, "'kv_pakcet'", "cache_blend"),
    ({"METHOD": "blend"}, "'blend'", "rand_recompute"),
    ({"DATASET": "squad"}, "'squad'", "hotpotqa"),
    ({"TRAIN_DATASET": "wiki"}, "'wiki'", "mixture"),
])
def test_unknown_names_are_refused_before_running(params, bad, allowed, tmp_path):
    profile = profile_of({"notebooks": {"06_latency": {"params": params}}})
    with pytest.raises(ConfigError, match=re.escape(bad)) as info:
        validate(profile, profile.runs(tmp_path), tmp_path, need_files=False)
    assert allowed in str(info.value)


def test_unknown_notebook_and_undeclared_parameter(tmp_path):
    profile = profile_of({"notebooks": {"07_extra": {}}})
    with pytest.raises(ConfigError, match="'07_extra'.*03_evaluate"):
        validate(profile, profile.runs(tmp_path), FIXTURES, need_files=False)
    profile = profile_of({"notebooks": {"tiny": {"params": {"N_SAMPLEZ": 3}}}})
    with pytest.raises(ConfigError, match="N_SAMPLEZ.*declared: .*SLEEP_S"):
        validate(profile, profile.runs(tmp_path), FIXTURES, need_files=True)
    profile = profile_of({"notebooks": {"03_evaluate": {}}})
    with pytest.raises(ConfigError, match="no file"):
        validate(profile, profile.runs(tmp_path), FIXTURES, need_files=True)


def test_cli_refuses_unknown_profile_and_only(tmp_path, capsys):
    assert pipeline.main(["--profile", "nope", "--config-dir", str(FIXTURES)]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    args = ["--profile", "tiny", "--config-dir", str(FIXTURES), "--notebook-dir", str(FIXTURES),
            "--results-dir", str(tmp_path)]
    assert pipeline.main([*args, "--only", "03_evaluate"]) == 2
    assert "its notebooks: ['tiny']" in capsys.readouterr().err
    assert pipeline.main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.count("todo") == 2
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ results files
def test_run_results_round_trip_and_summary(tmp_path):
    rows = [{"model": "m", "dataset": "biography", "method": "kv_packet", "f1_micro": 0.5, "press": "knorm"},
            {"model": "m", "dataset": "biography", "method": "epic", "setting": "p=30", "n": 10}]
    write_run_results(tmp_path / "run_a", rows, {"MODEL": "m"}, {"loss": 1.5})
    back = read_run_results(tmp_path / "run_a")
    assert list(back.table.columns) == [*RESULT_COLUMNS, "press"]
    assert back.table["setting"].tolist() == ["", "p=30"] and back.metrics == {"loss": 1.5}
    assert collect_summary(tmp_path).empty  # not marked done yet
    write_json(tmp_path / "run_a" / DONE_FILE, {"notebook": "03_evaluate"})
    summary = collect_summary(tmp_path)
    assert list(summary.columns) == [*RESULT_COLUMNS, *SOURCE_COLUMNS] and len(summary) == 2
    assert collect_summary(tmp_path, run_ids=["other"]).empty
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    with pytest.raises(ValueError, match=r"\['method'\]"):
        write_run_results(tmp_path / "run_b", [{"model": "m", "dataset": "d"}], {})


def test_export_compresses_tables_and_keeps_only_checkpoints_of_unfinished_runs(tmp_path, capsys):
    runs = tmp_path / "results" / "paper"
    done, running = runs / "03_evaluate__m__a", runs / "03_evaluate__m__b"
    write_run_results(done, [{"model": "m", "dataset": "niah", "method": "kv_packet", "n": 3}],
                      {"MODEL": "m"}, {"n_samples": 3})
    write_json(done / DONE_FILE, {"notebook": "03_evaluate", "device": "cpu"})
    samples = pd.DataFrame({"sample_id": ["s0", "s1"], "score": [0.123456789, 2.5]})
    samples.to_csv(done / "samples.csv", index=False)
    (done / "03_evaluate.ipynb").write_text("{}")
    pd.DataFrame({"sample_id": ["s0"]}).to_csv(resume_path(done), index=False)  # a stale copy
    running.mkdir()
    (running / "03_evaluate.partial.ipynb").write_text("{}")
    pd.DataFrame({"sample_id": ["s0"]}).to_csv(resume_path(running), index=False)
    write_json(running / ATTEMPTS_FILE, {"attempts": [{"status": "running", "wall_s": 5.0}]})
    dest = tmp_path / "data" / "paper_run"
    write_json(dest / done.name / "resume.csv.gz", {})  # left by an export made while it ran
    write_json(dest / done.name / ATTEMPTS_FILE, {"attempts": []})  # likewise
    assert pipeline.main(["--export", str(runs), "--to", str(dest)]) == 0
    assert "exported 1 finished runs and the checkpoints of 1 unfinished" in capsys.readouterr().out
    assert sorted(p.name for p in (dest / done.name).iterdir()) == sorted(
        [DONE_FILE, "config.json", "metrics.json", "results.csv", "samples.csv.gz"])
    pd.testing.assert_frame_equal(read_table(dest / done.name, "samples"), samples)
    first = (dest / done.name / "samples.csv.gz").read_bytes()
    os.utime(done / "samples.csv", (0, 12345))
    assert pipeline.main(["--export", str(runs), "--to", str(dest)]) == 0
    assert (dest / done.name / "samples.csv.gz").read_bytes() == first  # no churn in git
    capsys.readouterr()
    assert sorted(p.name for p in (dest / running.name).iterdir()) == [ATTEMPTS_FILE,
                                                                       "resume.csv.gz"]
    summary = pd.read_csv(dest / "summary.csv")
    assert summary["run_id"].tolist() == [done.name] and summary["n"].tolist() == [3]
    assert not [p for p in dest.rglob("*") if ".tmp" in p.name]
    assert pipeline.main(["--export", str(runs)]) == 2
    assert "--export needs --to DIR" in capsys.readouterr().err
    assert pipeline.main(["--export", str(tmp_path / "nope"), "--to", str(dest)]) == 2
    assert "is not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------------- end-to-end matrix
def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "pipeline ended before the condition was met"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.notebook
def test_killed_pipeline_resumes_and_skips_finished_cells(tmp_path):
    profile_dir = tmp_path / "tiny"
    proc = subprocess.Popen(cli("tiny", tmp_path), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(profile_dir.glob(f"*/{DONE_FILE}")), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and its kernel
        proc.wait()
    (first_done,) = profile_dir.glob(f"*/{DONE_FILE}")
    stamp = first_done.stat().st_mtime_ns
    assert not (profile_dir / "summary.csv").exists()

    resumed = subprocess.run(cli("tiny", tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped  {first_done.parent.name}" in resumed.stdout
    assert first_done.stat().st_mtime_ns == stamp
    run_dirs = sorted(p for p in profile_dir.iterdir() if p.is_dir())
    for run_dir in run_dirs:
        assert {"DONE.json", "tiny.ipynb", "results.csv", "config.json", "metrics.json"} <= {
            p.name for p in run_dir.iterdir()}
        assert not [p for p in run_dir.iterdir() if "partial" in p.name or ".tmp" in p.name]
        done = read_json(run_dir / DONE_FILE)
        assert done["attempts"][-1]["status"] == "done" and not (run_dir / ATTEMPTS_FILE).exists()
        assert done["total_wall_s"] == total_wall_s(done["attempts"]) >= done["wall_s"] > 0
    summary = pd.read_csv(profile_dir / "summary.csv")
    assert sorted(summary["dataset"].unique()) == ["biography", "niah"] and len(summary) == 4
    report = json.loads((profile_dir / "pipeline.json").read_text())
    assert (report["done"], report["skipped"], report["failed"]) == (1, 1, 0) and report["wall_s"] > 0


def test_a_killed_attempt_keeps_its_time_up_to_its_last_heartbeat(tmp_path):
    script = ("import sys, time; from kvp.results import AttemptLog; "
              "AttemptLog(sys.argv[1], heartbeat_s=0.05); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                            start_new_session=True)
    path = tmp_path / ATTEMPTS_FILE
    try:
        wait_for(lambda: path.exists() and read_json(path)["attempts"][0]["wall_s"] >= 0.5, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = read_json(path)["attempts"][0]["wall_s"]
    log = AttemptLog(tmp_path, heartbeat_s=0.05)
    time.sleep(0.2)
    history = log.end("done")
    assert [a["status"] for a in history] == ["interrupted", "done"]
    assert history[0]["wall_s"] == killed >= 0.5 and history[1]["wall_s"] >= 0.2
    assert read_json(path)["attempts"] == history
    assert total_wall_s(history) == pytest.approx(killed + history[1]["wall_s"])
    again = AttemptLog(tmp_path, fresh=True).end("failed")  # --force: a new history
    assert [a["status"] for a in again] == ["failed"]


def test_restore_copies_missing_files_and_keeps_existing_ones(tmp_path):
    src, profile_dir = tmp_path / "paper_run", tmp_path / "results" / "paper"
    write_json(src / "run_a" / DONE_FILE, {"notebook": "03_evaluate"})
    (src / "run_b").mkdir()
    (src / "run_b" / "resume.csv.gz").write_bytes(b"old")
    (src / "summary.csv").write_text("not a run\n")
    (profile_dir / "run_b").mkdir(parents=True)
    (profile_dir / "run_b" / "resume.csv.gz").write_bytes(b"newer")  # progress made here
    (src / "run_c").mkdir()
    (src / "run_c" / "resume.csv.gz").write_bytes(b"old")
    write_json(profile_dir / "run_c" / DONE_FILE, {"notebook": "03_evaluate"})  # finished here
    assert restore_runs(src, profile_dir) == ["run_a", "run_b", "run_c"]
    assert [p.name for p in (profile_dir / "run_c").iterdir()] == [DONE_FILE]
    assert (profile_dir / "run_a" / DONE_FILE).read_text() == (src / "run_a" / DONE_FILE).read_text()
    assert (profile_dir / "run_b" / "resume.csv.gz").read_bytes() == b"newer"
    assert not (profile_dir / "summary.csv").exists()
    with pytest.raises(FileNotFoundError, match="holds no run directory"):
        restore_runs(tmp_path / "nothing", profile_dir)


def test_continue_from_an_exported_run_skips_its_finished_runs(tmp_path, capsys):
    exported = tmp_path / "run"
    for run in load_profile("tiny", FIXTURES).runs(tmp_path / "elsewhere"):  # as a GPU box left them
        row = {"model": "m", "dataset": "d", "method": "kv_packet"}
        write_run_results(exported / run.run_id, [row], {"MODEL": "m"})
        write_json(exported / run.run_id / DONE_FILE, {"notebook": run.notebook})
    args = ["--profile", "tiny", "--config-dir", str(FIXTURES), "--notebook-dir", str(FIXTURES),
            "--results-dir", str(tmp_path / "results"), "--continue-from", str(exported)]
    assert pipeline.main(args) == 0  # nothing is executed: no kernel starts
    out = capsys.readouterr().out
    assert "continuing 2 runs" in out and "2 runs: 2 ok (2 skipped)" in out
    assert len(pd.read_csv(tmp_path / "results" / "tiny" / "summary.csv")) == 2
    assert pipeline.main([*args[:-1], str(tmp_path / "empty")]) == 2
    assert "holds no run directory" in capsys.readouterr().err


@pytest.mark.notebook
def test_failing_cell_does_not_stop_the_matrix(tmp_path):
    result = subprocess.run(cli("tiny_fail", tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    runs = {p.name.split("__")[1]: p for p in (tmp_path / "tiny_fail").iterdir() if p.is_dir()}
    failed, ok = runs["failTrue"], runs["failFalse"]
    assert (ok / DONE_FILE).exists() and not (failed / DONE_FILE).exists()
    log = failed / pipeline.LOG_FILE
    assert f"log: {log}" in result.stdout and "RuntimeError: tiny notebook asked to fail" in result.stdout
    assert "tiny notebook asked to fail" in log.read_text()
    assert (failed / "tiny.failed.ipynb").exists() and not (failed / "tiny.ipynb").exists()
    report = json.loads((tmp_path / "tiny_fail" / "pipeline.json").read_text())
    assert report["failures"] == [{"run_id": failed.name, "log": str(log),
                                   "error": "RuntimeError: tiny notebook asked to fail"}]


@pytest.mark.notebook
def test_jobs_run_cells_side_by_side_each_with_its_own_kernel(tmp_path):
    result = subprocess.run(cli("tiny", tmp_path, "--jobs", "2"), cwd=ROOT, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    done = [json.loads(p.read_text()) for p in sorted((tmp_path / "tiny").glob(f"*/{DONE_FILE}"))]
    assert len(done) == 2
    starts = sorted(pd.Timestamp(d["started"]).timestamp() for d in done)
    assert starts[1] - starts[0] < min(d["wall_s"] for d in done)  # the second began before the first ended
    assert all(d["torch"] == torch.__version__ and d["device"] and d["git_commit"]
               for d in done)  # each run names the machine it ran on
    if not torch.cuda.is_available():  # the two kernels share the cores
        threads = pipeline.kernel_threads(2, 2)
        assert all(d["device"].endswith(f", {threads} threads)") for d in done), done
    summary = pd.read_csv(tmp_path / "tiny" / "summary.csv")
    assert sorted(summary["dataset"].unique()) == ["biography", "niah"] and len(summary) == 4


def test_kernels_side_by_side_share_the_cores():
    assert pipeline.kernel_threads(2, 5, cores=2) == 1
    assert pipeline.kernel_threads(2, 1, cores=2) == 2  # a run alone in its group gets them all
    assert pipeline.kernel_threads(8, 3, cores=16) == 5
    assert pipeline.kernel_threads(4, 4, cores=2) == 1  # never fewer than one


@pytest.mark.notebook
def test_force_starts_an_unfinished_run_over_without_its_checkpoints(tmp_path):
    run = load_profile("tiny", FIXTURES).runs(tmp_path)[0]
    checkpoint = resume_path(run.out_dir)
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"rows of an interrupted evaluation")
    assert pipeline.execute_run(run, FIXTURES, force=True).status == "done"
    assert not checkpoint.exists()


# ------------------------------------------------------------------ errors caught before running
def test_yaml_syntax_error_names_file_and_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("description: x\nnotebooks:\n  03_evaluate: {params: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml, line \d+: YAML syntax error"):
        load_profile("broken", tmp_path)


@pytest.mark.parametrize("params, message", [
    ({"N_SAMPLES": "20"}, "N_SAMPLES='20' has type str"),
    ({"RECOMPUTE_RATIOS": [0.3, 1.5]}, "ratio=1.5 must be within [0, 1]"),
    ({"EPIC_TOKENS": [-1]}, "n_tokens=-1 must be >= 0"),
    ({"DATASET": "jsonl"}, "DATASET='jsonl' needs DATA_PATH"),
    ({"DATASET": "jsonl", "DATA_PATH": "no/such.jsonl"}, "DATA_PATH='no/such.jsonl' is not a file"),
])
def test_dry_run_checks_types_method_settings_and_data_files(params, message, tmp_path):
    profile = profile_of({"notebooks": {"03_evaluate": {"params": params}}})
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(profile, profile.runs(tmp_path), ROOT / "notebooks", need_files=False)


def test_kernels_talk_over_ipc_and_do_not_warn_about_tcp(tmp_path, capfd):
    nbformat = pytest.importorskip("nbformat")
    papermill = pytest.importorskip("papermill")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "t.ipynb")
    out = papermill.execute_notebook(str(tmp_path / "t.ipynb"), str(tmp_path / "o.ipynb"),
                                     kernel_name="python3", cwd=str(tmp_path), progress_bar=False,
                                     log_output=True, kernel_manager_class=pipeline.IPCKernelManager)
    assert out.cells[0].outputs[0]["text"].strip() == "42"
    assert "without encryption" not in "".join(capfd.readouterr())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.ipynb", "t.ipynb"]  # no socket files


@pytest.mark.slow  # five notebooks through the pipeline, about two minutes
@pytest.mark.notebook
def test_redraw_draws_the_figures_of_a_finished_run_again(tmp_path, capsys):
    profile = yaml.safe_load((FIXTURES / "redraw.yaml").read_text())
    profile["defaults"]["FIG_DIR"] = str(tmp_path / "drawn")
    (tmp_path / "redraw.yaml").write_text(yaml.safe_dump(profile))
    result = subprocess.run([sys.executable, "-m", "kvp.pipeline", "--profile", "redraw",
                             "--config-dir", str(tmp_path), "--results-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "redraw"
    for table in [*run_dir.glob("*/samples.csv"), *run_dir.glob("*/segment_scores.csv")]:
        with table.open("rb") as src, gzip.open(f"{table}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)  # committed runs keep their per-sample rows compressed
        table.unlink()
    assert pipeline.main(["--redraw", str(run_dir), "--fig-dir", str(tmp_path / "again")]) == 0
    drawn = {p.name for p in (tmp_path / "drawn").iterdir()} - {"fig2_attention_maps.png",
                                                                "fig2_attention_maps.pdf"}
    pngs = [n for n in drawn if n.endswith(".png")]
    # every notebook's figures (the tier figure too when data/benchmarks holds a tiered CSV)
    for base in ("attention_shift", "fig3_main_results", "fig4_compression",
                 "fig5_segment_scores", "latency"):
        assert any(n.startswith(base) for n in pngs), (base, sorted(pngs))
    assert f"{len(drawn) // 2} figures re-drawn" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "again").iterdir()} == drawn
    for name in sorted(n for n in drawn if n.endswith(".png")):  # the notebook's own figure
        again, first = (plt.imread(tmp_path / d / name) for d in ("again", "drawn"))
        assert again.shape == first.shape, name  # pixels differ where a value round-tripped
        assert (abs(again - first) > 0.02).mean() < 0.002, name  # through a CSV in float32


def test_the_committed_paper_run_redraws_on_cpu(tmp_path, capsys):
    run = ROOT / "data" / "paper_run"
    finished = sorted(p.parent.name for p in run.glob(f"*/{DONE_FILE}"))
    assert finished, "data/paper_run holds no finished run"
    assert pipeline.main(["--redraw", str(run), "--fig-dir", str(tmp_path)]) == 0
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    assert f"{len(drawn)} figures re-drawn" in capsys.readouterr().out
    for run_id in finished:  # every finished run of a drawing notebook left its figure
        notebook, model = run_id.split("__")[:2]
        if notebook in ("01_attention_shift", "04_attention_maps"):
            base = "attention_shift" if notebook.startswith("01") else "fig5_segment_scores"
            assert any(n.startswith(base) and (model == "smollm2-135m" or model in n)
                       for n in drawn), (run_id, drawn)
    summary = pd.read_csv(run / "summary.csv")
    assert set(summary.run_id) <= set(finished)


def test_redraw_of_a_directory_without_runs_names_it(tmp_path, capsys):
    assert pipeline.main(["--redraw", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no finished run" in capsys.readouterr().err
