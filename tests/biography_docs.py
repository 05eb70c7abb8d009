"""The shared sample of the core equivalence tests: three short biographies, a question, and the
chat-template text around them."""

from __future__ import annotations

import torch

from kvp.cache import to_cache

DOCS = [
    "Maria Lindqvist was born on 14 March 1987 in Gothenburg. She studied chemistry at Uppsala "
    "University and now works for Ericsson in Stockholm.\n\n",
    "Tomasz Nowak was born on 2 July 1979 in Krakow. He studied architecture at Warsaw University "
    "of Technology and now works for Siemens in Munich.\n\n",
    "Aiko Tanaka was born on 30 May 1990 in Osaka. She studied economics at Kyoto University and "
    "now works for Toyota in Nagoya.\n\n",
]
QUESTION = "Where was Maria Lindqvist born? Respond with the answer only."


def segments(tokenizer, docs=DOCS, question=QUESTION):
    """Preamble / documents / task strings that concatenate to the chat template's text."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "".join(docs) + question}],
                                         tokenize=False, add_generation_prompt=True)
    start = text.index(docs[0])
    return text[:start], list(docs), text[start + len("".join(docs)):]


def all_logits_after(model, kv, ids: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) of ``ids`` prefilled after an assembled cache (the slow path: every position)."""
    cache = to_cache(kv.keys, kv.values)
    pos = torch.arange(kv.length, kv.length + len(ids))[None]
    with torch.no_grad():
        return model(input_ids=ids[None], past_key_values=cache, position_ids=pos).logits[0]
