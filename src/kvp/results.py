"""Tidy run results: one directory per run, written atomically, collected into one summary.

A run directory (``results/<profile>/<run-id>/``, the notebook's ``OUT_DIR``) holds:

* ``config.json``  — the run's parameters and anything else needed to reproduce it;
* ``metrics.json`` — free-form scalar metrics of the run (e.g. training loss, wall time);
* ``results.csv``  — the tidy table, one row per (model, dataset, method, setting) evaluation,
  with the columns of :data:`RESULT_COLUMNS` (missing ones are left empty) plus any extra columns
  the notebook wants to keep (press name, compression ratio, context length, ...);
* ``attempts.json`` — while the run is unfinished: the wall time of every process that has worked
  on it (:class:`AttemptLog`), so a run resumed across processes or machines reports its whole
  cost;
* ``DONE.json``    — written by the pipeline only after the whole notebook succeeded, with that
  history (``attempts``, ``total_wall_s``).

Every file is written to a temporary name in the same directory and renamed into place, so a
reader never sees half a file. :func:`collect_summary` gathers the ``results.csv`` of every
finished run of a profile into one table.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import os
import platform
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.csv"
DONE_FILE = "DONE.json"

REQUIRED_COLUMNS = ("model", "dataset", "method")
RESULT_COLUMNS = (
    *REQUIRED_COLUMNS, "setting", "n", "f1_micro", "ci_low", "ci_high", "agree_f1", "ttft_ms", "flops",
)
# Columns the summary adds to say where each row came from.
SOURCE_COLUMNS = ("notebook", "run_id")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the suffix of ``path`` so that writers choosing a format from the
    extension (matplotlib, pandas) behave as for the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON atomically; values JSON cannot hold are written as strings."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object written by :func:`write_json`."""
    return json.loads(Path(path).read_text())


def results_frame(rows: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Normalise result rows to a frame with :data:`RESULT_COLUMNS` first, extra columns after.

    Raises ``ValueError`` when a required column (model, dataset, method) is missing or empty.
    """
    df = pd.DataFrame(rows).copy()
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns or df[c].isna().any()]
    if missing:
        raise ValueError(
            f"result rows lack values for {missing}; every row needs {list(REQUIRED_COLUMNS)} "
            f"(got columns {list(df.columns)}). Add them to each row dict."
        )
    for col in RESULT_COLUMNS:
        if col not in df.columns:
            df[col] = "" if col == "setting" else math.nan
    df["setting"] = df["setting"].fillna("").astype(str)
    extra = [c for c in df.columns if c not in RESULT_COLUMNS]
    return df[[*RESULT_COLUMNS, *extra]]


def write_run_results(
    out_dir: str | Path,
    rows: pd.DataFrame | Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a run's ``config.json``, ``metrics.json`` and ``results.csv`` into ``out_dir``.

    ``rows`` is one dict (or frame row) per evaluation with at least ``model``, ``dataset`` and
    ``method``; see :data:`RESULT_COLUMNS` for the standard columns. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    table = results_frame(rows)
    write_json(out_dir / CONFIG_FILE, dict(config))
    write_json(out_dir / METRICS_FILE, dict(metrics or {}))
    with atomic_path(out_dir / RESULTS_FILE) as tmp:
        table.to_csv(tmp, index=False)
    return out_dir


@dataclass(frozen=True)
class RunResults:
    """The three tidy files of one run directory."""

    config: dict[str, Any]
    metrics: dict[str, Any]
    table: pd.DataFrame


def read_run_results(out_dir: str | Path) -> RunResults:
    """Read back what :func:`write_run_results` wrote into ``out_dir``."""
    out_dir = Path(out_dir)
    if not (out_dir / RESULTS_FILE).exists():
        raise FileNotFoundError(
            f"{out_dir} holds no {RESULTS_FILE}; the run did not call kvp.results.write_run_results"
        )
    table = pd.read_csv(out_dir / RESULTS_FILE, keep_default_na=False, na_values=[""])
    table["setting"] = table["setting"].fillna("").astype(str)
    return RunResults(read_json(out_dir / CONFIG_FILE), read_json(out_dir / METRICS_FILE), table)


def read_table(out_dir: str | Path, name: str) -> pd.DataFrame:
    """The tidy table ``<out_dir>/<name>.csv``, or its gzip-compressed ``<name>.csv.gz``."""
    for path in (Path(out_dir) / f"{name}.csv", Path(out_dir) / f"{name}.csv.gz"):
        if path.exists():
            return pd.read_csv(path)
    raise FileNotFoundError(f"{out_dir} holds neither {name}.csv nor {name}.csv.gz; the run did "
                            "not write that table (re-run its notebook)")


def collect_summary(profile_dir: str | Path, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Concatenate the results of every finished run (``DONE.json`` present) under ``profile_dir``.

    ``run_ids`` restricts the summary to those runs (the pipeline passes its current matrix, so
    runs of an older configuration left on disk are not mixed in). Columns:
    :data:`RESULT_COLUMNS` then :data:`SOURCE_COLUMNS`; runs without ``results.csv`` (e.g.
    training or attention notebooks) contribute no rows.
    """
    wanted = None if run_ids is None else set(run_ids)
    frames = []
    for done in sorted(Path(profile_dir).glob(f"*/{DONE_FILE}")):
        run_dir = done.parent
        if (wanted is not None and run_dir.name not in wanted) or not (run_dir / RESULTS_FILE).exists():
            continue
        table = read_run_results(run_dir).table
        table["notebook"] = read_json(done).get("notebook", "")
        table["run_id"] = run_dir.name
        frames.append(table[[*RESULT_COLUMNS, *SOURCE_COLUMNS]])
    if not frames:
        return pd.DataFrame(columns=[*RESULT_COLUMNS, *SOURCE_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def read_rows(path: Path) -> pd.DataFrame | None:
    """Per-sample rows written by :func:`write_rows` (``gold`` parsed back into lists), or
    ``None`` when there is no file."""
    if not Path(path).exists():
        return None
    rows = pd.read_csv(path, keep_default_na=False,
                       dtype={"answer": str, "raw_answer": str, "wrapper_fingerprint": str})
    rows["gold"] = rows["gold"].map(ast.literal_eval)
    return rows


def write_rows(path: Path, rows: pd.DataFrame) -> None:
    """Per-sample rows (one per sample and method) as gzip-compressed CSV, written atomically."""
    with atomic_path(path) as tmp:
        rows.to_csv(tmp, index=False, compression="gzip")


CHECKPOINTS = "resume*.csv.gz"  # the names :func:`resume_path` gives


def resume_path(out_dir: str | Path, tag: str = "") -> Path:
    """Where a notebook run keeps the checkpoint of one evaluation (``kvp.evaluate.evaluate``'s
    ``checkpoint``) while it runs: ``<out_dir>/resume<tag>.csv.gz``."""
    return Path(out_dir) / f"resume{tag}.csv.gz"


def clear_resume(out_dir: str | Path) -> None:
    """Delete every evaluation checkpoint of a run directory (:func:`resume_path`): the run has
    finished, or is to start over."""
    for path in Path(out_dir).glob(CHECKPOINTS):
        path.unlink()


ATTEMPTS_FILE = "attempts.json"


class AttemptLog:
    """The wall time of every process that works on one run directory, in ``attempts.json``.

    ``AttemptLog(out_dir)`` appends an attempt (``started``, ``device``, ``status`` "running",
    ``wall_s`` so far) and rewrites it every ``heartbeat_s`` seconds from a daemon thread, so a
    process that is killed leaves its time up to its last heartbeat. An attempt found still
    "running" by the next one is marked "interrupted" (its ``wall_s`` is then a lower bound, short
    by at most ``heartbeat_s``). :meth:`end` stops the heartbeat, records the status and returns
    the whole history, a list of dicts. ``fresh=True`` forgets the earlier attempts (a forced
    restart).
    """

    def __init__(self, out_dir: str | Path, fresh: bool = False, heartbeat_s: float = 30.0):
        self.path = Path(out_dir) / ATTEMPTS_FILE
        self.history = [] if fresh or not self.path.exists() else read_json(self.path)["attempts"]
        for attempt in self.history:
            if attempt["status"] == "running":
                attempt["status"] = "interrupted"
        self.current = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "device": machine()["device"], "status": "running", "wall_s": 0.0}
        self.history.append(self.current)
        self._t0, self._lock, self._stop = time.perf_counter(), threading.Lock(), threading.Event()
        self._write()
        self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True)
        self._beat.start()

    def _write(self) -> None:
        with self._lock:
            self.current["wall_s"] = round(time.perf_counter() - self._t0, 3)
            write_json(self.path, {"attempts": self.history})

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(every):
            self._write()

    def end(self, status: str) -> list[dict[str, Any]]:
        """Stop the heartbeat and record ``status`` ("done" or "failed"); returns the history."""
        self._stop.set()
        self._beat.join()
        self.current["status"] = status
        self._write()
        return self.history


def total_wall_s(history: Sequence[Mapping[str, Any]]) -> float:
    """Seconds of every attempt of an :class:`AttemptLog` history together."""
    return round(sum(a["wall_s"] for a in history), 3)


KEPT_PLAIN = (CONFIG_FILE, METRICS_FILE, RESULTS_FILE, DONE_FILE, "run.log")


def export_runs(profile_dir: str | Path, dest: str | Path) -> dict[str, list[str]]:
    """Copy the tidy outputs of a profile's runs into ``dest`` (e.g. ``data/paper_run/``).

    Finished runs (``DONE.json``) keep their small files as they are (:data:`KEPT_PLAIN`) and
    every other table gzip-compressed (``samples.csv`` → ``samples.csv.gz``), which
    :func:`read_table` and the re-drawing read; executed notebooks are left out. Unfinished runs
    keep only their evaluation checkpoints (:func:`resume_path`) and ``attempts.json``: copied
    back under ``results/<profile>/``, the pipeline resumes them where they stopped. ``dest/summary.csv`` is
    re-collected over every finished run in ``dest``. Returns the run ids by state
    (``{"finished": [...], "checkpointed": [...]}``).
    """
    profile_dir, dest = Path(profile_dir), Path(dest)
    if not profile_dir.is_dir():
        raise FileNotFoundError(f"{profile_dir} is not a directory; pass what the pipeline wrote, "
                                "e.g. results/paper")
    states: dict[str, list[str]] = {"finished": [], "checkpointed": []}
    for run_dir in sorted(p for p in profile_dir.iterdir() if p.is_dir()):
        if (run_dir / DONE_FILE).exists():
            files = [p for p in run_dir.iterdir() if not p.match(CHECKPOINTS) and (
                p.name in KEPT_PLAIN or p.suffix == ".csv" or p.name.endswith(".csv.gz"))]
            state = "finished"
        else:
            files = sorted(run_dir.glob(CHECKPOINTS)) + sorted(run_dir.glob(ATTEMPTS_FILE))
            state = "checkpointed"
        if not files:
            continue
        target = dest / run_dir.name
        target.mkdir(parents=True, exist_ok=True)
        if state == "finished":  # checkpoints and attempts of an earlier, unfinished export
            clear_resume(target)
            (target / ATTEMPTS_FILE).unlink(missing_ok=True)
        for src in files:
            compress = src.suffix == ".csv" and src.name not in KEPT_PLAIN
            out = target / (src.name + ".gz" if compress else src.name)
            with atomic_path(out) as tmp:
                if compress:  # no name or time in the header: the same table, the same bytes
                    with (open(src, "rb") as f, open(tmp, "wb") as raw,
                          gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as g):
                        shutil.copyfileobj(f, g)
                else:
                    shutil.copyfile(src, tmp)
        states[state].append(run_dir.name)
    with atomic_path(dest / "summary.csv") as tmp:
        collect_summary(dest).to_csv(tmp, index=False)
    return states


def restore_runs(src: str | Path, profile_dir: str | Path) -> list[str]:
    """Copy the run directories of an exported run (:func:`export_runs`) back under
    ``profile_dir``, file by file, keeping every file already there: the pipeline then skips the
    finished runs and resumes the unfinished ones from their checkpoints. A run that has finished
    under ``profile_dir`` (its ``DONE.json``) is left as it is: the export's checkpoints of it are
    older than its results. Returns the run ids."""
    src, profile_dir = Path(src), Path(profile_dir)
    runs = sorted(p for p in src.iterdir() if p.is_dir()) if src.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"{src} holds no run directory; pass an exported run, e.g. "
                                "data/paper_run")
    for run in runs:
        if (profile_dir / run.name / DONE_FILE).exists():
            continue
        for path in run.iterdir():
            target = profile_dir / run.name / path.name
            if path.is_file() and not target.exists():
                with atomic_path(target) as tmp:
                    shutil.copyfile(path, tmp)
    return [run.name for run in runs]


def git_commit() -> str:
    """HEAD of the checkout, or ``KVP_GIT_COMMIT`` for a copy without ``.git`` (e.g. a GPU box)."""
    if os.environ.get("KVP_GIT_COMMIT"):
        return os.environ["KVP_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, str]:
    """Where a run executed: the accelerator (or CPU and thread count), library versions, commit."""
    import torch
    import transformers

    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else
              f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "git_commit": git_commit()}
