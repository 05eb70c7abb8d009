"""Adapter training by self-supervised distillation (docs/method.md#training-objective).

* **Teacher**: the frozen model on the plain joint prompt (preamble + documents + task, full
  attention), decoded greedily; its answer tokens and, at every answer position, the top-k
  log-probabilities of its next-token distribution (full logits of a 49k-152k vocabulary do not
  fit on disk for hundreds of samples; k=256 keeps > 99% of the mass on these tasks). Cached on
  disk keyed by (model, dataset, sample id, generation settings).
* **Student**: one block-mask forward over ``[preamble][wrapped doc 1]…[wrapped doc N]
  [task + teacher tokens]``; only header and trailer receive gradients.
* **Loss**: forward KL(teacher ‖ student) over the top-k support (teacher renormalised on it),
  summed over answer positions; or cross-entropy on the teacher's tokens (``loss="ce"``).
* **Optimiser**: AdamW (weight decay 0), linear decay to 0, gradient accumulation to
  ``batch_size`` samples, seeded; bf16 autocast on CUDA (``autocast=False``: fp32), fp32 on CPU.
* **Checkpoints**: every ``checkpoint_every`` optimiser steps, atomically; ``resume`` continues
  bit-for-bit on CPU because the sample order of each epoch depends only on (seed, epoch).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

import kvp
from kvp.blockmask import block_forward
from kvp.data import Sample, load_dataset, seeded_rng
from kvp.data.prompts import build_segments, dataset_of, generation_config, segment_ids
from kvp.generate import greedy_decode, prefill
from kvp.packet import PacketWrapper
from kvp.results import atomic_path
from transformers import DynamicCache


@dataclass
class TrainConfig:
    """Hyper-parameters of one adapter training run (defaults: a short CPU demonstration)."""

    model: str = "smollm2-135m"
    dataset: str = "biography"
    n_samples: int = 64
    num_docs: tuple[int, ...] = (2, 3, 5, 7)
    dataset_options: dict = field(default_factory=dict)
    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 16
    h: int = 8
    t: int = 8
    loss: str = "kl"
    max_new_tokens: int = 32
    top_k: int = 256
    seed: int = 0
    data_seed: int = 0
    checkpoint_every: int = 5
    gradient_checkpointing: bool = False
    autocast: bool = True  # bf16 autocast on CUDA (CPU always trains in fp32)

    def __post_init__(self):
        self.num_docs = tuple(self.num_docs)
        if self.loss not in ("kl", "ce"):
            raise ValueError(f"loss={self.loss!r}: use 'kl' (forward KL, the paper's default) or 'ce'")
        if self.n_samples < self.batch_size:
            raise ValueError(f"n_samples={self.n_samples} is smaller than batch_size="
                             f"{self.batch_size}: lower batch_size or use more samples")
        if min(self.epochs, self.batch_size, self.max_new_tokens, self.top_k) < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size, max_new_tokens and top_k must be >= 1 and lr > 0")
        if self.h < 0 or self.t < 0 or self.h + self.t == 0:
            raise ValueError(f"h={self.h}, t={self.t}: a wrapper needs at least one token")

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_docs"] = list(self.num_docs)
        return d


# --------------------------------------------------------------------------- data
def training_samples(config: TrainConfig) -> list[Sample]:
    """Train-split samples; document counts cycle through ``num_docs`` so no single layout is learnt.

    Biography gets ``n_samples / len(num_docs)`` samples per document count (test people never
    appear: the generator splits people by name). Other datasets pass ``dataset_options`` through.
    The samples depend on ``data_seed`` only, so runs of several training seeds share them (and
    their cached teacher targets).
    """
    if config.dataset == "biography":
        per = [config.n_samples // len(config.num_docs)] * len(config.num_docs)
        per[0] += config.n_samples - sum(per)
        samples = []
        for k, n in zip(config.num_docs, per):
            samples += load_dataset("biography", "train", n=n, seed=config.data_seed + 1000 * k,
                                    num_docs=k, **config.dataset_options)
        return samples
    return load_dataset(config.dataset, "train", n=config.n_samples, seed=config.data_seed,
                        **config.dataset_options)


# --------------------------------------------------------------------------- teacher
@dataclass
class Example:
    """One training example as token ids plus the teacher's answer and distribution.

    preamble (P,), docs [(n_i,)], task (T,), answer (A,) teacher tokens; topk_ids / topk_logp
    (A + 1, k): teacher top-k next-token log-probs at the A + 1 positions that predict the
    answer tokens and what follows them (end of turn).
    """

    preamble: torch.Tensor
    docs: list[torch.Tensor]
    task: torch.Tensor
    answer: torch.Tensor
    topk_ids: torch.Tensor
    topk_logp: torch.Tensor


def _teacher_key(model_name: str, sample: Sample, config: TrainConfig) -> str:
    payload = json.dumps([model_name, dataset_of(sample, None), sample.id, sample.documents,
                          sample.question, config.max_new_tokens, config.top_k], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@torch.no_grad()
def teacher_example(model, tokenizer, sample: Sample, config: TrainConfig) -> Example:
    """Greedy teacher answer on the joint prompt, then one teacher-forced pass for its top-k."""
    pre_ids, doc_ids, task_ids = segment_ids(tokenizer, build_segments(tokenizer, sample))
    pre, task = torch.tensor(pre_ids), torch.tensor(task_ids)
    docs = [torch.tensor(d) for d in doc_ids]
    joint = torch.cat([pre, *docs, task])  # (S,)
    cache = DynamicCache()
    first = prefill(model, cache, joint, 0)
    gen = generation_config(tokenizer, dataset_of(sample, None), config.max_new_tokens)
    _, tokens = greedy_decode(model, tokenizer, cache, first, len(joint), gen)
    answer = torch.tensor(tokens, dtype=torch.long)
    full = torch.cat([joint, answer])[None].to(model.device)
    logits = model(full, logits_to_keep=len(answer) + 1).logits[0].float()  # (A + 1, V)
    logp = logits.log_softmax(-1)
    top = logp.topk(config.top_k, dim=-1)
    return Example(pre, docs, task, answer, top.indices.cpu(), top.values.cpu())


def teacher_examples(model, tokenizer, samples: list[Sample], config: TrainConfig,
                     cache_dir: Path | None, progress: bool = True) -> list[Example]:
    """Teacher examples for every sample, read from / written to ``cache_dir`` when given."""
    out = []
    for sample in tqdm(samples, desc="teacher", disable=not progress):
        path = cache_dir / f"{_teacher_key(config.model, sample, config)}.pt" if cache_dir else None
        if path is not None and path.exists():
            out.append(Example(**torch.load(path)))
            continue
        example = teacher_example(model, tokenizer, sample, config)
        if path is not None:
            with atomic_path(path) as tmp:  # unique temp name: processes may share the cache
                torch.save(example.__dict__, tmp)
        out.append(example)
    return out


# --------------------------------------------------------------------------- student and loss
def distillation_loss(model, wrapper: PacketWrapper, ex: Example, loss: str) -> torch.Tensor:
    """Loss of one example: KL(teacher ‖ student) on the top-k support, or CE on teacher tokens,
    summed over the A + 1 answer positions."""
    final = torch.cat([ex.task, ex.answer])  # task prompt + teacher tokens
    logits, _, _ = block_forward(model, ex.preamble, ex.docs, final, wrapper)
    student = logits[-(len(ex.answer) + 1):].float().log_softmax(-1)  # (A + 1, V)
    if loss == "ce":
        targets = ex.topk_ids[:, 0].to(student.device)  # the teacher's greedy tokens (+ its stop)
        return -student.gather(-1, targets[:, None]).sum()
    t_logp = ex.topk_logp.to(student.device)
    t_logp = t_logp - t_logp.logsumexp(-1, keepdim=True)  # renormalise on the top-k support
    s_logp = student.gather(-1, ex.topk_ids.to(student.device))
    return (t_logp.exp() * (t_logp - s_logp)).sum()


@torch.no_grad()
def mean_loss(model, wrapper: PacketWrapper, examples: list[Example], loss: str = "kl") -> float:
    """Average per-example loss of ``wrapper`` over ``examples`` (no gradients)."""
    return sum(distillation_loss(model, wrapper, ex, loss).item() for ex in examples) / len(examples)


# --------------------------------------------------------------------------- checkpoints
def config_differences(saved: dict, current: dict) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def git_commit() -> str:
    """HEAD of the checkout, or ``KVP_GIT_COMMIT`` for a copy without ``.git`` (e.g. a GPU box)."""
    if os.environ.get("KVP_GIT_COMMIT"):
        return os.environ["KVP_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------- loop
@dataclass
class TrainResult:
    wrapper: PacketWrapper
    losses: list[dict]
    record: dict


def train(model, tokenizer, config: TrainConfig, out_dir: str | Path, progress: bool = True,
          examples: list[Example] | None = None, plot: bool = True) -> TrainResult:
    """Train a wrapper; writes ``out_dir``/{checkpoint.pt, loss.csv, loss.png/pdf, wrapper.safetensors}.

    ``plot=False`` skips the loss figure (for machines without the plotting stack; draw it later
    with ``plot_loss``).
    Resumes from ``out_dir/checkpoint.pt`` when present (its config must match). Teacher targets
    are cached in ``out_dir/../teacher`` unless ``examples`` are given. Stops with the step number
    on a NaN loss, leaving the last good checkpoint intact. The base model stays frozen.
    """
    out_dir = Path(out_dir)
    device = model.device
    if examples is None:
        samples = training_samples(config)
        if len(samples) < config.batch_size:
            raise ValueError(f"dataset gave {len(samples)} samples, fewer than batch_size "
                             f"{config.batch_size}")
        examples = teacher_examples(model, tokenizer, samples, config,
                                    out_dir.parent / "teacher", progress)
    torch.manual_seed(config.seed)
    wrapper = PacketWrapper.init_from_embeddings(model, config.h, config.t, config.seed,
                                                 model_name=config.model)
    wrapper.float().to(device)
    opt = torch.optim.AdamW(wrapper.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / config.total_steps)
    model.requires_grad_(False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.train()  # checkpointing is active in train mode only; these models have no dropout
    step, losses, started = 0, [], time.time()
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        diff = config_differences(state["config"], config.to_dict())
        if diff:
            raise ValueError(f"checkpoint {ckpt} was made with another config ({'; '.join(diff)}); "
                             "use another out_dir or the same config")
        wrapper.load_state_dict(state["wrapper"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, losses = state["step"], state["losses"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=config.autocast and device.type == "cuda")
    bar = tqdm(total=config.total_steps, initial=step, desc="train", disable=not progress)
    try:
        while step < config.total_steps:
            epoch, k = divmod(step, config.steps_per_epoch)
            order = list(range(len(examples)))
            seeded_rng("train-order", config.seed, epoch).shuffle(order)
            batch = order[k * config.batch_size:(k + 1) * config.batch_size]
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for i in batch:
                with autocast:
                    loss = distillation_loss(model, wrapper, examples[i], config.loss) / len(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}; the last "
                                             f"good checkpoint ({ckpt}) is intact — lower lr")
                loss.backward()
                total += loss.item()
            opt.step()
            if not all(torch.isfinite(p).all() for p in wrapper.parameters()):
                raise FloatingPointError(f"the wrapper became non-finite at step {step + 1}; the "
                                         f"last good checkpoint ({ckpt}) is intact — lower lr")
            sched.step()
            step += 1
            losses.append({"step": step, "epoch": epoch, "loss": total,
                           "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            bar.update()
            if step % config.checkpoint_every == 0 or step == config.total_steps:
                save_checkpoint(ckpt, {"config": config.to_dict(), "wrapper": wrapper.state_dict(),
                                       "optimizer": opt.state_dict(),
                                       "scheduler": sched.state_dict(), "step": step,
                                       "losses": losses})
    finally:
        bar.close()
        if config.gradient_checkpointing:
            model.gradient_checkpointing_disable()
            model.eval()
    record = {"config": config.to_dict(), "steps": step, "final_loss": losses[-1]["loss"],
              "kvp_version": kvp.__version__, "git_commit": git_commit(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "wall_s": round(time.time() - started, 1), "n_examples": len(examples)}
    wrapper.record = record
    wrapper.model_name = config.model
    wrapper.save(out_dir / "wrapper.safetensors")
    write_loss_csv(out_dir / "loss.csv", losses)
    if plot:
        plot_loss(out_dir, title=f"{config.model} · {config.dataset} · seed {config.seed}")
    return TrainResult(wrapper, losses, record)


def plot_loss(out_dir: Path, title: str) -> None:
    """Loss curve of ``out_dir``/loss.csv (per optimiser step) as loss.png and loss.pdf."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from kvp.plots import save_fig, set_theme

    losses = pd.read_csv(Path(out_dir) / "loss.csv")
    set_theme()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses["step"], losses["loss"], color="#9ecae1", lw=1, label="per step")
    epochs = losses.groupby("epoch").agg(step=("step", "max"), loss=("loss", "mean"))
    ax.plot(epochs["step"], epochs["loss"], color="#08519c", marker="o", ms=3, label="epoch mean")
    ax.set(xlabel="optimiser step", ylabel="loss per sample", title=title)
    ax.legend(frameon=False)
    save_fig(fig, "loss", fig_dir=out_dir)
    plt.close(fig)


def write_loss_csv(path: Path, losses: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "epoch", "loss", "lr"])
        writer.writeheader()
        writer.writerows(losses)
    os.replace(tmp, path)


def config_from_dict(d: dict) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown training options {sorted(unknown)}; allowed: {sorted(names)}")
    return TrainConfig(**d)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvp.train --out DIR [--model M] [--dataset D] [--epochs N] …``"""
    import argparse

    from kvp.models import load_model

    parser = argparse.ArgumentParser(description="Train a KV Packet wrapper by distillation.")
    parser.add_argument("--out", required=True, help="output directory of the run")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-plot", action="store_true", help="skip the loss figure")
    for f in fields(TrainConfig):
        if f.name in ("dataset_options", "num_docs"):
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    parser.add_argument("--num-docs", type=int, nargs="+", default=[2, 3, 5, 7])
    parser.add_argument("--dataset-options", type=json.loads, default={},
                        help='JSON, e.g. \'{"context_tokens": 1024}\'')
    args = vars(parser.parse_args(argv))
    out, device, no_plot = args.pop("out"), args.pop("device"), args.pop("no_plot")
    config = config_from_dict(args)
    model, tokenizer, spec = load_model(config.model, device=device,
                                        dtype="float32")  # fp32 master weights; bf16 autocast on CUDA
    spec.require_trained()
    result = train(model, tokenizer, config, out, plot=not no_plot)
    print(json.dumps(result.record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
