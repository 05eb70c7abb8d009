"""Papermill matrix runner: ``python -m kvp.pipeline --profile quick``.

A profile (``configs/<profile>.yaml``) names the notebooks to run and, per notebook, which axes
of the matrix it expands and which fixed parameters it receives::

    description: one line saying what the profile is for
    defaults:              # parameters every notebook receives
      MODEL: smollm2-135m
      SEED: 42
      FIG_DIR: figures
    axes:                  # named value lists; an axis name is the notebook parameter it sets
      MODEL: [smollm2-135m]
      DATASET: [biography, niah]
    notebooks:             # run in this order
      03_evaluate:
        expand: [MODEL, DATASET]      # one run per combination of these axes
        params: {N_SAMPLES: 20, METHODS: [no_recompute, kv_packet]}

Precedence: ``defaults`` < ``params`` < expanded axis values (a name may not be both in
``params`` and ``expand``). ``OUT_DIR`` is set by the pipeline to the run's directory,
``results/<profile>/<run-id>/``. Everything is validated before the first notebook starts:
profile keys, notebook names, axis names, model / dataset / method names (any parameter named
or ending in MODEL(S), DATASET(S), METHOD(S)), and each parameter against the notebook's
``parameters`` cell.

Each run executes into a temporary notebook renamed into place on success, then writes
``DONE.json`` (with the wall time of every process that worked on the run, ``attempts``, and
their sum, ``total_wall_s``: a resumed run reports its whole cost); finished runs are skipped
unless ``--force``. A failed run keeps ``<notebook>.failed.ipynb`` and ``run.log`` and does not
stop the others. At the end
``summary.csv`` (see :func:`kvp.results.collect_summary`) and ``pipeline.json`` (wall time,
counts, failures) are written into ``results/<profile>/``; the exit code is 1 if any run failed.

``--redraw RUN_DIR [--fig-dir DIR]`` instead re-draws the figures of such a finished run from its
tables, with no notebook or model (:mod:`kvp.redraw`).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import papermill
import yaml
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from tqdm.auto import tqdm
from traitlets import default

from kvp import __version__
from kvp.params import (REPO_ROOT, ConfigError, check_params, dataset_options,
                        method_grid, parameters_cell, repo_path, validate_params)
from kvp.redraw import redraw
from kvp.results import (DONE_FILE, AttemptLog, atomic_path, clear_resume, collect_summary,
                         export_runs, machine, restore_runs, total_wall_s, write_json)

NOTEBOOKS = (
    "01_attention_shift", "02_train_adapters", "03_evaluate", "04_attention_maps",
    "05_compression", "06_latency",
)
KERNEL = "python3"
PROFILE_KEYS = ("description", "defaults", "axes", "notebooks")
NOTEBOOK_KEYS = ("expand", "params")
RESERVED_PARAMS = ("OUT_DIR",)
LOG_FILE = "run.log"
KERNEL_START_TIMEOUT_S = 600  # a loaded machine (several runs, one GPU) can take minutes
PRODUCERS = ("02_train_adapters",)  # notebooks whose outputs (adapters) later notebooks read
TIMED = ("06_latency",)  # notebooks that time code: never executed beside another run


# ------------------------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class NotebookPlan:
    """One notebook of a profile: the axes it expands and its fixed parameters."""

    name: str
    expand: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One cell of the matrix: a notebook with fully resolved parameters (``OUT_DIR`` included)."""

    notebook: str
    run_id: str
    out_dir: Path
    params: dict[str, Any]


@dataclass(frozen=True)
class Profile:
    """A parsed ``configs/<name>.yaml``."""

    name: str
    source: Path
    description: str
    defaults: dict[str, Any]
    axes: dict[str, list[Any]]
    notebooks: dict[str, NotebookPlan]

    def runs(self, results_dir: str | Path) -> list[Run]:
        """Expand the matrix into runs, notebooks in profile order, axes in ``expand`` order."""
        runs = []
        for plan in self.notebooks.values():
            for combo in itertools.product(*(self.axes[a] for a in plan.expand)):
                expanded = dict(zip(plan.expand, combo, strict=True))
                params = {**self.defaults, **plan.params, **expanded}
                run_id = make_run_id(plan.name, expanded, params)
                out_dir = Path(results_dir) / self.name / run_id
                runs.append(Run(plan.name, run_id, out_dir, {**params, "OUT_DIR": str(out_dir)}))
        return runs


def make_run_id(notebook: str, expanded: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """Readable, deterministic id: notebook, expanded values, hash of all parameters.

    E.g. ``03_evaluate__smollm2-135m__biography__seed42__a1b2c3``: strings appear as themselves
    (``/`` and other unsafe characters become ``-``), other values prefixed with the axis name.
    """
    parts = [v if isinstance(v, str) else f"{k.lower()}{v}" for k, v in expanded.items()]
    slugs = [re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)) for p in parts]
    digest = hashlib.sha1(json.dumps([notebook, dict(params)], sort_keys=True, default=str).encode())
    return "__".join([notebook, *slugs, digest.hexdigest()[:6]])


def _require_mapping(value: Any, what: str, source: Path) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {what} must be a mapping, got {type(value).__name__} {value!r}")
    return value


def _reject_unknown_keys(data: Mapping, allowed: Sequence[str], where: str) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {list(allowed)}")


def _parse_plan(name: str, data: Any, axes: Mapping[str, list], source: Path) -> NotebookPlan:
    where = f"{source}, notebook {name}"
    data = _require_mapping(data, f"notebook {name}", source)
    _reject_unknown_keys(data, NOTEBOOK_KEYS, where)
    expand = data.get("expand") or []
    if not isinstance(expand, list):
        raise ConfigError(f"{where}: expand must be a list of axis names, got {expand!r}")
    for axis in expand:
        if axis not in axes:
            raise ConfigError(f"{where}: expand names unknown axis {axis!r}; axes: {list(axes)}. "
                              f"Add it under 'axes' or remove it from expand.")
    params = _require_mapping(data.get("params"), f"{name}.params", source)
    both = [k for k in params if k in expand]
    if both:
        raise ConfigError(f"{where}: {both[0]} is both expanded and fixed in params; keep one")
    return NotebookPlan(name, tuple(expand), dict(params))


def parse_profile(name: str, data: Any, source: Path) -> Profile:
    """Build a :class:`Profile` from loaded YAML, checking its structure (not yet its values)."""
    data = _require_mapping(data, "the profile", source)
    _reject_unknown_keys(data, PROFILE_KEYS, str(source))
    axes = _require_mapping(data.get("axes"), "axes", source)
    for axis, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: axis {axis} must be a non-empty list, got {values!r}")
    defaults = _require_mapping(data.get("defaults"), "defaults", source)
    notebooks = _require_mapping(data.get("notebooks"), "notebooks", source)
    if not notebooks:
        raise ConfigError(f"{source}: 'notebooks' is empty; list at least one of {list(NOTEBOOKS)}")
    plans = {nb: _parse_plan(nb, spec, axes, source) for nb, spec in notebooks.items()}
    for key in RESERVED_PARAMS:
        if key in defaults or key in axes or any(key in p.params for p in plans.values()):
            raise ConfigError(f"{source}: {key} is set by the pipeline (the run directory); remove it")
    return Profile(name, source, str(data.get("description", "")), dict(defaults), dict(axes), plans)


def load_profile(name: str, config_dir: str | Path = "configs") -> Profile:
    """Read and parse ``<config_dir>/<name>.yaml``; an unknown name lists the available ones."""
    path = Path(config_dir) / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in Path(config_dir).glob("*.yaml"))
        raise ConfigError(f"unknown profile {name!r}: no {path}; available profiles: {available}. "
                          f"Pick one of them or create {path}.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: YAML syntax error ({problem}); fix the file") from None
    return parse_profile(name, data, path)


def notebook_schema(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(defaults, types) of the notebook's ``parameters`` cell (:func:`kvp.params.parameters_cell`)."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise ConfigError(f"{path}: {len(tagged)} cells are tagged 'parameters'; tag exactly one")
    return parameters_cell("".join(tagged[0]["source"]), f"{path}, parameters cell")


def check_run_values(values: Mapping[str, Any], schema: Mapping[str, Any], where: str) -> None:
    """What a notebook's check cell would refuse, before it starts: types, method settings, the
    data file of a file dataset."""
    try:
        check_params(values, schema)
        if "METHODS" in values:
            method_grid(values["METHODS"], values.get("RECOMPUTE_RATIOS", []),
                        values.get("EPIC_TOKENS", []))
        for dataset in (values.get("DATASET"), *values.get("DATASETS", [])):
            if dataset is not None:
                dataset_options(dataset, 1, 1, 1, values.get("DATA_PATH", ""))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None
    data_path = values.get("DATA_PATH", "")
    if data_path and not Path(repo_path(data_path)).is_file():
        raise ConfigError(f"{where}: DATA_PATH={data_path!r} is not a file (relative paths start "
                          f"at {REPO_ROOT}); correct the path")


def validate(profile: Profile, runs: Sequence[Run], notebook_dir: Path, need_files: bool) -> None:
    """Check notebook names, parameter values and (where the notebook exists) parameter names,
    types (:func:`notebook_schema`), method settings and data files."""
    present = sorted(p.stem for p in notebook_dir.glob("*.ipynb"))
    allowed = sorted({*NOTEBOOKS, *present})
    for name in profile.notebooks:
        if name not in allowed:
            raise ConfigError(f"{profile.source}: unknown notebook {name!r}; allowed: {allowed}. "
                              f"Fix the name or add {notebook_dir / name}.ipynb.")
        if need_files and name not in present:
            raise ConfigError(f"{profile.source}: notebook {name} has no file {notebook_dir / name}.ipynb "
                              f"yet; write it, drop it from the profile, or use --only / --dry-run")
    schemas = {nb: notebook_schema(notebook_dir / f"{nb}.ipynb") for nb in profile.notebooks
               if nb in present}
    for run in runs:
        where = f"{profile.source}, run {run.run_id}"
        validate_params(run.params, where)
        if run.notebook in schemas:
            defaults, schema = schemas[run.notebook]
            unknown = sorted(set(run.params) - set(defaults))
            if unknown:
                raise ConfigError(f"{where}: parameter {unknown[0]} is not declared in the parameters "
                                  f"cell of {run.notebook}; declared: {sorted(defaults)}")
            if schema:
                check_run_values({**defaults, **run.params}, schema, where)


# ----------------------------------------------------------------------------------- execution
@dataclass(frozen=True)
class Outcome:
    """What happened to one run."""

    run: Run
    status: str  # "done", "skipped" or "failed"
    wall_s: float = 0.0
    log: Path | None = None
    error: str = ""


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def _notebook_streams(path: Path) -> str:
    """stdout/stderr text of every executed cell of the notebook at ``path``."""
    if not path.exists():
        return ""
    cells = json.loads(path.read_text()).get("cells", [])
    return "".join("".join(out.get("text", "")) for cell in cells for out in cell.get("outputs", [])
                   if out.get("output_type") == "stream")


def _write_log(run: Run, notebook: Path, error: BaseException | None) -> Path:
    log = run.out_dir / LOG_FILE
    parts = [f"run {run.run_id}\nnotebook {run.notebook}\nparameters "
             f"{json.dumps(run.params, indent=2, default=str)}\n",
             "---- cell output ----\n" + _notebook_streams(notebook)]
    if error is not None:
        parts.append("---- error ----\n" + "".join(traceback.format_exception(error)))
    with atomic_path(log) as tmp:
        tmp.write_text(_strip_ansi("\n".join(parts)))
    return log


class IPCKernelManager(AsyncKernelManager):
    """Kernels that talk to papermill over local IPC sockets (files in Jupyter's runtime
    directory) instead of TCP ports: nothing listens on the network, and the kernel no longer
    warns once per notebook that its TCP traffic is unencrypted."""

    @default("transport")
    def _default_transport(self) -> str:
        return "ipc"

    @default("ip")
    def _default_ip(self) -> str:
        """A socket path of this kernel alone. The library's default, ``kernel-ipc`` in the working
        directory, is shared by every kernel started there: runs executed side by side
        (``--jobs``) then reach each other's kernels and fail with "Invalid Signature"."""
        runtime = Path(jupyter_runtime_dir())
        runtime.mkdir(parents=True, exist_ok=True)
        return str(runtime / f"kvp-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def kernel_threads(jobs: int, side_by_side: int, cores: int | None = None) -> int:
    """CPU threads for each of ``min(jobs, side_by_side)`` kernels sharing ``cores`` (default: this
    machine's): an equal share, at least 1. Two one-thread kernels on 2 cores evaluate 1.7 times
    as many samples a second as one two-thread kernel (README, quick profile)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, min(jobs, side_by_side)))


def execute_run(run: Run, notebook_dir: Path, force: bool = False,
                threads: int | None = None) -> Outcome:
    """Execute one run unless already done; the executed notebook appears only when complete.

    ``threads``: the kernel's CPU threads (``OMP_NUM_THREADS`` of this process, which the kernel
    inherits); None keeps the environment's."""
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:  # so that machine() below reports the kernel's thread count
            sys.modules["torch"].set_num_threads(threads)
    done = run.out_dir / DONE_FILE
    if done.exists() and not force:
        return Outcome(run, "skipped")
    done.unlink(missing_ok=True)
    if force:  # start over; otherwise an unfinished run resumes from its checkpoints
        clear_resume(run.out_dir)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    attempts = AttemptLog(run.out_dir, fresh=force)
    partial = run.out_dir / f"{run.notebook}.partial.ipynb"
    failed = run.out_dir / f"{run.notebook}.failed.ipynb"
    try:
        papermill.execute_notebook(str(notebook_dir / f"{run.notebook}.ipynb"), str(partial),
                                   parameters=run.params, kernel_name=KERNEL, cwd=str(Path.cwd()),
                                   log_output=False, progress_bar=False,
                                   start_timeout=KERNEL_START_TIMEOUT_S,
                                   kernel_manager_class=IPCKernelManager)
    except Exception as error:  # any failure of the notebook is reported, the matrix goes on
        log = _write_log(run, partial, error)
        this = attempts.end("failed")[-1]
        if partial.exists():
            os.replace(partial, failed)
        message = _strip_ansi(str(error)).strip().splitlines()
        return Outcome(run, "failed", this["wall_s"], log, message[-1] if message else "")
    os.replace(partial, run.out_dir / f"{run.notebook}.ipynb")
    failed.unlink(missing_ok=True)
    log = _write_log(run, run.out_dir / f"{run.notebook}.ipynb", None)
    history = attempts.end("done")
    this = history[-1]
    write_json(done, {"notebook": run.notebook, "run_id": run.run_id, "parameters": run.params,
                      "started": this["started"], "wall_s": this["wall_s"], "attempts": history,
                      "total_wall_s": total_wall_s(history), "kvp_version": __version__,
                      **machine()})
    attempts.path.unlink()  # the history is in DONE.json now
    return Outcome(run, "done", this["wall_s"], log)


def waves(runs: Sequence[Run]) -> list[list[int]]:
    """Indices of ``runs`` cut into consecutive groups that may execute side by side: a group ends
    where runs of :data:`PRODUCERS` begin or end, so later notebooks never start before the
    adapters they may read are written, and every run of :data:`TIMED` is a group of its own, so
    that no other kernel shares the machine while it measures."""
    groups: list[list[int]] = []
    for index, run in enumerate(runs):
        last = runs[groups[-1][-1]].notebook if groups else None
        if (groups and last not in TIMED and run.notebook not in TIMED
                and (last in PRODUCERS) == (run.notebook in PRODUCERS)):
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def run_matrix(runs: Sequence[Run], notebook_dir: Path, force: bool = False,
               jobs: int = 1) -> list[Outcome]:
    """Execute every run with a progress bar; failures are collected, not raised.

    ``jobs`` > 1 executes that many runs at a time, each in its own process and kernel (e.g. the
    small embedded models sharing one GPU), group after group of :func:`waves`, the CPU cores
    shared equally between the kernels of a group (:func:`kernel_threads`). Outcomes come back in
    the order of ``runs``.
    """
    outcomes: dict[int, Outcome] = {}
    with tqdm(total=len(runs), desc="pipeline", unit="run") as bar:
        def report(index: int, outcome: Outcome) -> None:
            outcomes[index] = outcome
            bar.update()
            bar.write(f"{outcome.status:>7}  {outcome.run.run_id}  ({outcome.wall_s:.1f} s)")

        if jobs <= 1:
            for index, run in enumerate(runs):
                bar.set_postfix_str(run.run_id)
                report(index, execute_run(run, notebook_dir, force))
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                for group in waves(runs):
                    threads = kernel_threads(jobs, len(group))
                    futures = {pool.submit(execute_run, runs[i], notebook_dir, force, threads): i
                               for i in group}
                    for future in as_completed(futures):
                        report(futures[future], future.result())
    return [outcomes[i] for i in range(len(runs))]


def write_report(profile_dir: Path, profile: Profile, all_runs: Sequence[Run],
                 outcomes: Sequence[Outcome], wall_s: float) -> None:
    """Write ``summary.csv`` over every finished run of the matrix and ``pipeline.json``."""
    summary = collect_summary(profile_dir, run_ids=[r.run_id for r in all_runs])
    with atomic_path(profile_dir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    write_json(profile_dir / "pipeline.json", {
        "profile": profile.name, "config": str(profile.source), "wall_s": round(wall_s, 3),
        "runs": len(outcomes), **counts, "summary_rows": len(summary),
        "failures": [{"run_id": o.run.run_id, "log": str(o.log), "error": o.error}
                     for o in outcomes if o.status == "failed"],
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


# ----------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kvp.pipeline", description=__doc__.splitlines()[0])
    job = parser.add_mutually_exclusive_group(required=True)
    job.add_argument("--profile", help="configs/<profile>.yaml, e.g. quick or paper")
    job.add_argument("--redraw", type=Path, metavar="RUN_DIR",
                     help="re-draw the figures of a finished run (results/<profile>/ or a committed "
                          "copy such as data/paper_run/) from its tables: no notebook, no model")
    job.add_argument("--export", type=Path, metavar="RUN_DIR",
                     help="copy the tidy outputs of results/<profile>/ into --to (tables "
                          "gzip-compressed, checkpoints of unfinished runs kept), e.g. to commit a "
                          "GPU run as data/paper_run/")
    parser.add_argument("--fig-dir", type=Path, default=Path("figures"),
                        help="where --redraw writes the figures")
    parser.add_argument("--to", type=Path, metavar="DIR", help="where --export copies the run")
    parser.add_argument("--continue-from", type=Path, metavar="RUN_DIR",
                        help="with --profile: first copy an exported run (e.g. data/paper_run) into "
                             "results/<profile>/, keeping files already there, so its finished runs "
                             "are skipped and its unfinished ones resume")
    parser.add_argument("--only", action="append", metavar="NOTEBOOK",
                        help="run only this notebook of the profile (repeatable)")
    parser.add_argument("--match", action="append", metavar="NAME=VALUE", default=[],
                        help="run only the runs whose parameter NAME is VALUE, e.g. "
                             "MODEL=smollm2-135m (repeatable: all must hold)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="execute N runs at a time, one process and kernel each (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the runs, run nothing")
    parser.add_argument("--force", action="store_true", help="re-run cells already marked done")
    parser.add_argument("--config-dir", type=Path, default=Path("configs"))
    parser.add_argument("--results-dir", type=Path, default=Path("results"))
    parser.add_argument("--notebook-dir", type=Path, default=Path("notebooks"))
    return parser.parse_args(argv)


def select(runs: Sequence[Run], profile: Profile, only: Sequence[str] | None,
           match: Sequence[str] = ()) -> list[Run]:
    """The runs of the notebooks named by ``--only`` (all when it is not given) whose parameters
    satisfy every ``--match NAME=VALUE`` (values compared as written in the profile)."""
    for name in only or ():
        if name not in profile.notebooks:
            raise ConfigError(f"--only {name!r} is not a notebook of profile {profile.name}; "
                              f"its notebooks: {list(profile.notebooks)}")
    chosen = [r for r in runs if not only or r.notebook in only]
    for condition in match:
        key, sep, value = condition.partition("=")
        if not sep or not key:
            raise ConfigError(f"--match {condition!r} is not NAME=VALUE, e.g. --match MODEL=smollm2-135m")
        values = sorted({str(r.params[key]) for r in runs if key in r.params})
        if not values:
            raise ConfigError(f"--match {condition!r}: no run of profile {profile.name} has a "
                              f"parameter {key}")
        if value not in values:
            raise ConfigError(f"--match {condition!r}: {key} takes the values {values} in profile "
                              f"{profile.name}; pick one of them")
        chosen = [r for r in chosen if str(r.params.get(key)) == value]
    return chosen


def usage_error(error: Exception | str) -> int:
    """Print ``error: ...`` to stderr; the exit code of a refused command line (2)."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Validate the profile, run its matrix, write the report; 0 if every run succeeded."""
    args = parse_args(argv)
    if args.redraw is not None:
        try:
            figures = redraw(args.redraw, args.fig_dir)
        except FileNotFoundError as error:
            return usage_error(error)
        print(f"{len(figures)} figures re-drawn from {args.redraw} into {args.fig_dir}")
        return 0
    if args.export is not None:
        if args.to is None:
            return usage_error("--export needs --to DIR, e.g. --export results/paper --to "
                               "data/paper_run")
        try:
            states = export_runs(args.export, args.to)
        except FileNotFoundError as error:
            return usage_error(error)
        print(f"exported {len(states['finished'])} finished runs and the checkpoints of "
              f"{len(states['checkpointed'])} unfinished ones from {args.export} into {args.to}")
        return 0
    t0 = time.perf_counter()
    try:
        profile = load_profile(args.profile, args.config_dir)
        all_runs = profile.runs(args.results_dir)
        runs = select(all_runs, profile, args.only, args.match)
        if args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: give 1 or more runs at a time")
        validate(profile, runs, args.notebook_dir, need_files=not args.dry_run)
    except ConfigError as error:
        return usage_error(error)
    if args.dry_run:
        for run in runs:
            state = "done" if (run.out_dir / DONE_FILE).exists() and not args.force else "todo"
            print(f"{state:>4}  {run.run_id}")
        print(f"{len(runs)} runs in profile {profile.name}")
        return 0
    if args.continue_from is not None:
        try:
            restored = restore_runs(args.continue_from, args.results_dir / profile.name)
        except FileNotFoundError as error:
            return usage_error(error)
        print(f"continuing {len(restored)} runs of {args.continue_from}")
    outcomes = run_matrix(runs, args.notebook_dir, args.force, args.jobs)
    profile_dir = args.results_dir / profile.name
    write_report(profile_dir, profile, all_runs, outcomes, time.perf_counter() - t0)
    failures = [o for o in outcomes if o.status == "failed"]
    print(f"{len(outcomes)} runs: {len(outcomes) - len(failures)} ok "
          f"({sum(o.status == 'skipped' for o in outcomes)} skipped), {len(failures)} failed; "
          f"summary in {profile_dir / 'summary.csv'}")
    for o in failures:
        print(f"FAILED {o.run.run_id}: {o.error}\n       log: {o.log}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
