"""Data-parallel scaling benchmark: training and evaluation throughput at 1..N processes.

For each world size W, ``run`` launches ``torchrun --standalone --nproc-per-node W -m kvp.scaling
worker`` (:func:`kvp.distributed.torchrun_command`, NVLink multicast off); each worker, one per GPU
(or CPU process on gloo):

1. loads the model in fp32 (as adapters train and are evaluated);
2. reads the teacher targets of ``train_samples`` training samples from ``WORK/teacher`` (the first
   world size generates them, sharded over its ranks; untimed);
3. trains the dataset's recipe shape (:func:`kvp.adapters.recipe`: batch, micro-batch, learning
   rate, precision; no validation) for ``epochs`` epochs, timed between two barriers: **train
   sample passes/s** = ``epochs × train_samples / seconds`` (a pass: one sample's forward and
   backward);
4. evaluates ``full_recompute``, ``no_recompute`` and ``kv_packet`` (the shipped adapter) on
   ``eval_samples`` test samples, sharded by sample, timed the same way: **evaluation samples/s**
   (every method on a sample counts as one sample).

``run`` then writes one CSV row per world size with both throughputs, speedup and scaling
efficiency (speedup / W, relative to the smallest world size measured) and whether the results
are those of the smallest world size: identical evaluation rows (timings aside) and the trained
wrapper's largest difference.

CLI::

    python -m kvp.scaling run --world-sizes 1 2 4 8 --model qwen2.5-coder-0.5b \
        --out data/benchmarks/scaling_nvidia-h200.csv
    python -m kvp.scaling run --world-sizes 1 2 --device cpu --train-samples 4 --batch-size 4 \
        --micro-batch 1 --epochs 1 --eval-samples 4 --max-new-tokens 8 --out results/scaling.csv
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

import kvp
from kvp import distributed
from kvp.adapters import SHIFTS, load_adapter, recipe
from kvp.data import load_dataset
from kvp.evaluate import EvalSettings, evaluate
from kvp.methods import get_method
from kvp.models import load_model
from kvp.packet import PacketStore, PacketWrapper
from kvp.results import atomic_path
from kvp.results import git_commit
from kvp.train import TrainConfig, teacher_examples, train, training_samples

TIMING = ["ttft_ms", "preamble_ms"]  # wall-clock columns of evaluation rows
METHODS = ("full_recompute", "no_recompute", "kv_packet")


@dataclass
class ScalingSpec:
    """What every world size measures (``None``: the recipe's value; ``max_new_tokens`` also
    bounds evaluation answers, whose default is the dataset's)."""

    model: str = "qwen2.5-coder-0.5b"
    dataset: str = "biography"
    train_samples: int = 128
    epochs: int = 2
    batch_size: int | None = None
    micro_batch: int | None = None
    max_new_tokens: int | None = None
    eval_samples: int = 64
    device: str | None = None  # default: CUDA when present

    def train_config(self):
        """The recipe of (model, dataset) resized to this benchmark (no validation split)."""
        base = recipe(self.model, self.dataset).to_dict()
        changes = {"n_samples": self.train_samples, "epochs": self.epochs, "n_val": 0,
                   "checkpoint_every": 10**9}
        for key in ("batch_size", "micro_batch", "max_new_tokens"):
            if getattr(self, key) is not None:
                changes[key] = getattr(self, key)
        return TrainConfig(**{**base, **changes})


def timed(fn):
    """(result of ``fn()``, seconds from the slowest rank's start to its end): barriers around."""
    distributed.barrier()
    start = time.perf_counter()
    result = fn()
    distributed.barrier()
    return result, time.perf_counter() - start


def worker(work: Path) -> None:
    """One rank of one world size: measure as the module docstring says; rank 0 writes
    ``WORK/w<W>/{measure.json, rows.csv, train/}``."""
    spec = ScalingSpec(**json.loads((work / "spec.json").read_text()))
    config = spec.train_config()
    world = distributed.world_size()
    out = work / f"w{world}"
    model, tokenizer, model_spec = load_model(spec.model, device=spec.device, dtype="float32")
    model_spec.require_trained()
    examples = teacher_examples(model, tokenizer, training_samples(config), config,
                               work / "teacher")
    trained, train_s = timed(lambda: train(model, tokenizer, config, out / "train",
                                           examples=examples))
    samples = load_dataset(spec.dataset, "test", n=spec.eval_samples, seed=42,
                           **SHIFTS[spec.dataset]["none"])
    store = PacketStore(model, tokenizer, spec.model, max_in_memory=64)
    settings = EvalSettings(spec.model, max_new_tokens=spec.max_new_tokens)
    wrapper = load_adapter(spec.model, spec.dataset)
    rows, eval_s = timed(lambda: evaluate(model, tokenizer, samples,
                                          [get_method(m) for m in METHODS], settings,
                                          wrapper=wrapper, store=store))
    if not distributed.is_main():
        return
    device = model.device
    with atomic_path(out / "rows.csv") as tmp:
        rows.to_csv(tmp, index=False)
    measure = {
        "world_size": world, "backend": distributed.backend() if distributed.active() else "none",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "train_samples": config.n_samples, "epochs": config.epochs,
        "batch_size": config.batch_size, "micro_batch": config.micro_batch,
        "max_new_tokens": config.max_new_tokens, "train_steps": trained.record["steps"],
        "train_s": train_s, "eval_samples": len(samples), "eval_methods": " ".join(METHODS),
        "eval_s": eval_s}
    with atomic_path(out / "measure.json") as tmp:
        tmp.write_text(json.dumps(measure, indent=1) + "\n")


def launch(work: Path, world: int, device: str | None) -> dict:
    """Run the workers of world size ``world`` (fresh ``WORK/w<W>``); their measurements."""
    shutil.rmtree(work / f"w{world}", ignore_errors=True)
    argv, env = distributed.torchrun_command(world, "kvp.scaling", ["worker", "--work", str(work)])
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1)
                                                                      // world))
    subprocess.run(argv, env=env, check=True)
    return json.loads((work / f"w{world}" / "measure.json").read_text())


def identical_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Same evaluation rows, timings aside."""
    return a.drop(columns=TIMING).equals(b.drop(columns=TIMING))


def run(spec: ScalingSpec, world_sizes: list[int], out: Path, work: Path) -> pd.DataFrame:
    """Measure every world size (smallest first) and write the CSV ``out``; returns its table."""
    if not world_sizes or min(world_sizes) < 1:
        raise ValueError(f"world sizes {world_sizes}: give one or more process counts >= 1")
    if spec.device != "cpu" and torch.cuda.is_available() \
            and max(world_sizes) > torch.cuda.device_count():
        raise ValueError(f"world size {max(world_sizes)} exceeds the {torch.cuda.device_count()} "
                         "visible GPUs; drop it from --world-sizes")
    spec.train_config()  # a bad recipe, size or missing adapter fails here, not in every worker
    load_adapter(spec.model, spec.dataset)
    work.mkdir(parents=True, exist_ok=True)
    with atomic_path(work / "spec.json") as tmp:
        tmp.write_text(json.dumps(asdict(spec), indent=1) + "\n")
    world_sizes = sorted(set(world_sizes))
    table = [launch(work, world, spec.device) for world in world_sizes]
    first = world_sizes[0]
    rows0 = pd.read_csv(work / f"w{first}" / "rows.csv")
    wrapper0 = PacketWrapper.load(work / f"w{first}" / "train" / "wrapper.safetensors")
    for m in table:
        m["train_sample_passes_per_s"] = m["epochs"] * m["train_samples"] / m["train_s"]
        m["eval_samples_per_s"] = m["eval_samples"] / m["eval_s"]
    for m in table:
        w = m["world_size"]
        for kind, key in (("train", "train_sample_passes_per_s"), ("eval", "eval_samples_per_s")):
            m[f"{kind}_speedup"] = m[key] / table[0][key]
            m[f"{kind}_efficiency"] = m[f"{kind}_speedup"] / (w / first)
        wrapper = PacketWrapper.load(work / f"w{w}" / "train" / "wrapper.safetensors")
        m["wrapper_max_abs_diff"] = max((wrapper.header - wrapper0.header).abs().max().item(),
                                        (wrapper.trailer - wrapper0.trailer).abs().max().item())
        m["eval_rows_identical"] = identical_rows(pd.read_csv(work / f"w{w}" / "rows.csv"), rows0)
        m.update(model=spec.model, dataset=spec.dataset, reference_world_size=first,
                 nccl_nvls_enable=distributed.NCCL_ENV["NCCL_NVLS_ENABLE"],
                 torch=torch.__version__, kvp_version=kvp.__version__, git_commit=git_commit(),
                 date=dt.date.today().isoformat())
    frame = pd.DataFrame(table)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.4g")
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvp.scaling",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="measure every world size and write a CSV")
    defaults = ScalingSpec()
    r.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2],
                   help="process counts (one GPU each)")
    r.add_argument("--model", default=defaults.model, help="registry name with a shipped adapter")
    r.add_argument("--dataset", default=defaults.dataset, help="biography or niah")
    r.add_argument("--train-samples", type=int, default=defaults.train_samples)
    r.add_argument("--epochs", type=int, default=defaults.epochs)
    r.add_argument("--batch-size", type=int, default=None, help="global batch (default: recipe)")
    r.add_argument("--micro-batch", type=int, default=None, help="default: the recipe's")
    r.add_argument("--max-new-tokens", type=int, default=None,
                   help="teacher and answer budget (default: the recipe's / the dataset's)")
    r.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    r.add_argument("--device", default=None, help="cpu for a gloo run (default: CUDA if present)")
    r.add_argument("--out", type=Path, required=True, help="CSV to write")
    r.add_argument("--work", type=Path, default=Path("results") / "scaling",
                   help="working directory (teacher cache, per-world-size outputs)")
    w = sub.add_parser("worker", help="one rank (launched by run through torchrun)")
    w.add_argument("--work", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "worker":
        worker(args.work)
        return 0
    spec = ScalingSpec(model=args.model, dataset=args.dataset, train_samples=args.train_samples,
                       epochs=args.epochs, batch_size=args.batch_size,
                       micro_batch=args.micro_batch, max_new_tokens=args.max_new_tokens,
                       eval_samples=args.eval_samples, device=args.device)
    try:
        frame = run(spec, args.world_sizes, args.out, args.work)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(frame[["world_size", "train_sample_passes_per_s", "train_efficiency",
                 "eval_samples_per_s", "eval_efficiency", "wrapper_max_abs_diff",
                 "eval_rows_identical"]].to_string(index=False))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    with distributed.process_group():  # the workers join torchrun's group; run has none
        raise SystemExit(main())
