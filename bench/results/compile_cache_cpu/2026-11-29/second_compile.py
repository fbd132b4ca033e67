"""A second compile of the same graph, in the same process after `lowmem_compile.reset()`, in a
fresh cache folder: a tiny bf16 Llama (tests/models.py) with NF4 weights, `remat="full"` and
`offload="layers"`, one training step each time. Prints each compile+step's seconds, AOTAutograd's
cache counters, whether the LoRA gradients are bit-identical, and the second report's remat note.

    PYTHONPATH=. python bench/results/compile_cache_cpu/2026-11-29/second_compile.py
"""
import os
import tempfile
import time
import warnings

import torch

warnings.simplefilter("ignore")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
import lowmem_compile  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from tests.models import batch, tiny_model, trainable_grads  # noqa: E402

print(f"torch {torch.__version__}")
grads, reports = [], []
for i in range(2):
    lowmem_compile.reset()
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16)
    lowmem_compile.quantize_(model)
    start = time.time()
    torch.compile(model, backend="lowmem", options={"offload": "layers", "remat": "full"})(**batch()).loss.backward()
    grads.append(trainable_grads(model))
    reports.append(lowmem_compile.last_report().to_dict())
    print(f"compile {i + 1}: {time.time() - start:.1f} s (compile and one step), {dict(counters['aot_autograd'])}")
same = all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
print(f"LoRA gradients bit-identical: {same} ({len(grads[0])} tensors)")
print(f"predicted peak {reports[0]['remat']['predicted_peak_bytes']} / {reports[1]['remat']['predicted_peak_bytes']} bytes;"
      f" second report's last note: {reports[1]['remat']['notes'][-1]}")
