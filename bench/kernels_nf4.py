"""NF4 linear kernels vs cuBLAS bf16 and bitsandbytes 4-bit, on Llama-3-8B projection shapes.

For each weight (K -> N) and token count M: forward y = x Wᵀ and backward grad_x = grad_y W, bf16,
timed as GPU time (median of `triton.testing.do_bench` over CUDA-graph replays at every M, so neither
launch overhead nor a busy host hides or inflates the kernels; up to 16 tokens each captured call reads
a different copy of the weight, 512 MB of NF4 copies in all, so weights come from DRAM as a model's
layers do, not from the L2; above, 20 calls on one weight); the host cost of one call
is measured separately below; every variant of a row is timed in 3 rounds, the order rotated each
round, and the median kept: see `_interleaved_ms`). Columns: cuBLAS bf16 `F.linear`, ours (the op, per-shape
choice), ours GEMV forced (M <= 16, to find the crossover with dequant+cuBLAS), at 1..4 tokens the
GEMV's FMA and tl.dot kernels each forced, ours dequant+cuBLAS forced, bitsandbytes (if
importable). Then the host time of one call (op, op as compiled graphs call
it, direct kernel call, dequant launch alone, cuBLAS) where the GPU work is short, the dequant
kernel alone in TB/s on every weight against a plain bf16 copy of the same output size, and two bounds
from the same timing: a kernel that only reads the packed bytes (no one-token kernel can be faster) and
cuBLAS plus a dequant at copy speed (no dequant + cuBLAS can be faster). Correctness is checked first
against the reference op at every shape (dequant bit-exact, matmuls to 1e-2 relative).

    python bench/kernels_nf4.py            # H100/H200, writes $OUT/kernels_nf4.{json,md}
    python bench/kernels_nf4.py --smoke    # tiny shapes on the CPU under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lowmem_compile.ops  # noqa: E402,F401
from lowmem_compile.codegen import nf4_matmul  # noqa: E402
from lowmem_compile.formats.nf4 import NF4Weight  # noqa: E402
from bench._common import cold_copies, cycling, graph_replay_ms  # noqa: E402

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N)
ROUNDS = int(os.environ.get("NF4_BENCH_ROUNDS", "1" if SMOKE else "3"))
TOKENS = [int(m) for m in os.environ.get("NF4_BENCH_TOKENS", "1,2,4,8,16,256,2048,8192").split(",")]


def _time_ms(fn, calls: int = 20) -> float:
    """GPU ms of one call: graph replay of `calls` calls; plain `do_bench` where capture fails (noted)."""
    if SMOKE:
        fn()
        return float("nan")
    fn()
    torch.cuda.synchronize()
    try:
        return graph_replay_ms(fn, calls=calls)
    except RuntimeError as err:  # a peer's op that cannot be captured
        print(f"graph capture failed ({str(err).splitlines()[0][:120]}); timing eagerly", flush=True)
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def _interleaved_ms(fns: dict, calls: int) -> dict[str, list[float]]:
    """GPU ms of each variant in ROUNDS rounds, the order rotated every round (each variant once
    first): a heavy matmul warms the GPU and lowers its clock for what runs next (cuBLAS alone moved
    303 -> 341 µs on one shape between two runs), so one pass in a fixed order biases the later
    columns. The row keeps every round and reports the median."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(_time_ms(fns[name], calls))
    return times


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _bnb():
    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # not installed on this machine: the column is skipped
        return None
    return bnbf


def _weight_copies(k: int, n: int, device, dtype, count: int, with_bnb: bool) -> list[dict]:
    """`count` random [n, k] weights: NF4 (double quantization), its bf16 dequantization (cuBLAS's
    operand) and its bitsandbytes state."""
    copies = []
    for _ in range(count):
        q = NF4Weight.from_float(torch.randn(n, k, device=device, dtype=dtype) * 0.02, 64, double_quant=True)
        copies.append({"q": q, "w": q.dequantize(dtype), "bnb": q.to_bnb() if with_bnb else None})
    return copies


def run(device: str, dtype: torch.dtype, shapes, tokens, save=lambda partial: None) -> dict:
    """Rows for every shape; `save` gets the rows so far after each weight (a run cut short keeps them).
    Rows up to GEMV_MAX_M tokens (memory-bound) cycle through COLD_BYTES of weight copies (counted
    by their packed bytes), one a call, every variant alike; larger M (compute-bound) reuse one weight."""
    bnbf = _bnb() if device == "cuda" else None
    rows, errors = [], []
    for k, n in shapes:
        count = 2 if SMOKE else cold_copies(n * k // 2)
        copies = _weight_copies(k, n, device, dtype, count, bnbf is not None)
        q, w_dq = copies[0]["q"], copies[0]["w"]
        got = nf4_matmul.dequantize(q.packed, q.absmax, q.shape, 64, dtype, q.absmax2, q.code2, q.offset)
        if not torch.equal(got, w_dq):
            errors.append(f"dequant {k}->{n} not bit-exact")
        for m in tokens:
            cold = m <= nf4_matmul.GEMV_MAX_M
            calls = len(copies) if cold else 20
            x = torch.randn(m, k, device=device, dtype=dtype)
            gy = torch.randn(m, n, device=device, dtype=dtype)

            def op_fwd():
                c = pick()["q"]
                return torch.ops.lowmem.nf4_linear(x, c.packed, c.absmax, list(c.shape), 64, None,
                                                   absmax2=c.absmax2, code2=c.code2, offset=c.offset)

            def op_bwd():
                c = pick()["q"]
                return torch.ops.lowmem.nf4_linear_backward(gy, c.packed, c.absmax, list(c.shape), 64,
                                                            absmax2=c.absmax2, code2=c.code2, offset=c.offset)

            fwd = {
                "cublas": lambda: torch.nn.functional.linear(x, pick()["w"]),
                "ours": op_fwd,
                "dequant_mm": lambda: _forced("dequant", nf4_matmul.linear, x, pick()["q"]),
            }
            bwd = {
                "cublas": lambda: torch.matmul(gy, pick()["w"]),
                "ours": op_bwd,
                "dequant_mm": lambda: _forced("dequant", nf4_matmul.linear_backward, gy, pick()["q"]),
            }
            if m <= 16:
                fwd["gemv"] = lambda: _forced("gemv", nf4_matmul.linear, x, pick()["q"])
                bwd["gemv"] = lambda: _forced("gemv", nf4_matmul.linear_backward, gy, pick()["q"])
            if m <= 4:  # the GEMV's two ways at the tokens where either may run
                fwd["gemv_dot"] = lambda: _forced("gemv", nf4_matmul.linear, x, pick()["q"], fma_max_m=0)
                bwd["gemv_dot"] = lambda: _forced("gemv", nf4_matmul.linear_backward, gy, pick()["q"], fma_max_m=0)
                fwd["gemv_fma"] = lambda: _forced("gemv", nf4_matmul.linear, x, pick()["q"], fma_max_m=4)
                bwd["gemv_fma"] = lambda: _forced("gemv", nf4_matmul.linear_backward, gy, pick()["q"], fma_max_m=4)
            if bnbf is not None:
                import bitsandbytes as bnb

                def bnb_fwd():
                    packed, state = pick()["bnb"]
                    return bnb.matmul_4bit(x, packed, quant_state=state)

                def bnb_bwd():
                    packed, state = pick()["bnb"]
                    return torch.matmul(gy, bnbf.dequantize_4bit(packed, state))

                fwd["bnb"], bwd["bnb"] = bnb_fwd, bnb_bwd
            for direction, fns in (("fwd", fwd), ("bwd", bwd)):
                row = {"K": k, "N": n, "M": m, "dir": direction, "weights": len(copies) if cold else 1}
                pick = lambda: copies[0]  # noqa: E731  (`pick` feeds every variant: here the first copy, for the check)
                ref = x.double() @ w_dq.double().T if direction == "fwd" else gy.double() @ w_dq.double()
                for name, fn in fns.items():
                    err = _rel(fn(), ref)
                    if err > 1e-2:
                        errors.append(f"{direction} {name} {k}->{n} M={m}: rel err {err:.2e}")
                pick = cycling(copies) if cold else (lambda: copies[0])  # then the timed copies
                for name, times in _interleaved_ms(fns, calls).items():
                    row[f"{name}_ms"] = statistics.median(times)
                    row[f"{name}_ms_rounds"] = times
                row["ours_vs_cublas"] = row["cublas_ms"] / row["ours_ms"]
                rows.append(row)
        save({"rows": rows, "errors": errors})
    return {"rows": rows, "errors": errors, "dequant": _dequant_bandwidth(device, dtype, shapes),
            "host_us": _host_us(device, dtype)}


def _forced(strategy, fn, t, q, fma_max_m=None):
    """Run one strategy regardless of the per-shape choice: "gemv" or "dequant" (+ cuBLAS); for the
    GEMV, `fma_max_m` overrides the FMA / tl.dot crossover for this call."""
    bias = () if fn is nf4_matmul.linear_backward else (None,)
    default = nf4_matmul.FMA_MAX_M
    nf4_matmul.FMA_MAX_M = default if fma_max_m is None else fma_max_m
    try:
        return fn(t, q.packed, q.absmax, q.shape, 64, *bias, q.absmax2, q.code2, q.offset, strategy=strategy)
    finally:
        nf4_matmul.FMA_MAX_M = default


def _host_us(device, dtype) -> dict:
    """Host time of one call, µs (wall clock of 200 back-to-back calls; the GPU work of each is shorter,
    so this is what the Python side costs): the op, the op as a compiled graph calls it (grad mode off,
    its input requiring grad: the autograd wrapper still runs), the kernel entry point, the dequant
    kernel's launch alone, cuBLAS."""
    k, n = (4096, 4096) if not SMOKE else (128, 64)
    q = NF4Weight.from_float(torch.randn(n, k, device=device), 64, double_quant=True)
    out = {}
    for m in (1, 256):
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = q.dequantize(dtype)
        nested = (q.absmax2, q.code2, q.offset)
        xg = x.detach().requires_grad_()

        def op_in_graph():
            with torch.no_grad():
                torch.ops.lowmem.nf4_linear(xg, q.packed, q.absmax, [n, k], 64, None, *nested)

        calls = {
            "op": lambda: torch.ops.lowmem.nf4_linear(x, q.packed, q.absmax, [n, k], 64, None, *nested),
            "op_in_graph": op_in_graph,
            "dequant_launch": lambda: nf4_matmul.dequantize(q.packed, q.absmax, q.shape, 64, dtype, *nested),
            "direct": lambda: nf4_matmul.linear(x, q.packed, q.absmax, (n, k), 64, None, *nested),
            "cublas": lambda: torch.nn.functional.linear(x, w),
        }
        for name, fn in calls.items():
            reps = 2 if SMOKE else 200
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out[f"M{m}_{name}"] = (time.perf_counter() - t0) / reps * 1e6
    return {"shape": [n, k], "us": out}


@triton.jit
def _read_kernel(src_ptr, out_ptr, n_words, BLOCK: tl.constexpr):
    """Reads BLOCK int32 words a program and stores their xor (so the reads are not dropped)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    words = tl.load(src_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(words, axis=0))


def _read_floor_ms(nbytes: int, device) -> float:
    """GPU ms of one kernel that only reads `nbytes` (an NF4 weight's packed bytes, 97% of its bytes),
    timed like the memory-bound rows (a different buffer each call, COLD_BYTES in all): no one-token
    kernel, whatever its decode, can take less. cuBLAS's one-token time over this is the most any NF4
    GEMV could be faster than cuBLAS on that weight."""
    count = 2 if SMOKE else cold_copies(nbytes)
    buffers = torch.randint(-2**31, 2**31 - 1, (count, nbytes // 4), device=device, dtype=torch.int32)
    block = 4096
    out = torch.empty(triton.cdiv(nbytes // 4, block), device=device, dtype=torch.int32)
    pick = cycling(list(buffers))
    return _time_ms(lambda: _read_kernel[(out.numel(),)](pick(), out, nbytes // 4, BLOCK=block, num_warps=8), count)


def _dequant_bandwidth(device, dtype, shapes) -> list[dict]:
    """The dequant kernel alone on every weight (its time is what dequant + cuBLAS adds to cuBLAS),
    against a plain copy of the same output size; and the read-only floor of the weight."""
    rows = []
    for k, n in shapes:
        q = NF4Weight.from_float(torch.randn(n, k, device=device), 64, double_quant=True)
        ms = _time_ms(lambda: nf4_matmul.dequantize(q.packed, q.absmax, q.shape, 64, dtype, q.absmax2, q.code2, q.offset))
        out = torch.empty(n, k, device=device, dtype=dtype)
        src = torch.randn(n, k, device=device, dtype=dtype)
        copy_ms = _time_ms(lambda: out.copy_(src))
        moved = q.nbytes() + n * k * out.element_size()
        rows.append({"shape": [n, k], "ms": ms, "tb_s": moved / ms / 1e9,
                     "copy_tb_s": 2 * n * k * out.element_size() / copy_ms / 1e9,
                     "copy_ms": copy_ms, "read_floor_ms": _read_floor_ms(q.packed.numel(), device)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    opts = parser.parse_args()
    if opts.smoke:
        device, dtype, shapes, tokens = "cpu", torch.float16, [(128, 64), (96, 48)], [1, 3, 16, 80]
    else:
        device, dtype, shapes, tokens = "cuda", torch.bfloat16, SHAPES, TOKENS
    out_dir = os.environ.get("OUT", "bench/results")
    os.makedirs(out_dir, exist_ok=True)

    def save(partial):
        with open(os.path.join(out_dir, "kernels_nf4.partial.json"), "w") as f:
            json.dump(partial, f, indent=1)

    result = run(device, dtype, shapes, tokens, save)
    result["meta"] = {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gemv_max_m": nf4_matmul.GEMV_MAX_M, "dtype": str(dtype),
    }
    table = _table(result)
    with open(os.path.join(out_dir, "kernels_nf4.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "kernels_nf4.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    if result["errors"]:
        print("ERRORS:\n  " + "\n  ".join(result["errors"]))
        sys.exit(1)


def _table(result) -> str:
    cols = ["cublas_ms", "ours_ms", "gemv_ms", "gemv_fma_ms", "gemv_dot_ms", "dequant_mm_ms", "bnb_ms"]
    lines = ["| K->N | M | dir | " + " | ".join(c[:-3] + " (us)" for c in cols) + " | ours/cuBLAS speed |",
             "|" + "---|" * (len(cols) + 4)]
    for r in result["rows"]:
        cells = [f"{r[c] * 1e3:.1f}" if c in r else "-" for c in cols]
        lines.append(f"| {r['K']}->{r['N']} | {r['M']} | {r['dir']} | " + " | ".join(cells) + f" | {r['ours_vs_cublas']:.2f}x |")
    h = result["host_us"]
    host = ", ".join(f"{key} {v:.1f}" for key, v in h["us"].items())
    lines.append(f"\nhost µs a call ({h['shape'][0]}x{h['shape'][1]}): {host}")
    for d in result["dequant"]:
        lines.append(f"\ndequant {d['shape'][0]}x{d['shape'][1]}: {d['ms'] * 1e3:.1f} us, {d['tb_s']:.2f} TB/s "
                     f"(bf16 copy {d['copy_tb_s']:.2f} TB/s)")
    lines.append("\nBounds (the same timing): a one-token kernel cannot beat reading the packed bytes once; dequant +"
                 " cuBLAS cannot beat cuBLAS plus a dequant moving its bytes as fast as a bf16 copy moves its own.")
    for d in result["dequant"]:
        n, k = d["shape"]
        cublas = {(r["M"], r["dir"]): r["cublas_ms"] for r in result["rows"] if (r["N"], r["K"]) == (n, k)}
        if (1, "fwd") in cublas:
            lines.append(f"- {k}->{n}: read floor {d['read_floor_ms'] * 1e3:.1f} us, at most "
                         f"{cublas[(1, 'fwd')] / d['read_floor_ms']:.2f}x cuBLAS at one token")
        dequant_floor = d["copy_ms"] * 2.5 / 4  # 2.5 bytes an element moved (0.5 read, 2 written) against the copy's 4
        for direction in ("fwd", "bwd"):
            if (2048, direction) in cublas:
                t = cublas[(2048, direction)]
                lines.append(f"  2048 tokens {direction}: dequant + cuBLAS at most {t / (t + dequant_floor):.2f}x cuBLAS "
                             f"(a dequant at the copy's bytes a second: {dequant_floor * 1e3:.1f} us)")
    lines.append(f"\n{result['meta']['gpu']}, torch {result['meta']['torch']}, triton {result['meta']['triton']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
