"""Data parallelism on ``torch.distributed``: evaluation and training across processes.

Launched by ``torchrun`` (one process per GPU, or several CPU processes on the gloo backend), the
command-line entry points (``python -m kvp.evaluate``, ``python -m kvp.adapters``, ``python -m
kvp.train``) run inside :func:`process_group`, which joins the process group torchrun describes
in its environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``…) and is a
no-op when they are absent: without torchrun everything runs as one process, exactly as before.

* **Sharding** is by sample index (:func:`shard`): rank ``r`` of ``W`` takes samples ``r, r + W,
  r + 2W, …``, so the split depends only on the sample count and world size.
* **Evaluation** gathers each rank's rows once, at the end (:func:`gather_by_index`), into the
  one-process order; every rank gets the merged rows and rank 0 writes them.
* **Training** keeps one wrapper replica per rank; each optimiser step, every rank computes the
  gradient of its share of the batch (divided by the *global* batch size) and
  :func:`all_reduce_gradients` sums the header and trailer gradients, so every replica takes the
  same step as one process with the whole batch.

The backend is ``cpu:gloo,cuda:nccl`` when CUDA is present (gradients of CUDA wrappers go through
NCCL, objects and barriers through gloo) and ``gloo`` otherwise. NCCL's NVLink multicast (NVLS)
is kept off: :data:`NCCL_ENV` is set (unless already set) before the process group starts and in
the environment of every process :func:`torchrun_command` launches.
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import Any, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}  # NVLink multicast off on every multi-GPU machine we start
TIMEOUT = timedelta(hours=1)  # a rank may wait this long at a barrier (teacher shards, row gather)


def launched() -> bool:
    """Whether this process was started by torchrun (its rendezvous variables are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """Whether a process group is initialised (by :func:`init` or by the caller)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the group; 1 without one."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank; 0 without a group."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the process that writes files and shows progress bars."""
    return rank() == 0


def backend() -> str:
    """``cpu:gloo,cuda:nccl`` when CUDA is present, else ``gloo``."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init(timeout: timedelta = TIMEOUT) -> bool:
    """Join torchrun's process group (CUDA device ``LOCAL_RANK`` when CUDA is present); returns
    whether a group is active. Does nothing outside torchrun or when a group already exists."""
    if active() or not launched():
        return active()
    for key, value in NCCL_ENV.items():
        os.environ.setdefault(key, value)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA "
                               "devices are visible; use --nproc-per-node <= the GPU count")
        torch.cuda.set_device(local)
    dist.init_process_group(backend(), timeout=timeout)
    return True


@contextlib.contextmanager
def process_group(timeout: timedelta = TIMEOUT) -> Iterator[bool]:
    """:func:`init` for the block (yields whether distributed), destroyed afterwards if it
    started the group."""
    started = not active() and init(timeout)
    try:
        yield active()
    finally:
        if started:
            dist.destroy_process_group()


def shard(n: int) -> list[int]:
    """Indices of ``n`` items this rank handles: ``rank, rank + W, …`` (all of them alone)."""
    return list(range(rank(), n, world_size()))


def barrier() -> None:
    """Wait for every rank (nothing to wait for alone)."""
    if world_size() > 1:
        dist.barrier()


def gather_by_index(indices: list[int], items: list[T]) -> list[T]:
    """Every rank's ``items`` merged on every rank, ordered by their ``indices`` (stable: items of
    one index stay in their rank's order). Alone, ``items`` sorted the same way."""
    if len(indices) != len(items):
        raise ValueError(f"{len(indices)} indices for {len(items)} items: give one index per item")
    pairs = list(zip(indices, items))
    if world_size() > 1:
        everyone: list[Any] = [None] * world_size()
        dist.all_gather_object(everyone, pairs)
        pairs = [pair for part in everyone for pair in part]
    return [item for _, item in sorted(pairs, key=lambda pair: pair[0])]


def all_reduce_gradients(params: Iterable[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over ranks, in place, in one flat all-reduce (a rank
    without a gradient, e.g. with no sample in this step, contributes zeros)."""
    if world_size() == 1:
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # (sum of numel,)
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over ranks (float64, on the CPU); ``values`` alone."""
    if world_size() == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def torchrun_command(nproc: int, module: str, args: list[str]) -> tuple[list[str], dict]:
    """(argv, environment) that run ``python -m module args`` in ``nproc`` processes with this
    interpreter's torchrun on one machine (``--standalone``: a free rendezvous port is picked),
    with :data:`NCCL_ENV` set."""
    if nproc < 1:
        raise ValueError(f"nproc={nproc}: use at least one process")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", module, *args]
    env = {**os.environ}
    for key, value in NCCL_ENV.items():
        env.setdefault(key, value)
    return argv, env
