"""What Dynamo's trace of a Llama costs by itself: with and without peft's LoRA adapters, with the
frozen linears in bf16 and in NF4.

A backend that returns the captured graph unchanged leaves only Dynamo's own work in the first call,
so the adapters and the weights' format are what differ between the rows. Tiny dimensions: the trace's cost
follows the number of operations and graph inputs, not their sizes.

    python bench/trace_time.py --layers 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def trace(layers: int, quantized: bool, lora: bool) -> dict:
    import torch
    from torch._dynamo.utils import compilation_time_metrics

    import lowmem_compile
    from tests.models import batch, tiny_model

    torch._dynamo.reset()
    compilation_time_metrics.clear()
    model = tiny_model("llama", lora=lora, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, dtype=torch.bfloat16)
    if quantized:
        lowmem_compile.quantize_(model)
    seen = {}

    def backend(gm, example_inputs):
        seen.update(inputs=len(example_inputs), nodes=len(gm.graph.nodes))
        return gm.forward

    start = time.perf_counter()
    torch.compile(model, backend=backend)(**batch(seq=64))
    return {"lora": lora, "weights": "nf4" if quantized else "bf16", "layers": layers, "first_call_s": round(time.perf_counter() - start, 1),
            "bytecode_tracing_s": round(sum(compilation_time_metrics.get("bytecode_tracing", [])), 1), **seen}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args()
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    for lora in (False, True):
        for quantized in (False, True):
            print(trace(args.layers, quantized, lora), flush=True)


if __name__ == "__main__":
    main()
