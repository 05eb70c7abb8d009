"""Adapter training: the loss falls, the base model stays frozen, interrupted runs resume exactly."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from kvp import train as train_mod
from kvp.blockmask import block_forward, block_forward_batch
from kvp.packet import PacketWrapper
from kvp.plots import save_loss_figure
from kvp.train import (TrainConfig, initial_wrapper, learning_rate, mean_loss, teacher_examples,
                       token_init_ids, train, training_samples, validation_loss)

TINY = dict(n_samples=4, batch_size=2, epochs=2, num_docs=(2,), h=2, t=2, max_new_tokens=6,
            top_k=32, lr=1e-2, checkpoint_every=1, seed=3)


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def examples(smollm, tmp_path_factory):
    model, tokenizer = smollm.model, smollm.tokenizer
    config = TrainConfig(**TINY)
    cache = tmp_path_factory.mktemp("runs") / "teacher"
    return config, cache, teacher_examples(model, tokenizer, training_samples(config), config,
                                           cache, progress=False)


@pytest.fixture(scope="module")
def reference_run(smollm, examples, tmp_path_factory):
    """One uninterrupted TINY run, shared by the tests that compare against it:
    (result, its directory, base-model digest before, digest after)."""
    model, tokenizer = smollm.model, smollm.tokenizer
    config, _, ex = examples
    out = tmp_path_factory.mktemp("reference") / "run"
    before = weights_digest(model)
    result = train(model, tokenizer, config, out, progress=False, examples=ex)
    return result, out, before, weights_digest(model)


def test_training_lowers_loss_and_keeps_model_frozen(smollm, examples, reference_run):
    model = smollm.model
    config, _, ex = examples
    result, out, before, after = reference_run
    initial = PacketWrapper.init_from_embeddings(model, config.h, config.t, config.seed)
    assert after == before  # base model bit-identical
    assert len(result.losses) == config.total_steps == 4
    assert mean_loss(model, result.wrapper, ex) < 0.9 * mean_loss(model, initial, ex)
    save_loss_figure(out, config.title)  # drawn above training, from loss.csv
    for name in ("wrapper.safetensors", "loss.csv", "loss.png", "loss.pdf", "checkpoint.pt"):
        assert (out / name).exists(), name
    assert result.record["config"]["seed"] == 3 and result.record["steps"] == 4
    assert result.record["git_commit"] and result.record["kvp_version"]


def test_teacher_targets_are_cached(smollm, examples):
    model, tokenizer = smollm.model, smollm.tokenizer
    config, cache, ex = examples
    files = sorted(cache.glob("*.pt"))
    assert len(files) == config.n_samples
    again = teacher_examples(model, tokenizer, training_samples(config), config, cache,
                             progress=False)
    assert all(torch.equal(a.topk_logp, b.topk_logp) and torch.equal(a.answer, b.answer)
               for a, b in zip(ex, again))
    assert sorted(cache.glob("*.pt")) == files


def test_killed_run_resumes_to_the_same_wrapper(smollm, examples, reference_run, tmp_path):
    model, tokenizer = smollm.model, smollm.tokenizer
    config, cache, ex = examples
    full = reference_run[0]
    run = tmp_path / "killed"
    run.mkdir()
    (tmp_path / "teacher").symlink_to(cache, target_is_directory=True)  # reuse teacher targets
    args = [sys.executable, "-m", "kvp.train", "--out", str(run), "--num-docs", "2"]
    for key, value in TINY.items():
        if key != "num_docs":
            args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert 1 <= state["step"] < config.total_steps, "the run was not interrupted mid-way"
    resumed = train(model, tokenizer, config, run, progress=False, examples=ex)
    assert [r["step"] for r in resumed.losses] == list(range(1, 5))
    torch.testing.assert_close(resumed.wrapper.header, full.wrapper.header, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(resumed.wrapper.trailer, full.wrapper.trailer, atol=1e-5, rtol=1e-4)


def test_resume_with_other_config_names_fields(smollm, examples, reference_run):
    model, tokenizer = smollm.model, smollm.tokenizer
    _, _, ex = examples
    other = TrainConfig(**{**TINY, "lr": 1e-3, "epochs": 4})
    with pytest.raises(ValueError, match=r"epochs: checkpoint 2 vs now 4.*lr: checkpoint 0.01"):
        train(model, tokenizer, other, reference_run[1], progress=False, examples=ex)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(smollm, examples, tmp_path, monkeypatch):
    model, tokenizer = smollm.model, smollm.tokenizer
    config, _, ex = examples
    real, calls = train_mod.batch_losses, []

    def flaky(*args):
        calls.append(1)
        losses = real(*args)
        return [x * float("nan") for x in losses] if len(calls) > 4 else losses  # step 3, sample 1

    monkeypatch.setattr(train_mod, "batch_losses", flaky)
    with pytest.raises(FloatingPointError, match="at step 3"):
        train(model, tokenizer, config, tmp_path / "n", progress=False, examples=ex)
    state = torch.load(tmp_path / "n" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["wrapper"].values())


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="n_samples=4 is smaller than batch_size=8"):
        TrainConfig(n_samples=4, batch_size=8)
    with pytest.raises(ValueError, match="loss='mse'"):
        TrainConfig(loss="mse")


def test_padded_batch_forward_equals_one_sequence_at_a_time(smollm, examples):
    model = smollm.model
    _, _, ex = examples
    wrapper = PacketWrapper.init_from_embeddings(model, 2, 2, seed=5)
    shortest = min(len(e.task) + len(e.answer) for e in ex)
    items = [(e.preamble, e.docs[:i + 1], torch.cat([e.task, e.answer])) for i, e in enumerate(ex)]
    assert len({sum(map(len, docs)) for _, docs, _ in items}) > 1  # really padded
    batched = block_forward_batch(model, items, wrapper, keep=shortest)
    for row, item in zip(batched, items):
        alone, _, _ = block_forward(model, *item, wrapper)
        torch.testing.assert_close(row, alone[-shortest:], atol=2e-4, rtol=1e-4)


def test_micro_batches_train_the_same_wrapper(smollm, examples, reference_run, tmp_path):
    model, tokenizer = smollm.model, smollm.tokenizer
    _, _, ex = examples
    one = reference_run[0]
    two = train(model, tokenizer, TrainConfig(**{**TINY, "micro_batch": 2}), tmp_path / "two",
                progress=False, examples=ex)
    torch.testing.assert_close(two.wrapper.header, one.wrapper.header, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(two.wrapper.trailer, one.wrapper.trailer, atol=1e-4, rtol=1e-3)


def test_validation_selects_the_checkpoint_with_lowest_validation_loss(smollm, examples, tmp_path):
    model, tokenizer = smollm.model, smollm.tokenizer
    _, cache, ex = examples
    config = TrainConfig(**{**TINY, "n_val": 2, "eval_every": 1, "lr": 0.3})
    val = teacher_examples(model, tokenizer, training_samples(config, "val"), config, cache,
                           progress=False)
    assert {s.meta["split"] for s in training_samples(config, "val")} == {"val"}
    result = train(model, tokenizer, config, tmp_path / "v", progress=False, examples=ex,
                   val_examples=val)
    save_loss_figure(tmp_path / "v", config.title)  # with the validation curve
    curve = pd.read_csv(tmp_path / "v" / "loss.csv")
    assert curve["val_loss"].notna().sum() == config.total_steps
    best = curve.loc[curve["val_loss"].idxmin()]
    assert result.record["best_step"] == best["step"]
    assert result.record["best_val_loss"] == pytest.approx(best["val_loss"])
    again = validation_loss(model, PacketWrapper.load(tmp_path / "v" / "wrapper.safetensors"), val)
    assert again["loss"] == pytest.approx(best["val_loss"], rel=1e-4)  # the saved one is the best
    assert 0 < again["first"] <= again["loss"]
    assert 0 <= result.record["teacher_truncated"] <= 1


def test_token_init_and_scaled_learning_rate(smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    config = TrainConfig(h=3, t=2, init="tokens", lr=2.0, lr_scale="embed_std")
    wrapper = initial_wrapper(model, tokenizer, config)
    weight = model.get_input_embeddings().weight.detach().float()
    ids = token_init_ids(tokenizer, 3, "header")
    assert ids[0] == (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                      else tokenizer.eos_token_id)
    assert token_init_ids(tokenizer, 3, "trailer")[-1] == tokenizer.eos_token_id
    gap = (wrapper.header.detach() - weight[ids]).norm(dim=-1)
    assert (gap < 0.2 * weight[ids].norm(dim=-1)).all()  # close to the tokens, not equal
    assert (gap > 0).all()
    assert learning_rate(model, config) == pytest.approx(2.0 * weight.std().item())
    with pytest.raises(ValueError, match="init='zeros'"):
        TrainConfig(init="zeros")
