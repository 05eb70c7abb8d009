"""Packets: documents encoded once, wrapped in trained soft tokens, reusable in any context.

See docs/method.md#packets.

* ``PacketWrapper`` — the trainable ``header`` (h, d_model) and ``trailer`` (t, d_model) in the
  model's input-embedding space, initialised from Normal(mean, std) of the embedding matrix.
* ``build_packet`` — tokenise a document alone (no special tokens), form
  ``[header ; doc embeddings ; trailer]``, prefill it from position 0, keep its KV.
* ``PacketStore`` — packets keyed by (model, wrapper, document hash, packet dtype), encoded once
  across all queries and kept in tiers (GPU, pinned host memory, memory-mapped files on disk),
  each with its byte bound and LRU order; optionally compact (fp8 / int8, ``kvp.compact``).
* ``assemble`` — ``[preamble][packet 1]…[packet N]`` concatenated, every packet's keys re-rotated by
  its global start offset in one batched op, returned as an HF ``DynamicCache``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvp.cache import ChunkKV, check_cache_supported, chunk_offsets, concat, encode
from kvp.compact import check_packet_dtype, dequantize, kind_of, quantize
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
    ``scales``: for a compact packet (kv in fp8 / int8, ``kvp.compact``), the key and value scales
    (L, H_kv, 1, D) float32; None when kv is in the model's dtype.
    """

    kv: ChunkKV
    doc_ids: torch.Tensor
    n_header: int
    n_doc: int
    n_trailer: int
    span: int | None = None
    scales: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def length(self) -> int:
        """Positions the packet occupies in an assembled context."""
        return self.span if self.span is not None else self.n_header + self.n_doc + self.n_trailer

    @property
    def packet_dtype(self) -> str:
        return kind_of(self.kv.keys.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of its KV and scales (what a tier holds and a transfer moves)."""
        tensors = [self.kv.keys, self.kv.values, *(self.scales or ())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantized(self, dtype: torch.dtype, device: torch.device | str) -> ChunkKV:
        """The KV (L, H_kv, S, D) in ``dtype`` on ``device`` (the stored tensors themselves when
        they already are)."""
        keys, values = (t.to(device) for t in (self.kv.keys, self.kv.values))
        if self.scales is None:
            return ChunkKV(keys.to(dtype), values.to(dtype))
        return ChunkKV(dequantize(keys, self.scales[0], dtype),
                       dequantize(values, self.scales[1], dtype))

    def compacted(self, packet_dtype: str) -> Packet:
        """This packet with its KV stored in ``packet_dtype`` ("model": unchanged)."""
        check_packet_dtype(packet_dtype)
        if packet_dtype == self.packet_dtype:
            return self
        if self.scales is not None:
            raise ValueError(f"the packet is already {self.packet_dtype}; compact it from the "
                             "full-precision packet")
        (k, sk), (v, sv) = quantize(self.kv.keys, packet_dtype), quantize(self.kv.values, packet_dtype)
        return replace(self, kv=ChunkKV(k, v), scales=(sk, sv))

    def placed(self, device: torch.device | str, pin: bool = False) -> Packet:
        """A copy of the packet's tensors on ``device`` (``pin``: page-locked host memory, the
        source of asynchronous host → GPU copies)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.cpu().pin_memory() if pin else t.to(device, copy=True)

        scales = tuple(move(s) for s in self.scales) if self.scales is not None else None
        return replace(self, kv=ChunkKV(move(self.kv.keys), move(self.kv.values)), scales=scales)


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


TIERS = ("gpu", "host", "disk")
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                       "F8_E4M3": torch.float8_e4m3fn, "I8": torch.int8, "I64": torch.int64}


@dataclass
class PacketStore:
    """Packets keyed by (model, wrapper fingerprint, document sha256, packet dtype), encoded once,
    kept in tiers. See docs/method.md#packet-tiers.

    ``tiers`` (fastest first, a subsequence of ``TIERS``): "gpu" holds packets on the model's
    device, "host" in host memory (page-locked when CUDA is available, so transfers to the GPU are
    asynchronous), "disk" as safetensors files under ``directory``, memory-mapped when read. A
    new packet goes into the first tier; when a tier is over its bound, its least recently used
    packets move down to the next tier (or are dropped from the last; a dropped disk packet's file
    is deleted). ``get`` returns a packet from the first tier, moving it up when it was found
    lower. Packets are never modified: moving one copies it, and disk packets are mapped
    copy-on-write. A ``directory`` without "disk" in ``tiers`` adds the disk tier last (packets
    persist, so later processes skip encoding too).

    ``max_bytes``: bound in bytes per tier name (absent: unbounded); a packet larger than the
    bound of the tier it enters is an error. ``max_in_memory``: bound in packets of each memory
    tier (for long evaluations whose documents do not recur). ``packet_dtype``: "model", or
    "fp8" / "int8" for compact packets (``kvp.compact``). ``n_encoded`` counts real encodes (tests
    use it to prove reuse).
    """

    model: object
    tokenizer: object
    model_name: str
    directory: Path | None = None
    max_in_memory: int | None = None
    tiers: tuple[str, ...] = ("gpu",)
    max_bytes: dict[str, int] = field(default_factory=dict)
    packet_dtype: str = "model"
    n_encoded: int = 0
    _memory: OrderedDict = field(default_factory=OrderedDict, repr=False)  # the first tier's
    _held: dict[str, OrderedDict] = field(default_factory=dict, repr=False)
    _maps: dict[tuple, tuple] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        check_packet_dtype(self.packet_dtype)
        tiers = tuple(self.tiers)
        if self.directory is not None and "disk" not in tiers:
            tiers += ("disk",)
        if not tiers or len(set(tiers)) != len(tiers) or \
                [t for t in TIERS if t in tiers] != list(tiers):
            raise ValueError(f"tiers={self.tiers!r}: give a non-empty subsequence of {TIERS}, "
                             "fastest first")
        if "disk" in tiers and self.directory is None:
            raise ValueError("the disk tier needs a directory: pass directory=<path>")
        unknown = set(self.max_bytes) - set(tiers)
        if unknown:
            raise ValueError(f"max_bytes names tiers {sorted(unknown)} that are not in {tiers}")
        self.tiers = tiers
        self._held = {t: self._memory if i == 0 else OrderedDict() for i, t in enumerate(tiers)}

    def key(self, document: str, wrapper: PacketWrapper | None) -> tuple[str, str, str, str]:
        wid = wrapper.fingerprint() if wrapper is not None else "plain"
        return self.model_name, wid, hashlib.sha256(document.encode()).hexdigest(), self.packet_dtype

    def tier_of(self, document: str, wrapper: PacketWrapper | None = None) -> str | None:
        """The fastest tier holding the document's packet (None: not stored)."""
        key = self.key(document, wrapper)
        return next((t for t in self.tiers if key in self._held[t]), None)

    def nbytes(self, tier: str) -> int:
        """Bytes the packets of ``tier`` hold."""
        return sum(p.nbytes for p in self._held[tier].values())

    def get(self, document: str, wrapper: PacketWrapper | None = None) -> Packet:
        key = self.key(document, wrapper)
        for tier in self.tiers:
            held = self._held[tier]
            if key in held:
                held.move_to_end(key)
                if tier == self.tiers[0]:
                    return held[key]
                return self._put(0, key, held[key])
        if "disk" in self.tiers and self._path(key).exists():
            return self._put(0, key, self._map(key), mapped=True)  # saved by an earlier process
        packet = build_packet(self.model, self.tokenizer, document, wrapper)
        packet = packet.compacted(self.packet_dtype)
        self.n_encoded += 1
        if "disk" in self.tiers:
            self._save(key, packet)
        return self._put(0, key, packet)

    def put(self, document: str, wrapper: PacketWrapper | None, packet: Packet) -> Packet:
        """Store a full-precision ``packet`` built elsewhere as ``document``'s (compacted to the
        store's ``packet_dtype``, saved when there is a disk tier, placed in the first tier)."""
        key = self.key(document, wrapper)
        packet = packet.compacted(self.packet_dtype)
        if "disk" in self.tiers:
            self._save(key, packet)
        return self._put(0, key, packet)

    def _put(self, index: int, key, packet: Packet, mapped: bool = False) -> Packet:
        """Place ``packet`` in tier ``tiers[index]`` (copied there; ``mapped``: it already is the
        disk tier's memory map of its file), evicting down as needed."""
        tier = self.tiers[index]
        if tier == "disk":
            if not self._path(key).exists():
                self._save(key, packet)
            packet = packet if mapped else self._map(key)
        elif tier == "gpu":
            packet = packet.placed(self.model.device)
        else:
            packet = packet.placed("cpu", pin=torch.cuda.is_available())
        bound = self.max_bytes.get(tier)
        if bound is not None and packet.nbytes > bound:
            raise ValueError(f"a packet of {packet.nbytes} bytes is larger than the {tier!r} tier "
                             f"(max_bytes[{tier!r}] = {bound}); raise that bound, or store compact "
                             "packets (packet_dtype='fp8')")
        held = self._held[tier]
        held[key] = packet
        count = self.max_in_memory if tier != "disk" else None
        while len(held) > 1 and ((count is not None and len(held) > count) or
                                 (bound is not None and self.nbytes(tier) > bound)):
            old_key, old = held.popitem(last=False)  # least recently used
            if index + 1 < len(self.tiers):
                if old_key not in self._held[self.tiers[index + 1]]:
                    self._put(index + 1, old_key, old)
            elif tier == "disk":
                self._unmap(old_key)
                self._path(old_key).unlink(missing_ok=True)
        return packet

    def drop_page_cache(self) -> None:
        """Evict the disk packets' pages from memory (this process's mappings and, where the
        operating system allows, its page cache), so the next read comes from the disk."""
        for mm, fd in self._maps.values():
            mm.madvise(mmap.MADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _path(self, key) -> Path:
        model, wid, doc, packet_dtype = key
        name = doc if packet_dtype == "model" else f"{doc}.{packet_dtype}"
        return Path(self.directory) / model.replace("/", "__") / wid / f"{name}.safetensors"

    def _save(self, key, packet: Packet) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tensors = {"keys": packet.kv.keys.cpu().contiguous(),
                   "values": packet.kv.values.cpu().contiguous(), "doc_ids": packet.doc_ids}
        if packet.scales is not None:
            tensors["key_scales"], tensors["value_scales"] = (s.cpu().contiguous()
                                                              for s in packet.scales)
        meta = {"n_header": str(packet.n_header), "n_trailer": str(packet.n_trailer)}
        if packet.span is not None:
            meta["span"] = str(packet.span)
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _map(self, key) -> Packet | None:
        """The saved packet as tensors over a copy-on-write memory map of its file (read lazily)."""
        path = self._path(key)
        if not path.exists():
            return None
        self._unmap(key)
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        fd = os.open(path, os.O_RDONLY)
        self._maps[key] = (mm, fd)
        meta = header.pop("__metadata__", {})
        tensors = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            flat = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=8 + size + begin)
            tensors[name] = flat.view(dtype).view(info["shape"])
        scales = ((tensors["key_scales"], tensors["value_scales"]) if "key_scales" in tensors
                  else None)
        return Packet(kv=ChunkKV(tensors["keys"], tensors["values"]),
                      doc_ids=tensors["doc_ids"].clone(), n_header=int(meta["n_header"]),
                      n_doc=len(tensors["doc_ids"]), n_trailer=int(meta["n_trailer"]),
                      span=int(meta["span"]) if "span" in meta else None, scales=scales)

    def _unmap(self, key) -> None:
        if key in self._maps:
            os.close(self._maps.pop(key)[1])  # the map itself lives as long as its tensors


def assemble(model, preamble: ChunkKV, packets: list[Packet]) -> tuple[ChunkKV, int]:
    """``[preamble][packet 1]…[packet N]`` with every packet re-rotated to its global offset.

    One concatenation and one batched rotation over all layers: each packet token's delta is its
    packet's start offset (the preamble's delta is 0). Packets of any tier are read onto the
    preamble's device, compact ones dequantized to its dtype.
    Returns:
        (ChunkKV (L, H_kv, S_cached, D), the next free position). The two differ only when
        packets are compressed (then positions keep the gaps of the removed tokens).
    """
    check_cache_supported(model)
    spans = [preamble.length] + [p.length for p in packets]
    stored = [preamble.length] + [p.kv.length for p in packets]
    deltas = torch.repeat_interleave(torch.tensor(chunk_offsets(spans)),
                                     torch.tensor(stored))  # (S_cached,)
    device = preamble.keys.device  # packets of any tier and dtype, in the preamble's
    kv = concat([preamble] + [p.dequantized(preamble.keys.dtype, device) for p in packets])
    cos, sin = rotation(model, deltas, device=kv.keys.device)  # (S_cached, D)
    return ChunkKV(apply_rotation(kv.keys, cos, sin), kv.values), int(sum(spans))

