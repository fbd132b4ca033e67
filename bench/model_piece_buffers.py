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

import lowmem_compile  # noqa: E402
import lowmem_compile.passes.remat as remat  # noqa: E402
from lowmem_compile.cost import liveness  # noqa: E402
from bench.inductor_live_buffers import lean_step  # noqa: E402

seen = []
simulate = remat.simulate_step


def record(fw, bw, num_out, **kwargs):
    seen.append((fw, bw, num_out, kwargs["fused"]))
    return simulate(fw, bw, num_out, **kwargs)


remat.simulate_step = record
model, ids, options = lean_step()
lowmem_compile.plan(model, input_ids=ids, labels=ids, options=options)

liveness._Sizes.of = lambda self, val: (
    int(val is not None and tuple(val.shape)[-2:] == (2048, 320) and val.numel() == 2048 * 320), sympy.Integer(0))
walked = set()
for fw, bw, num_out, fused in seen:
    if id(bw) not in walked:
        walked.add(id(bw))
        m = liveness.simulate_step(fw, bw, num_out, fused=fused)
        print(f"graph pair {len(walked)}: forward most {m.forward_peak}, backward most {m.backward_peak - m.held} piece buffers live at once")
