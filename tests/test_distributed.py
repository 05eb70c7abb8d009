"""Data parallelism (kvp.distributed): two gloo processes under torchrun give the results of one.

Each multi-process test launches the real command-line entry point with ``torchrun --standalone
--nproc-per-node 2`` (CPU, gloo) and compares its files with those of the same computation in
this one process.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from kvp import distributed
from kvp.report import main as adapters_main
from kvp.evaluate import main as evaluate_main
from kvp.packet import PacketWrapper
from kvp.scaling import ScalingSpec, run as run_scaling
from kvp.train import TrainConfig, initial_wrapper, teacher_examples, train, training_samples

FIXTURE = Path(__file__).parent / "fixtures" / "user_samples.jsonl"
TIMING = ["ttft_ms", "preamble_ms"]  # wall-clock columns: the only ones that may differ
TINY = dict(n_samples=2, batch_size=2, epochs=2, num_docs=(2,), h=2, t=2, max_new_tokens=8,
            top_k=32, lr=1e-2, checkpoint_every=1, seed=3)


def torchrun_argv(module: str, args: list[str]) -> tuple[list[str], dict]:
    argv, env = distributed.torchrun_command(2, module, [str(a) for a in args])
    return argv, {**env, "OMP_NUM_THREADS": "1"}  # two processes on a 2-core machine


def run_two(module: str, args: list[str]) -> None:
    argv, env = torchrun_argv(module, args)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def train_flags(out: Path) -> list[str]:
    flags = ["--out", out, "--num-docs", "2", "--no-plot"]
    for key, value in TINY.items():
        if key != "num_docs":
            flags += [f"--{key.replace('_', '-')}", value]
    return flags


def test_one_process_shards_gathers_and_reduces_trivially():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard(3) == [0, 1, 2]
    assert distributed.gather_by_index([2, 0, 2, 1], ["c", "a", "d", "b"]) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="2 indices for 1 items"):
        distributed.gather_by_index([0, 1], ["a"])
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    with distributed.process_group() as on:  # outside torchrun: nothing to join
        assert not on
    argv, env = distributed.torchrun_command(2, "kvp.evaluate", ["--n-samples", "3"])
    assert argv[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                         "-m"] and env["NCCL_NVLS_ENABLE"] == "0"


def test_sharded_evaluation_equals_one_process(tmp_path):
    args = ["--jsonl", FIXTURE, "--max-new-tokens", 8, "--methods", "no_recompute", "kv_packet"]
    assert evaluate_main([str(a) for a in args] + ["--out", str(tmp_path / "one")]) == 0
    run_two("kvp.evaluate", args + ["--out", tmp_path / "two"])
    one, two = (pd.read_csv(tmp_path / d / "samples.csv") for d in ("one", "two"))
    assert len(one) == 3 * 2 and list(one.sample_id.unique()) == ["u1", "u2", "u3"]
    pd.testing.assert_frame_equal(two.drop(columns=TIMING), one.drop(columns=TIMING))
    one, two = (pd.read_csv(tmp_path / d / "results.csv") for d in ("one", "two"))
    pd.testing.assert_frame_equal(two.drop(columns="ttft_ms"), one.drop(columns="ttft_ms"))


def test_sharded_adapter_evaluation_equals_one_process(tmp_path):
    args = ["evaluate", "--dataset", "biography", "--max-new-tokens", "8"]
    assert adapters_main(args + ["--n", "2", "--out", str(tmp_path / "one")]) == 0
    run_two("kvp.adapters", args + ["--n-samples", "2", "--out", tmp_path / "two"])
    rows = Path("rows") / "smollm2-135m__biography__none.csv.gz"
    one, two = (pd.read_csv(tmp_path / d / rows) for d in ("one", "two"))
    assert len(one) == 2 * 3 and one.answer.nunique() > 1
    pd.testing.assert_frame_equal(two.drop(columns=TIMING), one.drop(columns=TIMING))
    one, two = (pd.read_csv(tmp_path / d / "results.csv") for d in ("one", "two"))
    pd.testing.assert_frame_equal(two, one)


@pytest.fixture(scope="module")
def one_process(smollm, tmp_path_factory):
    """The TINY run in this process: (config, teacher cache, examples, result)."""
    model, tokenizer = smollm.model, smollm.tokenizer
    config = TrainConfig(**TINY)
    root = tmp_path_factory.mktemp("one")
    examples = teacher_examples(model, tokenizer, training_samples(config), config,
                                root / "teacher", progress=False)
    result = train(model, tokenizer, config, root / "run", progress=False, examples=examples)
    return config, root / "teacher", examples, result


def test_two_processes_train_the_wrapper_of_one(smollm, one_process, tmp_path):
    model, tokenizer = smollm.model, smollm.tokenizer
    config, teacher, examples, one = one_process
    run_two("kvp.train", train_flags(tmp_path / "run"))
    # teacher targets: generated once, half by each rank, the same as one process's
    assert sorted(p.name for p in (tmp_path / "teacher").glob("*.pt")) == \
        sorted(p.name for p in teacher.glob("*.pt"))
    for path in teacher.glob("*.pt"):
        mine, theirs = torch.load(path), torch.load(tmp_path / "teacher" / path.name)
        assert torch.equal(mine["answer"], theirs["answer"])
        assert torch.equal(mine["topk_ids"], theirs["topk_ids"])
        torch.testing.assert_close(theirs["topk_logp"], mine["topk_logp"], atol=1e-5, rtol=1e-5)
    two = PacketWrapper.load(tmp_path / "run" / "wrapper.safetensors")
    start = initial_wrapper(model, tokenizer, config)
    assert (one.wrapper.header - start.header).abs().max() > 100 * 1e-4  # training moved it
    assert two.record["world_size"] == 2 and two.record["steps"] == config.total_steps
    torch.testing.assert_close(two.header, one.wrapper.header, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(two.trailer, one.wrapper.trailer, atol=1e-4, rtol=1e-3)
    losses = pd.read_csv(tmp_path / "run" / "loss.csv")
    assert losses.loss.tolist() == pytest.approx([r["loss"] for r in one.losses], rel=1e-4)


def test_checkpoint_of_two_processes_resumes_in_one(smollm, one_process, tmp_path):
    model, tokenizer = smollm.model, smollm.tokenizer
    config, teacher, examples, one = one_process
    (tmp_path / "teacher").symlink_to(teacher, target_is_directory=True)  # reuse the targets
    run = tmp_path / "run"
    argv, env = torchrun_argv("kvp.train", train_flags(run))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.terminate()  # torchrun stops its workers
    proc.wait(timeout=120)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert 1 <= state["step"] < config.total_steps, "the run was not interrupted mid-way"
    resumed = train(model, tokenizer, config, run, progress=False, examples=examples)
    assert [r["step"] for r in resumed.losses] == list(range(1, config.total_steps + 1))
    assert resumed.record["world_size"] == 1
    torch.testing.assert_close(resumed.wrapper.header, one.wrapper.header, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(resumed.wrapper.trailer, one.wrapper.trailer, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_scaling_benchmark_runs_on_cpu(tmp_path):
    spec = ScalingSpec(model="smollm2-135m", train_samples=2, epochs=1, batch_size=2,
                       micro_batch=1, max_new_tokens=4, eval_samples=2, device="cpu")
    table = run_scaling(spec, [2, 1], tmp_path / "scaling.csv", tmp_path / "work")
    assert list(table.world_size) == [1, 2]
    assert pd.read_csv(tmp_path / "scaling.csv").eval_rows_identical.all()
    assert (table.train_sample_passes_per_s > 0).all() and (table.eval_samples_per_s > 0).all()
    assert table.wrapper_max_abs_diff.iloc[1] < 1e-4 and table.train_efficiency.iloc[0] == 1
