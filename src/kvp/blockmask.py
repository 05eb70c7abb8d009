"""The block-mask joint forward: training path and proof of the equivalence (Figure 2).

See docs/method.md#block-mask-equivalence.

One forward over ``[preamble][wrapped doc 1]…[wrapped doc N][final block]`` with global positions
0..N-1 and a 4-D additive mask in which every chunk attends causally only to itself and the final
block (task prompt, plus teacher tokens in training) attends causally to everything. Because RoPE is
relative, this equals encoding each chunk at position 0, re-rotating it to its offset and
concatenating the caches, then prefilling the final block against that cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvp.cache import chunk_offsets
from kvp.packet import PacketWrapper, wrap_embeddings


@dataclass(frozen=True)
class Layout:
    """Segment boundaries of a joint sequence, as (start, stop) token ranges.

    ``docs[i]`` covers header + document + trailer of document i; ``headers``/``trailers``/
    ``bodies`` split it further; ``final`` is the last (fully attending) block.
    """

    preamble: tuple[int, int]
    docs: list[tuple[int, int]]
    headers: list[tuple[int, int]]
    bodies: list[tuple[int, int]]
    trailers: list[tuple[int, int]]
    final: tuple[int, int]

    @property
    def length(self) -> int:
        return self.final[1]

    def chunks(self) -> list[tuple[int, int]]:
        return [self.preamble, *self.docs, self.final]


def make_layout(n_preamble: int, doc_lengths: list[int], n_final: int, h: int = 0,
                t: int = 0) -> Layout:
    """Layout of preamble, N wrapped documents (h + n_doc + t each) and the final block."""
    lengths = [n_preamble] + [h + n + t for n in doc_lengths] + [n_final]
    starts = chunk_offsets(lengths)
    docs = [(starts[i + 1], starts[i + 1] + lengths[i + 1]) for i in range(len(doc_lengths))]
    return Layout(
        preamble=(0, n_preamble), docs=docs,
        headers=[(a, a + h) for a, _ in docs],
        bodies=[(a + h, b - t) for a, b in docs],
        trailers=[(b - t, b) for _, b in docs],
        final=(starts[-1], starts[-1] + n_final),
    )


def block_mask(layout: Layout, dtype: torch.dtype, device: torch.device | str = "cpu"
               ) -> torch.Tensor:
    """Additive mask (1, 1, N, N): 0 where attention is allowed, dtype-min elsewhere.

    Every chunk is causal within itself; the final block is causal over the whole sequence.
    """
    n = layout.length
    allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
    for start, stop in [layout.preamble, *layout.docs]:
        allowed[start:stop, start:stop] = True
    allowed[layout.final[0]:, :] = True
    allowed &= torch.ones(n, n, dtype=torch.bool, device=device).tril()  # causal
    mask = torch.zeros(n, n, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]  # (1, 1, N, N)


def joint_embeddings(model, preamble_ids: torch.Tensor, doc_ids: list[torch.Tensor],
                     final_ids: torch.Tensor, wrapper: PacketWrapper | None = None
                     ) -> tuple[torch.Tensor, Layout]:
    """Embeddings (N, d_model) of the joint sequence and its layout; differentiable in the wrapper."""
    embed = model.get_input_embeddings()
    pieces = [embed(preamble_ids.to(model.device))]
    pieces += [wrap_embeddings(model, ids, wrapper) for ids in doc_ids]
    pieces.append(embed(final_ids.to(model.device)))
    h, t = (wrapper.h, wrapper.t) if wrapper is not None else (0, 0)
    layout = make_layout(len(preamble_ids), [len(d) for d in doc_ids], len(final_ids), h, t)
    return torch.cat(pieces, dim=0), layout


def block_forward(model, preamble_ids: torch.Tensor, doc_ids: list[torch.Tensor],
                  final_ids: torch.Tensor, wrapper: PacketWrapper | None = None,
                  output_attentions: bool = False):
    """Run the block-mask forward; returns (logits of the final block (n_final, V), layout, outputs).

    ``outputs.attentions`` is filled when ``output_attentions`` and the model uses eager attention.
    """
    embeds, layout = joint_embeddings(model, preamble_ids, doc_ids, final_ids, wrapper)
    dtype = model.dtype
    mask = block_mask(layout, dtype, model.device)
    positions = torch.arange(layout.length, device=model.device)[None]  # (1, N)
    out = model(inputs_embeds=embeds[None].to(dtype), attention_mask=mask, position_ids=positions,
                use_cache=False, output_attentions=output_attentions)
    return out.logits[0, layout.final[0]:], layout, out


def block_forward_batch(model, items: list[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]],
                        wrapper: PacketWrapper | None, keep: int) -> torch.Tensor:
    """Block-mask forwards of B sequences in one batch; logits (B, keep, V) of each sequence's
    last ``keep`` positions.

    ``items`` are (preamble ids, [doc ids], final ids) as for :func:`block_forward`. Sequences are
    left-padded to the longest, so every one ends at the last column and the last ``keep``
    positions of each come out of the LM head together (``keep`` ≤ the shortest sequence; a
    caller reads only the rows of its own final block). Pad
    positions attend only to themselves and no real token attends to them, so each sequence's
    logits equal its own :func:`block_forward` (up to floating-point reduction order).
    """
    embeds, layouts = zip(*(joint_embeddings(model, *item, wrapper) for item in items))
    if keep > min(l.length for l in layouts):
        raise ValueError(f"keep={keep} is longer than the shortest sequence")
    length = max(l.length for l in layouts)
    dtype, device = model.dtype, model.device
    x = torch.stack([torch.nn.functional.pad(e, (0, 0, length - len(e), 0))
                     for e in embeds])  # (B, L, d_model), left-padded
    mask = torch.full((len(items), 1, length, length), torch.finfo(dtype).min, dtype=dtype,
                      device=device)
    positions = torch.zeros(len(items), length, dtype=torch.long, device=device)  # (B, L)
    pad_rows = torch.arange(length, device=device)
    for b, layout in enumerate(layouts):
        pad = length - layout.length
        mask[b, 0, pad:, pad:] = block_mask(layout, dtype, device)[0, 0]
        mask[b, 0, pad_rows[:pad], pad_rows[:pad]] = 0  # a pad token sees only itself
        positions[b, pad:] = torch.arange(layout.length, device=device)
    out = model(inputs_embeds=x.to(dtype), attention_mask=mask, position_ids=positions,
                use_cache=False, logits_to_keep=keep)
    return out.logits  # (B, keep, V)
