"""The fused NF4 forward (W decoded inside the matmul's loop) against dequant + cuBLAS, on a GPU.

For each Llama-3-8B projection and M in {256, 2048, 8192} tokens, bf16: cuBLAS on the 16-bit weight,
our dequant + cuBLAS, the fused kernel at each of its candidate tiles, and a Triton matmul of the
same tile that reads a 16-bit W (the fused kernel without its decode: the ceiling its mainloop can
reach). Every result is checked against a float64 product (1e-2 relative); times are GPU time
(CUDA-graph replay), median of 3 rounds in rotated order. Decides whether, and at which shapes,
the per-shape choice should take the fused kernel.

    OUT=<folder> python bench/nf4_fused.py        # $OUT/nf4_fused.{json,md}
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lowmem_compile.codegen import nf4_matmul  # noqa: E402
from lowmem_compile.formats.nf4 import NF4Weight  # noqa: E402
from bench._common import environment, graph_replay_ms, markdown_table  # noqa: E402

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N)
TOKENS = [256, 2048, 8192]
#: (BLOCK_N, BLOCK_M, BLOCK_K, GROUP, warps, stages)
TILES = [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3),
         (64, 256, 64, 8, 4, 3)]
ROUNDS = 3


@triton.jit
def _bf16_mm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """yᵀ tile = W tile · xᵀ tile with W read in 16 bits: the fused kernel's loop without the decode."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    first_n = (pid // (GROUP * grid_m)) * GROUP
    size = tl.minimum(tl.cdiv(N, BLOCK_N) - first_n, GROUP)
    pid_n = first_n + (pid % (GROUP * grid_m)) % size
    pid_m = (pid % (GROUP * grid_m)) // size
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    toks = tl.minimum(offs_m, M - 1).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + ks[None, :])
        xt = tl.load(x_ptr + toks[None, :] * K + ks[:, None])
        acc = tl.dot(w, xt, acc)
    tl.store(y_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


def _bf16_mm(x, w, tile):
    bn, bm, bk, group, warps, stages = tile
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _bf16_mm_kernel[(triton.cdiv(n, bn) * triton.cdiv(m, bm),)](x, w, y, m, n, k, BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk,
                                                               GROUP=group, num_warps=warps, num_stages=stages)
    return y


def _rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def main() -> None:
    out_dir = os.environ.get("OUT", "bench/results/nf4_fused")
    os.makedirs(out_dir, exist_ok=True)
    dtype = torch.bfloat16
    rows, errors = [], []
    for k, n in SHAPES:
        q = NF4Weight.from_float(torch.randn(n, k, device="cuda") * 0.02, 64, double_quant=True)
        w = q.dequantize(dtype)
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ w.double().T
            weight = (q.packed, q.absmax, q.shape, 64)
            nested = (q.absmax2, q.code2, q.offset)
            fns = {"cublas": lambda: torch.nn.functional.linear(x, w),
                   "dequant_mm": lambda: nf4_matmul.linear(x, *weight, None, *nested, strategy="dequant"),
                   "fused": lambda: nf4_matmul.linear(x, *weight, None, *nested, strategy="fused")}
            for tile in TILES:
                name = "x".join(map(str, tile))
                fns[f"fused_{name}"] = lambda tile=tile: nf4_matmul._fused_linear(x, *weight, None, *nested, tile=tile)
                fns[f"tritonmm_{name}"] = lambda tile=tile: _bf16_mm(x, w, tile)
            times = {name: [] for name in fns}
            for name, fn in fns.items():
                err = _rel(fn(), ref)
                if err > 1e-2:
                    errors.append(f"{name} {k}->{n} M={m}: rel err {err:.2e}")
            names = list(fns)
            for r in range(ROUNDS):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    times[name].append(graph_replay_ms(fns[name]) * 1e3)
            row = {"K": k, "N": n, "M": m, **{f"{name}_us": statistics.median(t) for name, t in times.items()}}
            rows.append(row)
            best = min((v, key) for key, v in row.items() if key.startswith("fused_"))
            print(f"{k}->{n} M={m}: cublas {row['cublas_us']:.1f} dequant_mm {row['dequant_mm_us']:.1f} "
                  f"fused {row['fused_us']:.1f} best {best[1]} {best[0]:.1f}", flush=True)
    header = ["K->N", "M", "cublas", "dequant_mm", "fused (chosen tile)"] + [f"fused {'x'.join(map(str, t))}" for t in TILES] \
        + [f"tritonmm {'x'.join(map(str, t))}" for t in TILES] + ["fused/cuBLAS speed"]
    table = [[f"{r['K']}->{r['N']}", r["M"], *(f"{r[c]:.1f}" for c in ("cublas_us", "dequant_mm_us", "fused_us")),
              *(f"{r['fused_' + 'x'.join(map(str, t)) + '_us']:.1f}" for t in TILES),
              *(f"{r['tritonmm_' + 'x'.join(map(str, t)) + '_us']:.1f}" for t in TILES),
              f"{r['cublas_us'] / r['fused_us']:.2f}x"] for r in rows]
    md = "GPU µs (CUDA-graph replay, median of 3 rotated rounds), bf16\n\n" + markdown_table(header, table)
    with open(os.path.join(out_dir, "nf4_fused.json"), "w") as f:
        json.dump({"environment": environment(), "rows": rows, "errors": errors}, f, indent=1)
    with open(os.path.join(out_dir, "nf4_fused.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print("errors:", errors or "none")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
