"""What Dynamo's trace of a Llama costs by itself: with and without peft's LoRA adapters, with the
frozen linears in bf16 and in NF4.

A backend that returns the captured graph unchanged leaves only Dynamo's own work in the first call,
so the adapters and the weights' format are what differ between the rows. Tiny dimensions: the trace's cost
follows the number of operations and graph inputs, not their sizes.

    python bench/trace_time.py --layers 32
    python bench/trace_time.py --layers 32 --frames     # the whole model against a frame per layer

`--frames`: the LoRA NF4 model without a K/V cache, traced whole (as `torch.compile(model)` does
today) against each decoder layer's `forward` called through a wrapper Dynamo skips
(`torch.compiler.disable(..., recursive=False)`), so every layer is a frame of its own: Dynamo
compiles a layer's code once and serves the others from its cache, and the trace stops growing
with depth. The backend then receives the layers' graphs apart (counted in `graphs`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def trace(layers: int, quantized: bool, lora: bool, frames: bool = False) -> dict:
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
    if frames:
        model.config.use_cache = False  # a cache's per-layer state would make each layer's frame recompile
        for layer in model.get_decoder().layers:
            layer.forward = torch.compiler.disable(_calling(layer.forward), recursive=False)
    seen = {"graphs": 0}

    def backend(gm, example_inputs):
        seen.update(inputs=len(example_inputs), nodes=len(gm.graph.nodes), graphs=seen["graphs"] + 1)
        return gm.forward

    start = time.perf_counter()
    out = torch.compile(model, backend=backend)(**batch(seq=64))
    first = time.perf_counter() - start
    row = {"lora": lora, "weights": "nf4" if quantized else "bf16", "layers": layers, "frames": frames,
           "first_call_s": round(first, 1),
           "bytecode_tracing_s": round(sum(compilation_time_metrics.get("bytecode_tracing", [])), 1), **seen}
    if frames:
        row["loss_as_eager"] = bool(torch.equal(out.loss, model(**batch(seq=64)).loss))
    return row


def _calling(forward):
    """A plain function that calls `forward`: the frame Dynamo is told to skip, so the call into
    `forward` starts a frame of its own."""

    def call(*args, **kwargs):
        return forward(*args, **kwargs)

    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--frames", action="store_true", help="the LoRA NF4 model whole against a frame per layer")
    args = p.parse_args()
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    if args.frames:
        for frames in (False, True):
            print(trace(args.layers, True, True, frames), flush=True)
        return
    for lora in (False, True):
        for quantized in (False, True):
            print(trace(args.layers, quantized, lora), flush=True)


if __name__ == "__main__":
    main()
