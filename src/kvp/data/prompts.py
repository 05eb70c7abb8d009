"""Chat prompts split into the segments that KV Packet caches separately (docs/method.md#preamble).

A sample becomes one user turn::

    <template prefix: system prompt, user header>
    {instruction}\\n{few-shot text}\\n            <- preamble (encoded once at position 0)
    {document 1}\\n ... {document N}\\n           <- one segment per document (one packet each)
    {question}\\n{answer instruction}
    <template suffix: end of turn, assistant header>   <- task (prefilled at query time)

Invariant: ``preamble + "".join(documents) + task`` equals
``tokenizer.apply_chat_template(build_conversation(...), tokenize=False,
add_generation_prompt=True)``. Documents end with a single ``"\\n"``: a piece that ends in
``"\\n\\n"`` tokenizes differently alone than inside the joint text for GPT-2-style
pre-tokenizers (SmolLM2's), while one ``"\\n"`` gives the same tokens both ways.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvp.data import DATASETS, DOMAINS, Sample
from kvp.generate import GenerationConfig

SEPARATOR = "\n"
PLACEHOLDER = "\x00KVP-USER-CONTENT\x00"
SHORT_ANSWER = "Respond with the answer only. Answer:"
REASONING = ('Think step by step, then give the final answer on a last line of the form '
             '"Short Answer: <answer>", with the answer in a few words.')
INSTRUCTIONS = {
    "biography": "Answer the question about a person using the biographies below.",
    "niah": "Below is a long text with some special magic numbers hidden in it. "
            "Find the number asked for in the question.",
    "multihop": "Answer the question by combining facts from several of the documents below.",
    "products": "Answer the question about a product using the product sheets below.",
    "events": "Answer the question about an event using the reports below.",
    "abstracts": "Answer the question about a study using the abstracts below.",
    "tables": "Answer the question using the weather tables below.",
    "codedocs": "Answer the question about a function using the documentation below.",
    "hotpotqa": "Answer the question using the documents below.",
    "musique": "Answer the question using the documents below.",
    "jsonl": "Answer the question using the documents below.",
}
ANSWER_INSTRUCTIONS = {
    **{name: SHORT_ANSWER for name in INSTRUCTIONS},
    "niah": "Respond with the special magic number(s) only, separated by spaces. Answer:",
    "hotpotqa": REASONING,
    "musique": REASONING,
}
REASONING_DATASETS = ("hotpotqa", "musique")
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>",
                       "</s>")


@dataclass(frozen=True)
class PromptSegments:
    """The prompt as text pieces: ``preamble + "".join(documents) + task`` is the full prompt."""

    preamble: str
    documents: list[str]
    task: str

    @property
    def text(self) -> str:
        """The joint prompt text."""
        return self.preamble + "".join(self.documents) + self.task


def dataset_of(sample: Sample, dataset: str | None) -> str:
    """The dataset whose instructions apply: ``dataset``, else ``sample.meta["dataset"]``."""
    name = dataset or sample.meta.get("dataset", "jsonl")
    if name not in ANSWER_INSTRUCTIONS:
        raise ValueError(f"no prompt for dataset {name!r}; use one of {list(ANSWER_INSTRUCTIONS)} "
                         f"(dataset=... overrides sample.meta['dataset'])")
    return name


def line(text: str) -> str:
    """``text`` without surrounding whitespace plus one separator; empty text stays empty."""
    return text.strip() + SEPARATOR if text.strip() else ""


def user_parts(sample: Sample, dataset: str | None = None, instruction: str | None = None,
               few_shot: str | None = None) -> tuple[str, list[str], str]:
    """(head, documents, tail) of the user message; ``instruction=""`` drops the instruction."""
    name = dataset_of(sample, dataset)
    head = line(INSTRUCTIONS[name] if instruction is None else instruction) + line(few_shot or "")
    tail = line(sample.question) + ANSWER_INSTRUCTIONS[name]
    return head, [line(doc) for doc in sample.documents], tail


def build_conversation(sample: Sample, dataset: str | None = None, instruction: str | None = None,
                       few_shot: str | None = None, system: str | None = None) -> list[dict]:
    """The chat messages of a sample: an optional system message and one user message."""
    head, documents, tail = user_parts(sample, dataset, instruction, few_shot)
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": head + "".join(documents) + tail}]


def render(tokenizer, messages: list[dict]) -> str:
    """The chat template applied to ``messages`` with the assistant header appended."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; use an "
                         "instruct model or set tokenizer.chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_segments(tokenizer, sample: Sample, dataset: str | None = None,
                   instruction: str | None = None, few_shot: str | None = None,
                   system: str | None = None) -> PromptSegments:
    """Split the chat prompt of ``sample`` into preamble, document and task segments.

    Args:
        tokenizer: a tokenizer with a chat template.
        sample: the sample; its documents keep their order.
        dataset: whose instructions to use (default ``sample.meta["dataset"]``).
        instruction: text after the user header (default per dataset; ``""`` for none).
        few_shot: worked examples placed in the preamble, after the instruction.
        system: a system message; ``None`` keeps the template's default (SmolLM2 and Qwen2.5
            inject one).

    Raises ``ValueError`` if the template alters the message content (e.g. trims it), since the
    segments could then not reproduce the template's text exactly.
    """
    head, documents, tail = user_parts(sample, dataset, instruction, few_shot)
    messages = build_conversation(sample, dataset, instruction, few_shot, system)
    skeleton = render(tokenizer, [*messages[:-1], {"role": "user", "content": PLACEHOLDER}])
    if skeleton.count(PLACEHOLDER) != 1:
        raise ValueError("the chat template does not copy the user message verbatim exactly once; "
                         "prompt segments need a template that does")
    prefix, suffix = skeleton.split(PLACEHOLDER)
    segments = PromptSegments(preamble=prefix + head, documents=documents, task=tail + suffix)
    if segments.text != render(tokenizer, messages):
        raise ValueError("the chat template transforms the message content (trimming or "
                         "escaping), so the prompt cannot be split into segments exactly; "
                         "strip the documents and question of surrounding whitespace")
    return segments


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` alone, without added special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def segment_ids(tokenizer, segments: PromptSegments) -> tuple[list[int], list[list[int]], list[int]]:
    """(preamble ids, ids per document, task ids), each piece tokenized alone.

    The preamble's special tokens come from the template's text (``<|im_start|>`` etc.), so no
    special tokens are added. For the embedded models the concatenation equals the ids of the
    joint text (a test checks this).
    """
    return (encode(tokenizer, segments.preamble),
            [encode(tokenizer, doc) for doc in segments.documents],
            encode(tokenizer, segments.task))


# Greedy decoding budgets in tokens (docs/protocol.md#datasets).
MAX_NEW_TOKENS = {"biography": 32, "niah": 128, "musique": 256, "hotpotqa": 512, "jsonl": 64,
                  "multihop": 32, **{name: 32 for name in DOMAINS}}


def generation_config(tokenizer, dataset: str, max_new_tokens: int | None = None):
    """Greedy decoding budget of the dataset with the tokenizer's end-of-turn markers.

    See docs/protocol.md#datasets.
    """
    budget = max_new_tokens or MAX_NEW_TOKENS.get(dataset, 64)
    return GenerationConfig(max_new_tokens=budget, stop_strings=tuple(stop_strings(tokenizer)))


def stop_strings(tokenizer) -> list[str]:
    """End-of-turn markers this tokenizer knows (its EOS token first), for stopping generation."""
    vocab = tokenizer.get_vocab()
    found = [tokenizer.eos_token] if tokenizer.eos_token else []
    return found + [m for m in END_OF_TURN_MARKERS if m in vocab and m not in found]


def extract_answer(text: str, dataset: str) -> str:
    """The short answer inside a generation.

    * hotpotqa / musique: the text after the last ``Short Answer:`` label; without one, the last
      non-empty line;
    * niah: the numbers in the generation, space-separated (the answers are magic numbers; a
      sentence around them is not part of the answer);
    * every other dataset (biography, the generated domains, multihop, jsonl): the first
      non-empty line.

    A leading ``Answer:`` label is removed in every case.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {list(DATASETS)}")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    if dataset in REASONING_DATASETS:
        labelled = re.findall(r"short answer\s*:\s*(.*)", text, flags=re.IGNORECASE)
        answer = labelled[-1] if labelled else lines[-1]
    elif dataset == "niah":
        return " ".join(re.findall(r"\d+", text))
    else:
        answer = lines[0]
    return re.sub(r"^\W*answer\s*:\s*", "", answer.strip(), flags=re.IGNORECASE).strip()
