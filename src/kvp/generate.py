"""Prompt prefill against an assembled cache, greedy decoding with stop strings, TTFT timing."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timer(device: torch.device):
    """Device-synchronised wall time: ``with timer(dev) as t: …``; then ``t.seconds``."""

    class _T:
        seconds = 0.0

    result = _T()
    synchronize(device)
    start = time.perf_counter()
    try:
        yield result
    finally:
        synchronize(device)
        result.seconds = time.perf_counter() - start


@torch.no_grad()
def prefill(model, cache, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    """Prefill ``input_ids`` (S,) at positions ``start..start+S-1`` against ``cache`` (updated in place).

    ``start`` may exceed the cache length (compressed packets keep their positions); the new
    tokens then attend to every cached token. Returns the last position's logits (V,); only that
    position goes through the LM head.
    """
    if len(input_ids) == 0:
        raise ValueError("empty prompt: the question/task prompt needs at least one token")
    ids = input_ids.to(model.device)[None]  # (1, S)
    positions = torch.arange(start, start + ids.shape[1], device=model.device)[None]
    cached = cache.get_seq_length()
    slots = torch.arange(cached, cached + ids.shape[1], device=model.device)  # cache indices
    out = model(input_ids=ids, past_key_values=cache, position_ids=positions,
                cache_position=slots, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


@dataclass(frozen=True)
class GenerationConfig:
    """Greedy decoding settings. ``stop_strings`` end the answer (they are cut from the text)."""

    max_new_tokens: int = 32
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be at least 1")


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def greedy_decode(model, tokenizer, cache, first_logits: torch.Tensor, start: int,
                  config: GenerationConfig) -> tuple[str, list[int]]:
    """Decode greedily from ``first_logits`` (V,), feeding tokens at positions ``start, start+1…``.

    Stops at an end-of-sequence id, a stop string or ``max_new_tokens``. Returns (text, token ids).
    """
    eos = stop_token_ids(model, tokenizer)
    tokens: list[int] = []
    logits = first_logits
    for step in range(config.max_new_tokens):
        token = int(logits.argmax())
        if token in eos:
            break
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if any(s in text for s in config.stop_strings):
            break
        if step + 1 < config.max_new_tokens:
            logits = prefill(model, cache, torch.tensor([token]), start + step)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for s in config.stop_strings:
        text = text.split(s)[0]
    return text.strip(), tokens
