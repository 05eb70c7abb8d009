"""Damaged files are caught: converted model weights (size + sha256, converted again) and wrappers
(checksum in their metadata, wrapped read errors, the model they meet)."""

from __future__ import annotations

import shutil

import pytest
import torch

from kvp import models
from kvp.adapters import ADAPTER_DIR
from kvp.packet import PacketWrapper, build_packet
from kvp.params import load_wrapper


def flip(path, offset: int, n: int) -> None:
    """Invert ``n`` bytes of ``path`` from ``offset`` (the size stays)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_damaged_conversion_is_detected_and_converted_again(tmp_path, monkeypatch, smollm):
    done = models.ensure_converted("smollm2-135m")
    monkeypatch.setenv("KVP_CACHE", str(tmp_path))
    target = models.converted_dir("smollm2-135m")
    shutil.copytree(done, target)
    weights = target / "model.safetensors"
    assert models.weights_problem(target) is None
    flip(weights, weights.stat().st_size // 2, 4 << 20)  # 4 MB flipped, same size
    with pytest.warns(UserWarning, match="fails verification \\(model.safetensors has sha256"):
        assert models.ensure_converted("smollm2-135m") == target
    assert models.weights_problem(target) is None
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [target.name]
    with open(weights, "r+b") as f:  # a truncated file is caught by its size, without hashing
        f.truncate(weights.stat().st_size - 10)
    assert "bytes" in models.weights_problem(target)


@pytest.fixture
def saved(tmp_path, smollm):
    model = smollm.model
    path = tmp_path / "wrapper.safetensors"
    PacketWrapper.init_from_embeddings(model, 2, 2, model_name="smollm2-135m").save(path)
    return path


def test_wrapper_checksum_is_saved_and_verified(saved):
    assert PacketWrapper.load(saved, model_name="smollm2-135m").h == 2
    flip(saved, saved.stat().st_size - 8, 4)  # inside the trailer's bytes
    with pytest.raises(ValueError, match=f"wrapper {saved} is damaged.*sha256.*train it again"):
        PacketWrapper.load(saved)


def test_unreadable_and_missing_wrappers_name_the_path_and_fix(saved, tmp_path):
    flip(saved, 0, 8)  # the header length: not a safetensors file any more
    with pytest.raises(ValueError, match=f"wrapper {saved} is damaged or not a wrapper file"):
        PacketWrapper.load(saved)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=f"wrapper {missing} does not exist"):
        PacketWrapper.load(missing)


def test_shipped_wrapper_without_checksum_still_loads():
    path = ADAPTER_DIR / "smollm2-135m" / "biography-seed0" / "wrapper.safetensors"
    assert PacketWrapper.load(path).model_name == "smollm2-135m"


def test_wrapper_of_another_width_is_refused_where_it_meets_the_model(smollm, tmp_path):
    model, tokenizer = smollm.model, smollm.tokenizer
    other = tmp_path / "other.safetensors"
    PacketWrapper(torch.zeros(2, 896), torch.zeros(2, 896)).save(other)  # no model name saved
    with pytest.raises(ValueError, match="d_model 896.*d_model 576.*trained for this model"):
        load_wrapper(str(other), model, "smollm2-135m", "biography")
    with pytest.raises(ValueError, match="d_model 896.*d_model 576"):
        build_packet(model, tokenizer, "A short document.", PacketWrapper.load(other))
