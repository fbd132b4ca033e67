"""The most [2048, 320] piece buffers the liveness walk holds at once, for the tiny lean step that
bench/inductor_live_buffers.py compiles (the same model, options and 8192 tokens), planned only.

    python bench/model_piece_buffers.py

Every graph pair the remat pass simulates is walked again with each [.., 2048, 320] tensor counted
as 1 byte and every other as 0, so a walk's peak is a count of piece buffers.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sympy  # noqa: E402
import torch  # noqa: E402

import lowmem_compile  # noqa: E402
import lowmem_compile.passes.remat as remat  # noqa: E402
from lowmem_compile.cost import liveness  # noqa: E402
from tests.models import tiny_model  # noqa: E402

seen = []
simulate = remat.simulate_step


def record(fw, bw, num_out, **kwargs):
    seen.append((fw, bw, num_out, kwargs["fused"]))
    return simulate(fw, bw, num_out, **kwargs)


remat.simulate_step = record
torch.manual_seed(0)
model = tiny_model("llama", lora=True, hidden_size=64, intermediate_size=320, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, dtype=torch.float32)
lowmem_compile.quantize_(model)
model.config.use_cache = False
ids = torch.randint(0, model.config.vocab_size, (1, 8192))
options = {"remat": "full", "offload": "layers", "logits": "drop", "mlp_chunks": "auto", "attention": "kv16"}
lowmem_compile.plan(model, input_ids=ids, labels=ids, options=options)

liveness._Sizes.of = lambda self, val: (
    int(val is not None and tuple(val.shape)[-2:] == (2048, 320) and val.numel() == 2048 * 320), sympy.Integer(0))
walked = set()
for fw, bw, num_out, fused in seen:
    if id(bw) not in walked:
        walked.add(id(bw))
        m = liveness.simulate_step(fw, bw, num_out, fused=fused)
        print(f"graph pair {len(walked)}: forward most {m.forward_peak}, backward most {m.backward_peak - m.held} piece buffers live at once")
