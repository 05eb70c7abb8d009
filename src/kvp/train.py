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
* **Several processes** (torchrun, :mod:`kvp.distributed`): each rank generates its shard of the
  teacher targets into the shared cache, then reads them all; each step, a rank computes the
  gradient of its share of the batch and the header and trailer gradients are summed over ranks,
  so W ranks train the wrapper of one process with the same ``batch_size`` (to float tolerance).
  Rank 0 writes checkpoints and outputs; a checkpoint resumes at any world size.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

import kvp
from kvp import distributed
from kvp.blockmask import block_forward_batch
from kvp.data import Sample, load_dataset, seeded_rng
from kvp.data.prompts import build_segments, dataset_of, generation_config, segment_ids
from kvp.generate import greedy_decode, prefill
from kvp.models import load_model
from kvp.packet import PacketWrapper
from kvp.results import atomic_path, git_commit
from transformers import DynamicCache


INITS = ("normal", "tokens")
LR_SCALES = ("absolute", "embed_std")


@dataclass
class TrainConfig:
    """Hyper-parameters of one adapter training run (defaults: a short CPU demonstration).

    ``lr`` is absolute, or (``lr_scale="embed_std"``) in units of the embedding matrix's standard
    deviation, which differs 8x between the embedded models. ``micro_batch`` samples share one
    padded forward (the gradient is the same as one at a time). With ``n_val`` > 0, validation
    samples of the ``val`` split are scored every ``eval_every`` steps (0: once per epoch) and the
    wrapper with the lowest validation loss is the one saved. ``init="tokens"`` starts header and
    trailer from real token embeddings (:func:`token_init_ids`) instead of Normal(mean, std).
    ``tf32`` allows TF32 matrix products when training in fp32 on CUDA.
    """

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
    micro_batch: int = 1
    n_val: int = 0
    eval_every: int = 0
    init: str = "normal"
    lr_scale: str = "absolute"
    tf32: bool = False

    def __post_init__(self):
        self.num_docs = tuple(self.num_docs)
        if self.loss not in ("kl", "ce"):
            raise ValueError(f"loss={self.loss!r}: use 'kl' (forward KL, the paper's default) or 'ce'")
        if self.n_samples < self.batch_size:
            raise ValueError(f"n_samples={self.n_samples} is smaller than batch_size="
                             f"{self.batch_size}: lower batch_size or use more samples")
        if min(self.epochs, self.batch_size, self.max_new_tokens, self.top_k,
               self.micro_batch) < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size, micro_batch, max_new_tokens and top_k must be "
                             ">= 1 and lr > 0")
        if self.h < 0 or self.t < 0 or self.h + self.t == 0:
            raise ValueError(f"h={self.h}, t={self.t}: a wrapper needs at least one token")
        if self.n_val < 0 or self.eval_every < 0:
            raise ValueError(f"n_val={self.n_val}, eval_every={self.eval_every}: must be >= 0")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: use one of {list(INITS)}")
        if self.lr_scale not in LR_SCALES:
            raise ValueError(f"lr_scale={self.lr_scale!r}: use one of {list(LR_SCALES)}")

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def validation_steps(self) -> int:
        """Optimiser steps between validation passes."""
        return self.eval_every or self.steps_per_epoch

    @property
    def title(self) -> str:
        """How figures name the run: ``"smollm2-135m · biography · seed 0"``."""
        return f"{self.model} · {self.dataset} · seed {self.seed}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_docs"] = list(self.num_docs)
        return d


# --------------------------------------------------------------------------- data
def training_samples(config: TrainConfig, split: str = "train") -> list[Sample]:
    """Samples of ``split``: ``n_samples`` train samples, or ``n_val`` validation samples.

    Biography gets ``n / len(num_docs)`` samples per document count (validation and test people
    never appear in training: the generator splits people by name). Other datasets pass
    ``dataset_options`` through. The samples depend on ``data_seed`` only, so runs of several
    training seeds share them (and their cached teacher targets).
    """
    n = config.n_val if split == "val" else config.n_samples
    if config.dataset == "biography":
        per = [n // len(config.num_docs)] * len(config.num_docs)
        per[0] += n - sum(per)
        samples = []
        for k, count in zip(config.num_docs, per):
            samples += load_dataset("biography", split, n=count, seed=config.data_seed + 1000 * k,
                                    num_docs=k, **config.dataset_options)
        return samples
    return load_dataset(config.dataset, split, n=n, seed=config.data_seed,
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

    @property
    def length(self) -> int:
        """Tokens of the student's sequence without the wrapper."""
        return (len(self.preamble) + sum(map(len, self.docs)) + len(self.task)
                + len(self.answer))


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
    """Teacher examples for every sample, read from / written to ``cache_dir`` when given.

    Under torchrun with a ``cache_dir`` (shared by the ranks), each rank first generates the
    missing examples of its shard of ``samples``; after a barrier, every rank reads them all.
    """
    def path_of(sample: Sample) -> Path | None:
        return cache_dir / f"{_teacher_key(config.model, sample, config)}.pt" if cache_dir else None

    def generate(sample: Sample) -> Example:
        example = teacher_example(model, tokenizer, sample, config)
        if cache_dir is not None:
            with atomic_path(path_of(sample)) as tmp:  # unique temp name: ranks share the cache
                torch.save(example.__dict__, tmp)
        return example

    progress = progress and distributed.is_main()
    if cache_dir is not None and distributed.world_size() > 1:
        mine = [samples[i] for i in distributed.shard(len(samples))]
        for sample in tqdm([s for s in mine if not path_of(s).exists()], desc="teacher shard",
                           disable=not progress):
            generate(sample)
        distributed.barrier()
    out = []
    for sample in tqdm(samples, desc="teacher", disable=not progress):
        path = path_of(sample)
        out.append(Example(**torch.load(path)) if path is not None and path.exists()
                   else generate(sample))
    return out


def teacher_mass(examples: list[Example]) -> float:
    """Mean probability mass of the teacher's top-k at the answer positions (how much of the full
    distribution the top-k KL sees)."""
    mass = [ex.topk_logp.logsumexp(-1).exp().mean().item() for ex in examples]
    return sum(mass) / max(len(mass), 1)


def teacher_truncated(examples: list[Example], config: TrainConfig) -> float:
    """Fraction of teacher answers that ran into ``max_new_tokens`` (no end of turn in budget)."""
    return sum(len(ex.answer) >= config.max_new_tokens for ex in examples) / max(len(examples), 1)


# --------------------------------------------------------------------------- student and loss
def position_losses(student: torch.Tensor, ex: Example, loss: str) -> torch.Tensor:
    """Per-position loss (A + 1,) of the student's log-probs ``student`` (A + 1, V) at the answer
    positions: KL(teacher ‖ student) on the teacher's top-k support (teacher renormalised on it),
    or cross-entropy on the teacher's greedy tokens (its answer and its stop)."""
    if loss == "ce":
        targets = ex.topk_ids[:, 0].to(student.device)
        return -student.gather(-1, targets[:, None])[:, 0]
    t_logp = ex.topk_logp.to(student.device)
    t_logp = t_logp - t_logp.logsumexp(-1, keepdim=True)  # renormalise on the top-k support
    s_logp = student.gather(-1, ex.topk_ids.to(student.device))
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def batch_losses(model, wrapper: PacketWrapper, examples: list[Example], loss: str
                 ) -> list[torch.Tensor]:
    """Per-position losses [(A_i + 1,)] of each example, from one padded block-mask forward over
    ``[preamble][wrapped docs][task + teacher tokens]``; sum one for the example's loss."""
    lengths = [len(ex.answer) + 1 for ex in examples]
    items = [(ex.preamble, ex.docs, torch.cat([ex.task, ex.answer])) for ex in examples]
    logits = block_forward_batch(model, items, wrapper, keep=max(lengths))  # (B, keep, V)
    return [position_losses(row[-n:].float().log_softmax(-1), ex, loss)
            for row, n, ex in zip(logits, lengths, examples)]


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def validation_loss(model, wrapper: PacketWrapper, examples: list[Example], loss: str = "kl",
                    micro_batch: int = 1) -> dict[str, float]:
    """Mean per-example loss of ``wrapper`` over ``examples`` (``loss``) and its share at the
    first answer token (``first``, where the model picks the entity); no gradients. Under torchrun
    each rank scores its shard of ``examples`` and the sums are all-reduced."""
    total = first = 0.0
    mine = [examples[i] for i in distributed.shard(len(examples))]
    for part in chunks(mine, micro_batch):
        for per_position in batch_losses(model, wrapper, part, loss):
            total += per_position.sum().item()
            first += per_position[0].item()
    total, first = distributed.all_reduce_sum([total, first])
    return {"loss": total / len(examples), "first": first / len(examples)}


def mean_loss(model, wrapper: PacketWrapper, examples: list[Example], loss: str = "kl") -> float:
    """Average per-example loss of ``wrapper`` over ``examples`` (no gradients)."""
    return validation_loss(model, wrapper, examples, loss)["loss"]


# --------------------------------------------------------------------------- checkpoints
def config_differences(saved: dict, current: dict) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# --------------------------------------------------------------------------- loop
@dataclass
class TrainResult:
    wrapper: PacketWrapper
    losses: list[dict]
    record: dict


def token_init_ids(tokenizer, n: int, part: str) -> list[int]:
    """``n`` token ids whose embeddings start a ``"header"`` (start of text, "Document", ":",
    newline) or a ``"trailer"`` (".", newline, end of text), cycled to length ``n``."""
    special = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pieces = ["Document", ":", "\n"] if part == "header" else [".", "\n"]
    ids = [i for piece in pieces for i in tokenizer.encode(piece, add_special_tokens=False)]
    ids = [special, *ids] if part == "header" else [*ids, tokenizer.eos_token_id]
    return [ids[i % len(ids)] for i in range(n)]


def initial_wrapper(model, tokenizer, config: TrainConfig) -> PacketWrapper:
    """The wrapper training starts from: Normal(mean, std) of the embedding matrix, or
    (``init="tokens"``) real token embeddings plus seeded noise of 0.1 std, so seeds differ."""
    wrapper = PacketWrapper.init_from_embeddings(model, config.h, config.t, config.seed,
                                                 model_name=config.model)
    if config.init == "tokens":
        weight = model.get_input_embeddings().weight.detach().float()
        noise_scale = 0.1 * weight.std().item()
        for param, part in ((wrapper.header, "header"), (wrapper.trailer, "trailer")):
            ids = torch.tensor(token_init_ids(tokenizer, len(param), part), device=weight.device)
            noise = (param.detach().float() - weight.mean()) / weight.std()  # seeded N(0, 1)
            param.data = weight[ids] + noise_scale * noise
    return wrapper.float().to(model.device)


def learning_rate(model, config: TrainConfig) -> float:
    """The absolute learning rate: ``lr``, or ``lr`` times the embedding matrix's std."""
    if config.lr_scale == "absolute":
        return config.lr
    return config.lr * model.get_input_embeddings().weight.detach().float().std().item()


@contextlib.contextmanager
def matmul_precision(tf32: bool):
    """TF32 matrix products inside the block when ``tf32`` (fp32 on CUDA); restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def train(model, tokenizer, config: TrainConfig, out_dir: str | Path, progress: bool = True,
          examples: list[Example] | None = None,
          val_examples: list[Example] | None = None) -> TrainResult:
    """Train a wrapper; writes ``out_dir``/{checkpoint.pt, loss.csv, wrapper.safetensors}.

    The loss figure is drawn above training, from ``loss.csv``: ``kvp.plots.save_loss_figure``.
    Resumes from ``out_dir/checkpoint.pt`` when present (its config must match). Teacher targets
    are cached in ``out_dir/../teacher`` unless ``examples`` (and, with ``n_val`` > 0,
    ``val_examples``) are given. With validation, the saved wrapper is the one of the validation
    pass with the lowest loss (``record["best_step"]``). Stops with the step number on a NaN loss,
    leaving the last good checkpoint intact. The base model stays frozen.

    Under torchrun every rank calls this with its own model replica (module docstring); rank 0
    writes the files, and on return they are all written.
    """
    out_dir = Path(out_dir)
    device = model.device
    teacher_dir = out_dir.parent / "teacher"
    if examples is None:
        samples = training_samples(config)
        if len(samples) < config.batch_size:
            raise ValueError(f"dataset gave {len(samples)} samples, fewer than batch_size "
                             f"{config.batch_size}")
        examples = teacher_examples(model, tokenizer, samples, config, teacher_dir, progress)
    if val_examples is None and config.n_val:
        val_examples = teacher_examples(model, tokenizer, training_samples(config, "val"), config,
                                        teacher_dir, progress)
    torch.manual_seed(config.seed)
    wrapper = initial_wrapper(model, tokenizer, config)
    opt = torch.optim.AdamW(wrapper.parameters(), lr=learning_rate(model, config),
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / config.total_steps)
    model.requires_grad_(False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.train()  # checkpointing is active in train mode only; these models have no dropout
    step, losses, best, started = 0, [], None, time.time()
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        diff = config_differences(state["config"], config.to_dict())
        if diff:
            raise ValueError(f"checkpoint {ckpt} was made with another config ({'; '.join(diff)}); "
                             "use another out_dir or the same config")
        wrapper.load_state_dict(state["wrapper"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, losses, best = state["step"], state["losses"], state.get("best")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=config.autocast and device.type == "cuda")
    bar = tqdm(total=config.total_steps, initial=step, desc="train",
               disable=not progress or not distributed.is_main())
    try:
        with matmul_precision(config.tf32 and device.type == "cuda"):
            while step < config.total_steps:
                epoch, k = divmod(step, config.steps_per_epoch)
                order = list(range(len(examples)))
                seeded_rng("train-order", config.seed, epoch).shuffle(order)
                batch = order[k * config.batch_size:(k + 1) * config.batch_size]
                batch.sort(key=lambda i: examples[i].length)  # micro-batches of similar length
                mine = [batch[i] for i in distributed.shard(len(batch))]  # this rank's share
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for part in chunks(mine, config.micro_batch):
                    with autocast:
                        per_example = batch_losses(model, wrapper, [examples[i] for i in part],
                                                   config.loss)
                        loss = sum(x.sum() for x in per_example) / len(batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}; the "
                                                 f"last good checkpoint ({ckpt}) is intact — lower lr")
                    loss.backward()
                    total += loss.item()
                distributed.all_reduce_gradients(wrapper.parameters())  # the whole batch's gradient
                total = distributed.all_reduce_sum([total])[0]
                opt.step()
                if not all(torch.isfinite(p).all() for p in wrapper.parameters()):
                    raise FloatingPointError(f"the wrapper became non-finite at step {step + 1}; "
                                             f"the last good checkpoint ({ckpt}) is intact — lower lr")
                sched.step()
                step += 1
                row = {"step": step, "epoch": epoch, "loss": total, "lr": sched.get_last_lr()[0]}
                if val_examples and (step % config.validation_steps == 0
                                     or step == config.total_steps):
                    with autocast:
                        val = validation_loss(model, wrapper, val_examples, config.loss,
                                              config.micro_batch)
                    row.update(val_loss=val["loss"], val_first=val["first"])
                    if best is None or val["loss"] < best["val_loss"]:
                        best = {"step": step, "val_loss": val["loss"], "val_first": val["first"],
                                "wrapper": {k: v.detach().clone()
                                            for k, v in wrapper.state_dict().items()}}
                losses.append(row)
                bar.set_postfix(loss=f"{total:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                                **({"val": f"{row['val_loss']:.3f}"} if "val_loss" in row else {}))
                bar.update()
                if distributed.is_main() and (step % config.checkpoint_every == 0
                                              or step == config.total_steps):
                    save_checkpoint(ckpt, {"config": config.to_dict(),
                                           "wrapper": wrapper.state_dict(),
                                           "optimizer": opt.state_dict(),
                                           "scheduler": sched.state_dict(), "step": step,
                                           "losses": losses, "best": best})
    finally:
        bar.close()
        if config.gradient_checkpointing:
            model.gradient_checkpointing_disable()
            model.eval()
    record = {"config": config.to_dict(), "steps": step, "final_loss": losses[-1]["loss"],
              "lr_absolute": opt.param_groups[0]["initial_lr"],
              "teacher_truncated": teacher_truncated(examples, config),
              "teacher_topk_mass": teacher_mass(examples),
              "kvp_version": kvp.__version__, "git_commit": git_commit(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "wall_s": round(time.time() - started, 1), "n_examples": len(examples),
              "world_size": distributed.world_size()}
    if best is not None:
        wrapper.load_state_dict(best["wrapper"])
        record.update(best_step=best["step"], best_val_loss=best["val_loss"],
                      best_val_first=best["val_first"], final_val_loss=losses[-1]["val_loss"],
                      n_val_examples=len(val_examples),
                      val_teacher_truncated=teacher_truncated(val_examples, config))
    wrapper.record = record
    wrapper.model_name = config.model
    if distributed.is_main():
        wrapper.save(out_dir / "wrapper.safetensors")
        write_loss_csv(out_dir / "loss.csv", losses)
    distributed.barrier()
    return TrainResult(wrapper, losses, record)


LOSS_COLUMNS = ["step", "epoch", "loss", "lr", "val_loss", "val_first"]


def write_loss_csv(path: Path, losses: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOSS_COLUMNS)
        writer.writeheader()
        writer.writerows(losses)


def config_from_dict(d: dict) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown training options {sorted(unknown)}; allowed: {sorted(names)}")
    return TrainConfig(**d)


FIELD_HELP = {
    "model": "registry name of the model", "dataset": "training dataset (kvp.data.DATASETS)",
    "n_samples": "training samples", "epochs": "passes over the training samples",
    "lr": "peak learning rate (absolute, or in embedding-std units with --lr-scale embed_std)",
    "batch_size": "samples per optimiser step", "h": "header tokens", "t": "trailer tokens",
    "loss": "kl (forward KL on the teacher's top-k) or ce (cross-entropy on its tokens)",
    "max_new_tokens": "teacher decoding budget", "top_k": "teacher tokens kept per position",
    "seed": "training seed (wrapper init and sample order)",
    "data_seed": "seed of the training samples (shared by runs of several seeds)",
    "checkpoint_every": "optimiser steps between checkpoints",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "autocast": "bf16 autocast on CUDA", "micro_batch": "samples per padded forward",
    "n_val": "validation samples (0: no checkpoint selection)",
    "eval_every": "steps between validation passes (0: once per epoch)",
    "init": "normal (Normal(mean, std) of the embeddings) or tokens (real token embeddings)",
    "lr_scale": "absolute or embed_std", "tf32": "TF32 matrix products in fp32 on CUDA",
}


def main(argv: list[str] | None = None, draw_loss=None) -> int:
    """``python -m kvp.train --out DIR [--model M] [--dataset D] [--epochs N] …``; then
    ``draw_loss(out_dir, title)`` unless ``--no-plot`` (the script passes the loss figure)."""
    parser = argparse.ArgumentParser(
        prog="python -m kvp.train", description="Train a KV Packet wrapper by distillation "
        "(the fields of kvp.train.TrainConfig; defaults are a short CPU demonstration).")
    parser.add_argument("--out", required=True, help="output directory of the run (resumes from "
                        "its checkpoint.pt; teacher targets are cached in OUT/../teacher)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--no-plot", action="store_true", help="skip the loss figure")
    for f in fields(TrainConfig):
        if f.name in ("dataset_options", "num_docs"):
            continue
        flag = f"--{f.name.replace('_', '-')}"
        help_text = f"{FIELD_HELP[f.name]} (default: %(default)s)"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=help_text)
    parser.add_argument("--num-docs", type=int, nargs="+", default=[2, 3, 5, 7],
                        help="biography: document counts cycled over the samples "
                        "(default: %(default)s)")
    parser.add_argument("--dataset-options", type=json.loads, default={},
                        help='options of the dataset loader as JSON, e.g. \'{"path": "my.jsonl"}\' '
                        "or '{\"context_tokens\": 1024}' (default: none)")
    args = vars(parser.parse_args(argv))
    out, device, no_plot = args.pop("out"), args.pop("device"), args.pop("no_plot")
    config = config_from_dict(args)
    model, tokenizer, spec = load_model(config.model, device=device,
                                        dtype="float32")  # fp32 master weights; bf16 autocast on CUDA
    spec.require_trained()
    result = train(model, tokenizer, config, out)
    if distributed.is_main():
        if draw_loss is not None and not no_plot:
            draw_loss(out, config.title)
        print(json.dumps(result.record, indent=1))
    return 0


if __name__ == "__main__":
    # The command line draws the loss figure too: plotting sits above training (kvp.plots).
    from kvp.plots import save_loss_figure

    with distributed.process_group():  # torchrun: data-parallel training across ranks
        raise SystemExit(main(draw_loss=save_loss_figure))
