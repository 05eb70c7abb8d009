"""Prompt prefill against an assembled cache, greedy decoding with stop strings, TTFT timing.

``greedy_decode`` decodes one prefilled cache; ``greedy_decode_batch`` decodes several caches of
one length at once (one forward per step for all of them, each row stopping exactly where
``greedy_decode`` would), so the weights are read once per step instead of once per sequence.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache


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
    return answer_text(tokenizer, tokens, config), tokens


def answer_text(tokenizer, tokens: list[int], config: GenerationConfig) -> str:
    """The decoded ``tokens`` cut at the first stop string, stripped."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for s in config.stop_strings:
        text = text.split(s)[0]
    return text.strip()


@dataclass(frozen=True)
class Prompted:
    """One prefilled sequence to decode: its batch-1 cache, first logits (V,), next position."""

    cache: DynamicCache
    first_logits: torch.Tensor
    start: int


def batch_cache(caches: list[DynamicCache]) -> DynamicCache:
    """Batch-1 caches of one length → one cache (B, H_kv, S, D) (public Cache API: ``layers[i].keys
    / .values`` read, ``update`` written). Caches of different lengths are refused: padding them
    would need an attention mask, which sends every step down a slower attention path."""
    lengths = {c.get_seq_length() for c in caches}
    if len(lengths) != 1:
        raise ValueError(f"caches of lengths {sorted(lengths)}: batch only caches of one length "
                         "(decode each length apart)")
    batched = DynamicCache()
    for layer in range(len(caches[0].layers)):
        batched.update(torch.cat([c.layers[layer].keys for c in caches]),
                       torch.cat([c.layers[layer].values for c in caches]), layer)
    return batched


@torch.no_grad()
def greedy_decode_batch(model, tokenizer, prompts: list[Prompted], config: GenerationConfig
                        ) -> list[tuple[str, list[int]]]:
    """``greedy_decode`` of every prompt (their caches of one length), decoded together: one
    forward per step over the rows still running (a row leaves the batch at its end-of-sequence
    id, stop string or budget); each row feeds its tokens at its own positions ``start, start+1…``.
    The input caches are not modified. Returns (text, token ids) per prompt, in order.
    """
    if not prompts:
        return []
    eos = stop_token_ids(model, tokenizer)
    cache = batch_cache([p.cache for p in prompts])
    length = cache.get_seq_length()
    tokens: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # prompt index of each batch row
    logits = torch.stack([p.first_logits for p in prompts])  # (B, V)
    for step in range(config.max_new_tokens):
        going = []
        for row, index in enumerate(rows):
            token = int(logits[row].argmax())
            if token in eos:
                continue
            tokens[index].append(token)
            text = tokenizer.decode(tokens[index], skip_special_tokens=True)
            if not any(s in text for s in config.stop_strings):
                going.append(row)
        if not going or step + 1 == config.max_new_tokens:
            break
        if len(going) < len(rows):
            cache.batch_select_indices(torch.tensor(going, device=model.device))
            rows = [rows[r] for r in going]
        ids = torch.tensor([[tokens[i][-1]] for i in rows], device=model.device)  # (B', 1)
        positions = torch.tensor([[prompts[i].start + step] for i in rows], device=model.device)
        out = model(input_ids=ids, past_key_values=cache, position_ids=positions,
                    cache_position=torch.tensor([length + step], device=model.device),
                    use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    return [(answer_text(tokenizer, t, config), t) for t in tokens]
