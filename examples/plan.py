"""Predict the peak memory of a LoRA training step on Llama-3-8B's (or 70B's) shape without running it.

    python examples/plan.py --layers 2 --seq 8192 --options '{"remat": "full", "offload": "layers"}'

Builds the model on the CPU (random weights, `--layers` decoder layers: the per-layer transient does
not depend on the count), quantizes its frozen linears to NF4, optionally moves the embedding table
to host memory, and prints `lowmem_compile.plan`'s report: what each pass would do and the cost
model's predicted peak, with where it falls. Nothing is compiled to code or run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lowmem_compile  # noqa: E402
from bench.e2e import MODELS, add_lora, build_model, llama_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--options", default="{}", help="lowmem options (JSON)")
    p.add_argument("--host-embeddings", action="store_true", help="offload_embeddings_ before planning")
    p.add_argument("--no-cache", action="store_true", help="model.config.use_cache = False (no K/V cache returned)")
    args = p.parse_args()
    model = add_lora(build_model(llama_config(args.model, args.layers, args.seq), "cpu", 0), False)
    lowmem_compile.quantize_(model)
    if args.host_embeddings:
        lowmem_compile.offload_embeddings_(model)
    if args.no_cache:
        model.config.use_cache = False
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = lowmem_compile.plan(model, input_ids=ids, labels=ids, options=json.loads(args.options))
    print(f"{args.model} shape, {args.layers} layers, seq {args.seq}, options {args.options}")
    print(report)


if __name__ == "__main__":
    main()
