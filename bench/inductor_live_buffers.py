"""How many buffers of one shape Inductor's generated code holds at once, against the cost model.

    TORCH_LOGS=output_code python bench/inductor_live_buffers.py 2> output_code.txt
    python bench/inductor_live_buffers.py --count output_code.txt

The first command compiles the lean step of a tiny LoRA Llama on the CPU (hidden 64, intermediate
320, 3 layers, 8192 tokens: the MLP in 4 pieces of 2048) and logs Inductor's generated code; the
second reads each generated `call` and reports, per graph, the most [2048, 320] buffers (one MLP
piece's intermediate) allocated and not yet deleted at one time. Why: the liveness walk
(`cost/liveness.py`) frees and allocates node by node, while a fused kernel holds all its inputs and
outputs together; docs/remat.md ("A known miss") compares the two.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ALLOC = re.compile(r"(buf\d+) = empty_strided_cpu\(\(([\d, ]*)\), \([\d, ]*\), torch\.(\w+)\)")
DELETE = re.compile(r"del ([\w, ]+)")


def lean_step():
    """The tiny LoRA NF4 Llama, its 8192-token batch and the lean options: (model, input ids, options).
    bench/model_piece_buffers.py plans the same step."""
    import lowmem_compile
    from tests.models import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama", lora=True, hidden_size=64, intermediate_size=320, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, dtype=torch.float32)
    lowmem_compile.quantize_(model)
    model.config.use_cache = False
    ids = torch.randint(0, model.config.vocab_size, (1, 8192))
    options = {"remat": "full", "offload": "layers", "logits": "drop", "mlp_chunks": "auto", "attention": "kv16"}
    return model, ids, options


def compile_and_log() -> None:
    import lowmem_compile

    model, ids, options = lean_step()
    torch.compile(model, backend="lowmem", options=options)(input_ids=ids, labels=ids).loss.backward()
    print(lowmem_compile.last_report())


def live_most(code: str, weight) -> list[tuple[int, int]]:
    """(weight allocated, most weight allocated and not yet deleted at once) for each generated `call`
    of `code`, in order, each buffer weighing `weight(shape, dtype)`. Buffers reused in place of a
    dead one (`bufB = bufA; del bufA  # reuse`) are not seen: compile with `allow_buffer_reuse` off
    for bytes."""
    rows = []
    for body in code.split("def call(")[1:]:
        live, most, allocated = {}, 0, 0
        for line in body.split("def benchmark_compiled_module")[0].splitlines():
            if match := ALLOC.search(line):
                shape = tuple(int(d) for d in match.group(2).split(",") if d.strip())
                live[match.group(1)] = w = weight(shape, getattr(torch, match.group(3)))
                allocated += w
            for names in DELETE.findall(line):
                for name in names.split(","):
                    live.pop(name.strip(), None)
            most = max(most, sum(live.values()))
        rows.append((allocated, most))
    return rows


def count(path: str) -> list[tuple[int, int]]:
    """(piece buffers allocated, most live at once) for each generated `call` in a logged file."""
    return live_most(open(path).read(), lambda shape, dtype: int(shape in ((2048, 320), (1, 2048, 320))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", metavar="LOG", help="count the piece buffers in a logged output_code file")
    args = p.parse_args()
    if args.count is None:
        compile_and_log()
        return
    for i, (allocated, most) in enumerate(count(args.count), 1):
        print(f"generated call {i}: {allocated} [2048, 320] buffers allocated, at most {most} live at once")


if __name__ == "__main__":
    main()
