"""Packets: documents encoded once, wrapped in trained soft tokens, reusable in any context.

See docs/method.md#packets.

* ``PacketWrapper`` — the trainable ``header`` (h, d_model) and ``trailer`` (t, d_model) in the
  model's input-embedding space, initialised from Normal(mean, std) of the embedding matrix.
* ``build_packet`` — tokenise a document alone (no special tokens), form
  ``[header ; doc embeddings ; trailer]``, prefill it from position 0, keep its KV.
* ``PacketStore`` — packets keyed by (model, wrapper, document hash), in memory and optionally on
  disk, so a document is encoded once across all queries.
* ``assemble`` — ``[preamble][packet 1]…[packet N]`` concatenated, every packet's keys re-rotated by
  its global start offset in one batched op, returned as an HF ``DynamicCache``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvp.cache import ChunkKV, check_cache_supported, chunk_offsets, concat, encode
from kvp.rope import apply_rotation, rotation


class PacketWrapper(torch.nn.Module):
    """Header (h, d_model) and trailer (t, d_model) soft tokens; the only trained parameters."""

    def __init__(self, header: torch.Tensor, trailer: torch.Tensor, model_name: str = "",
                 record: dict | None = None):
        super().__init__()
        if header.ndim != 2 or trailer.ndim != 2 or header.shape[1] != trailer.shape[1]:
            raise ValueError(f"header {tuple(header.shape)} and trailer {tuple(trailer.shape)} must "
                             "be (h, d_model) and (t, d_model) with the same d_model")
        self.header = torch.nn.Parameter(header)
        self.trailer = torch.nn.Parameter(trailer)
        self.model_name = model_name
        self.record = record or {}

    @classmethod
    def init_from_embeddings(cls, model, h: int = 8, t: int = 8, seed: int = 0,
                             model_name: str = "") -> PacketWrapper:
        """Draw header/trailer from Normal(mean, std) of the whole input-embedding matrix."""
        weight = model.get_input_embeddings().weight.detach().float()
        mean, std = weight.mean().item(), weight.std().item()
        gen = torch.Generator().manual_seed(seed)
        d = weight.shape[1]
        header = torch.randn(h, d, generator=gen) * std + mean
        trailer = torch.randn(t, d, generator=gen) * std + mean
        return cls(header, trailer, model_name=model_name).to(weight.device)

    @classmethod
    def empty(cls, d_model: int, model_name: str = "") -> PacketWrapper:
        """A wrapper with no tokens: a packet built with it is a plain (no-recompute) document cache."""
        return cls(torch.zeros(0, d_model), torch.zeros(0, d_model), model_name=model_name)

    @property
    def h(self) -> int:
        return self.header.shape[0]

    @property
    def t(self) -> int:
        return self.trailer.shape[0]

    @property
    def d_model(self) -> int:
        return self.header.shape[1]

    def fingerprint(self) -> str:
        """Content hash of header and trailer (changes whenever training changes them)."""
        h = hashlib.sha256()
        for tensor in (self.header, self.trailer):
            h.update(tensor.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write safetensors with metadata (model name, d_model, h, t, dtype, training record)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"header": self.header.detach().cpu().contiguous(),
                   "trailer": self.trailer.detach().cpu().contiguous()}
        meta = {"model_name": self.model_name, "d_model": str(self.d_model), "h": str(self.h),
                "t": str(self.t), "dtype": str(self.header.dtype).removeprefix("torch."),
                "record": json.dumps(self.record, sort_keys=True),
                "sha256": tensors_sha256(tensors)}
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            pass
        try:
            save_file(tensors, tmp.name, metadata=meta)
            os.replace(tmp.name, path)
        finally:
            Path(tmp.name).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path, model_name: str | None = None,
             d_model: int | None = None) -> PacketWrapper:
        """Load a wrapper; refuse a damaged file (the ``sha256`` of its metadata, when present,
        must match its tensors) and one made for another model (names both) or another d_model."""
        from safetensors import SafetensorError, safe_open

        fix = ("restore the file (git checkout -- <path> for a shipped adapter) or train it again "
               "with python -m kvp.train")
        if not Path(path).is_file():
            raise FileNotFoundError(f"wrapper {path} does not exist; pass the path of a "
                                    f"wrapper.safetensors, or {fix}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            tensors["header"], tensors["trailer"]
        except (SafetensorError, OSError, KeyError) as err:
            raise ValueError(f"wrapper {path} is damaged or not a wrapper file ({err}); "
                             f"{fix}") from err
        if "sha256" in meta and meta["sha256"] != tensors_sha256(tensors):
            raise ValueError(f"wrapper {path} is damaged: its tensors do not match the sha256 "
                             f"saved with them ({meta['sha256'][:16]}…); {fix}")
        saved_name, saved_d = meta.get("model_name", ""), int(meta.get("d_model", -1))
        if d_model is not None and saved_d != d_model:
            raise ValueError(f"wrapper {path} has d_model {saved_d} (model {saved_name!r}) but the "
                             f"model has d_model {d_model} ({model_name!r}); use a wrapper trained "
                             "for this model")
        if model_name is not None and saved_name and saved_name != model_name:
            raise ValueError(f"wrapper {path} was trained for model {saved_name!r}, not "
                             f"{model_name!r}; train or load a wrapper for {model_name!r}")
        return cls(tensors["header"], tensors["trailer"], model_name=saved_name,
                   record=json.loads(meta.get("record", "{}")))

    def check_model(self, model, model_name: str | None = None) -> None:
        """Refuse a model of another d_model, or of another registry name when both are known."""
        d = model.config.hidden_size
        if self.d_model != d or (model_name and self.model_name and self.model_name != model_name):
            raise ValueError(f"wrapper for {self.model_name!r} (d_model {self.d_model}) cannot wrap "
                             f"documents of {model_name or type(model).__name__!r} (d_model {d}); "
                             "use a wrapper trained for this model")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` (the checksum of a saved wrapper)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Packet:
    """A document's immutable KV, encoded at positions 0..length-1.

    kv: keys/values (L, H_kv, S, D) with S = n_header + n_doc + n_trailer, or fewer when the packet
    was compressed; ``span`` is then the number of positions it occupies in a context (its
    uncompressed length), so the tokens after it keep their positions. ``doc_ids``: (n_doc,).
    """

    kv: ChunkKV
    doc_ids: torch.Tensor
    n_header: int
    n_doc: int
    n_trailer: int
    span: int | None = None

    @property
    def length(self) -> int:
        """Positions the packet occupies in an assembled context."""
        return self.span if self.span is not None else self.n_header + self.n_doc + self.n_trailer


def tokenize_document(tokenizer, document: str) -> torch.Tensor:
    """(n_doc,) ids of a document tokenised alone, without special tokens."""
    if not document or not document.strip():
        raise ValueError("empty document: every document needs text to encode")
    return torch.tensor(tokenizer(document, add_special_tokens=False)["input_ids"], dtype=torch.long)


def check_length(model, n_tokens: int, what: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and n_tokens > limit:
        raise ValueError(f"{what} has {n_tokens} tokens, more than the model's context of {limit}; "
                         "split it into shorter documents")


def wrap_embeddings(model, doc_ids: torch.Tensor, wrapper: PacketWrapper | None) -> torch.Tensor:
    """[header ; embed(doc_ids) ; trailer]: (h + n_doc + t, d_model), differentiable in the wrapper."""
    emb = model.get_input_embeddings()(doc_ids.to(model.device))  # (n_doc, d_model)
    if wrapper is None or (wrapper.h == 0 and wrapper.t == 0):
        return emb
    wrapper.check_model(model)
    header, trailer = (x.to(emb.device, emb.dtype) for x in (wrapper.header, wrapper.trailer))
    return torch.cat([header, emb, trailer], dim=0)  # the wrapper may live on another device


def build_packet(model, tokenizer, document: str, wrapper: PacketWrapper | None = None) -> Packet:
    """Encode one document alone; ``wrapper=None`` = plain cache.

    See docs/method.md#building-packets.
    """
    doc_ids = tokenize_document(tokenizer, document)
    h, t = (wrapper.h, wrapper.t) if wrapper is not None else (0, 0)
    check_length(model, h + len(doc_ids) + t, "document")
    with torch.no_grad():
        kv = encode(model, inputs_embeds=wrap_embeddings(model, doc_ids, wrapper))
    return Packet(kv=kv, doc_ids=doc_ids, n_header=h, n_doc=len(doc_ids), n_trailer=t)


@dataclass
class PacketStore:
    """Packets keyed by (model, wrapper fingerprint, document sha256), encoded once.

    ``directory`` (optional) persists packets as safetensors so later processes skip encoding too.
    ``max_in_memory`` (optional) keeps only the most recently used packets in memory, for long
    evaluations whose documents do not recur. ``n_encoded`` counts real encodes (tests use it to
    prove reuse).
    """

    model: object
    tokenizer: object
    model_name: str
    directory: Path | None = None
    max_in_memory: int | None = None
    n_encoded: int = 0
    _memory: OrderedDict = field(default_factory=OrderedDict)

    def key(self, document: str, wrapper: PacketWrapper | None) -> tuple[str, str, str]:
        wid = wrapper.fingerprint() if wrapper is not None else "plain"
        return self.model_name, wid, hashlib.sha256(document.encode()).hexdigest()

    def get(self, document: str, wrapper: PacketWrapper | None = None) -> Packet:
        key = self.key(document, wrapper)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        packet = self._load(key) if self.directory is not None else None
        if packet is None:
            packet = build_packet(self.model, self.tokenizer, document, wrapper)
            self.n_encoded += 1
            if self.directory is not None:
                self._save(key, packet)
        self._memory[key] = packet
        while self.max_in_memory is not None and len(self._memory) > self.max_in_memory:
            self._memory.popitem(last=False)  # least recently used
        return packet

    def _path(self, key: tuple[str, str, str]) -> Path:
        model, wid, doc = key
        return Path(self.directory) / model.replace("/", "__") / wid / f"{doc}.safetensors"

    def _save(self, key, packet: Packet) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"keys": packet.kv.keys.cpu().contiguous(),
                   "values": packet.kv.values.cpu().contiguous(), "doc_ids": packet.doc_ids},
                  str(tmp), metadata={"n_header": str(packet.n_header),
                                      "n_trailer": str(packet.n_trailer)})
        os.replace(tmp, path)

    def _load(self, key) -> Packet | None:
        from safetensors import safe_open

        path = self._path(key)
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        t = load_file(str(path), device=str(self.model.device))
        return Packet(kv=ChunkKV(t["keys"], t["values"]), doc_ids=t["doc_ids"].cpu(),
                      n_header=int(meta["n_header"]), n_doc=len(t["doc_ids"]),
                      n_trailer=int(meta["n_trailer"]))


def assemble(model, preamble: ChunkKV, packets: list[Packet]) -> tuple[ChunkKV, int]:
    """``[preamble][packet 1]…[packet N]`` with every packet re-rotated to its global offset.

    One concatenation and one batched rotation over all layers: each packet token's delta is its
    packet's start offset (the preamble's delta is 0).
    Returns:
        (ChunkKV (L, H_kv, S_cached, D), the next free position). The two differ only when
        packets are compressed (then positions keep the gaps of the removed tokens).
    """
    check_cache_supported(model)
    spans = [preamble.length] + [p.length for p in packets]
    stored = [preamble.length] + [p.kv.length for p in packets]
    deltas = torch.repeat_interleave(torch.tensor(chunk_offsets(spans)),
                                     torch.tensor(stored))  # (S_cached,)
    kv = concat([preamble] + [p.kv for p in packets])
    cos, sin = rotation(model, deltas, device=kv.keys.device)  # (S_cached, D)
    return ChunkKV(apply_rotation(kv.keys, cos, sin), kv.values), int(sum(spans))

