"""A/B of the GEMV's nibble decode in one process: the kernels as committed (nibbles cut from the
32-bit words of the chunk, 2 integer ops a nibble) against the same file with the previous decode
(bytes widened to int32, each byte's two nibbles split). GPU time by CUDA-graph replay of 20 calls,
3 rounds, order rotated, medians; cuBLAS bf16 beside. Run from the repository root on a GPU:

    OUT=<folder> python3 bench/results/nf4_decode/2026-11-30/ab_decode.py
"""
import importlib.util
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.getcwd())
from bench._common import environment, graph_replay_ms  # noqa: E402
from lowmem_compile.codegen import nf4_matmul as new  # noqa: E402
from lowmem_compile.formats.nf4 import NF4Weight  # noqa: E402

NEW_DECODE = '''    byte = tl.load(packed_ptr + start[:, None] + tl.arange(0, 16)[None, :], mask=ok[:, None], other=0).to(tl.uint32)
    scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, start // (BLOCKSIZE // 2), ok, NESTED)
    b0, b1, b2, b3 = _quarters(byte)  # byte 4·l + k of the chunk: plane k, lane l
    word = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)  # the loaded register itself, once compiled
    # [C, 4, 2, 2, 2]: lane l, byte 4·l + 2·i + j, high nibble first (element order once flattened)
    nibble = tl.join(tl.join(tl.join(word >> 4, word >> 20), tl.join(word >> 12, word >> 28)),
                     tl.join(tl.join(word, word >> 16), tl.join(word >> 8, word >> 24))) & 0xF
    index = tl.reshape(nibble, (C * 32,)).to(tl.int32)
'''
OLD_DECODE = '''    byte = tl.load(packed_ptr + start[:, None] + tl.arange(0, 16)[None, :], mask=ok[:, None], other=0).to(tl.int32)
    scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, start // (BLOCKSIZE // 2), ok, NESTED)
    index = tl.reshape(tl.join(byte >> 4, byte & 0xF), (C * 32,))  # high nibble first
'''


def previous_module():
    src = open(new.__file__).read()
    assert NEW_DECODE in src, "the committed decode changed: update this script"
    src = src.replace(NEW_DECODE, OLD_DECODE).replace("from ..formats import nf4", "from lowmem_compile.formats import nf4")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "nf4_matmul_previous.py")
    open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location("nf4_matmul_previous", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    old = previous_module()
    rows, errors = [], []
    for k, n in [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q = NF4Weight.from_float(w, 64, double_quant=True)
        w_dq = q.dequantize(torch.bfloat16)
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            for direction in ("fwd", "bwd"):
                def call(mod, direction=direction, x=x, gy=gy):
                    if direction == "fwd":
                        return mod.linear(x, q.packed, q.absmax, q.shape, 64, None, q.absmax2, q.code2, q.offset, strategy="gemv")
                    return mod.linear_backward(gy, q.packed, q.absmax, q.shape, 64, q.absmax2, q.code2, q.offset, strategy="gemv")
                fns = {"cublas": (lambda: torch.nn.functional.linear(x, w_dq)) if direction == "fwd" else (lambda: gy @ w_dq),
                       "previous": lambda: call(old), "words": lambda: call(new)}
                a, b = fns["previous"]().float(), fns["words"]().float()
                ref = fns["cublas"]().float()
                for name, got in (("previous", a), ("words", b)):
                    err = ((got - ref).norm() / ref.norm()).item()
                    if err > 1e-2:
                        errors.append(f"{name} {direction} {k}->{n} M={m}: {err:.2e}")
                if not torch.equal(a, b):
                    errors.append(f"previous and words differ {direction} {k}->{n} M={m}")
                names = list(fns)
                times = {name: [] for name in names}
                for r in range(3):
                    for name in names[r:] + names[:r]:
                        times[name].append(graph_replay_ms(fns[name], calls=20) * 1e3)
                row = {"K": k, "N": n, "M": m, "dir": direction, **{f"{k_}_us": statistics.median(v) for k_, v in times.items()},
                       "rounds_us": times, "fma": new.uses_fma(m, n, k, direction)}
                rows.append(row)
                print(f"{k}->{n} M={m} {direction} {'fma' if row['fma'] else 'dot'}: cublas {row['cublas_us']:.1f} previous {row['previous_us']:.1f} "
                      f"words {row['words_us']:.1f} us  ({row['previous_us'] / row['words_us']:.3f}x; vs cuBLAS {row['cublas_us'] / row['words_us']:.2f}x)", flush=True)
    out = os.environ.get("OUT", ".")
    json.dump({"environment": environment(), "rows": rows, "errors": errors}, open(os.path.join(out, "ab_decode.json"), "w"), indent=1)
    print("errors:", errors or "none")


if __name__ == "__main__":
    main()
