"""4- and 8-bit models (bitsandbytes, CUDA): packets still equal the block-mask forward.

The encode-and-re-rotate ≡ block-mask equivalence (docs/method.md#block-mask-equivalence) is a
property of the attention pattern, not of the weights' precision, so it must hold for quantized
weights too, up to the bf16 rounding of the compute; full attention over the same sequence must
differ by much more (so the check can fail).
"""

from __future__ import annotations

import pytest
import torch

from kvp.blockmask import block_forward
from kvp.cache import to_cache
from kvp.methods import make_context
from kvp.models import load_model
from kvp.packet import PacketStore, PacketWrapper, assemble, build_packet

DOCS = ["Maria Lindqvist was born on 14 March 1985 in Gothenburg. She studied law at Lund "
        "University and now works for Ericsson in Stockholm.\n\n",
        "Tomasz Nowak was born on 2 July 1979 in Krakow. He studied architecture at Warsaw "
        "University of Technology and now works for Siemens in Munich.\n\n"]
QUESTION = "Where was Maria Lindqvist born? Respond with the answer only."


@pytest.mark.gpu
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_packets_equal_the_block_mask_forward(bits):
    pytest.importorskip("bitsandbytes", reason="4/8-bit loading needs bitsandbytes")
    model, tokenizer, _ = load_model("qwen2.5-coder-0.5b", device="cuda", dtype="bfloat16",
                                     quantize=bits)
    assert type(model.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "".join(DOCS) + QUESTION}],
                                         tokenize=False, add_generation_prompt=True)
    start = text.index(DOCS[0])
    preamble, task = text[:start], text[start + len("".join(DOCS)):]
    wrapper = PacketWrapper.init_from_embeddings(model, 4, 4, seed=1, model_name="qwen2.5-coder-0.5b")
    ctx = make_context(model, tokenizer, PacketStore(model, tokenizer, "q"), preamble, DOCS, task,
                       wrapper)
    kv, n = assemble(model, ctx.preamble_kv, [build_packet(model, tokenizer, d, wrapper) for d in DOCS])
    ids = ctx.task_ids.to(model.device)
    with torch.no_grad():
        fast = model(input_ids=ids[None], past_key_values=to_cache(kv.keys, kv.values),
                     position_ids=torch.arange(n, n + len(ids), device=model.device)[None]).logits[0]
        slow, layout, _ = block_forward(model, ctx.preamble_ids, ctx.doc_ids, ctx.task_ids, wrapper)
        joint = torch.cat([ctx.preamble_ids, *ctx.doc_ids, ctx.task_ids])[None].to(model.device)
        full = model(joint).logits[0, -len(ids):]
    assert layout.final[0] == n
    fast, slow, full = fast.float(), slow.float(), full.float()
    gap = (fast - slow).abs().max()
    assert gap < 0.05 * slow.abs().max(), gap
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() >= 0.9
    assert (full - slow).abs().max() > 4 * gap  # a different attention pattern is far away
