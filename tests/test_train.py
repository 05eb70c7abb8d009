"""Adapter training: the loss falls, the base model stays frozen, interrupted runs resume exactly."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import pytest
import torch

from kvp import train as train_mod
from kvp.packet import PacketWrapper
from kvp.train import TrainConfig, mean_loss, teacher_examples, train, training_samples

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
    model, tokenizer, _ = smollm
    config = TrainConfig(**TINY)
    cache = tmp_path_factory.mktemp("runs") / "teacher"
    return config, cache, teacher_examples(model, tokenizer, training_samples(config), config,
                                           cache, progress=False)


def test_training_lowers_loss_and_keeps_model_frozen(smollm, examples, tmp_path):
    model, tokenizer, _ = smollm
    config, _, ex = examples
    before = weights_digest(model)
    initial = PacketWrapper.init_from_embeddings(model, config.h, config.t, config.seed)
    result = train(model, tokenizer, config, tmp_path / "run", progress=False, examples=ex)
    assert weights_digest(model) == before  # base model bit-identical
    assert len(result.losses) == config.total_steps == 4
    assert mean_loss(model, result.wrapper, ex) < 0.9 * mean_loss(model, initial, ex)
    for name in ("wrapper.safetensors", "loss.csv", "loss.png", "loss.pdf", "checkpoint.pt"):
        assert (tmp_path / "run" / name).exists(), name
    assert result.record["config"]["seed"] == 3 and result.record["steps"] == 4
    assert result.record["git_commit"] and result.record["kvp_version"]


def test_teacher_targets_are_cached(smollm, examples):
    model, tokenizer, _ = smollm
    config, cache, ex = examples
    files = sorted(cache.glob("*.pt"))
    assert len(files) == config.n_samples
    again = teacher_examples(model, tokenizer, training_samples(config), config, cache,
                             progress=False)
    assert all(torch.equal(a.topk_logp, b.topk_logp) and torch.equal(a.answer, b.answer)
               for a, b in zip(ex, again))
    assert sorted(cache.glob("*.pt")) == files


def test_killed_run_resumes_to_the_same_wrapper(smollm, examples, tmp_path):
    model, tokenizer, _ = smollm
    config, cache, ex = examples
    full = train(model, tokenizer, config, tmp_path / "full", progress=False, examples=ex)
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


def test_resume_with_other_config_names_fields(smollm, examples, tmp_path):
    model, tokenizer, _ = smollm
    config, _, ex = examples
    train(model, tokenizer, config, tmp_path / "r", progress=False, examples=ex)
    other = TrainConfig(**{**TINY, "lr": 1e-3, "epochs": 4})
    with pytest.raises(ValueError, match=r"epochs: checkpoint 2 vs now 4.*lr: checkpoint 0.01"):
        train(model, tokenizer, other, tmp_path / "r", progress=False, examples=ex)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(smollm, examples, tmp_path, monkeypatch):
    model, tokenizer, _ = smollm
    config, _, ex = examples
    real, calls = train_mod.distillation_loss, []

    def flaky(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) > 4 else loss  # step 3's first sample

    monkeypatch.setattr(train_mod, "distillation_loss", flaky)
    with pytest.raises(FloatingPointError, match="at step 3"):
        train(model, tokenizer, config, tmp_path / "n", progress=False, examples=ex)
    state = torch.load(tmp_path / "n" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["wrapper"].values())


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="n_samples=4 is smaller than batch_size=8"):
        TrainConfig(n_samples=4, batch_size=8)
    with pytest.raises(ValueError, match="loss='mse'"):
        TrainConfig(loss="mse")
