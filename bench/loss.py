"""LM head + cross-entropy, forward and backward: stock PyTorch vs `lowmem::linear_cross_entropy`
(vs Liger's fused linear cross-entropy when `import liger_kernel` works).

    python bench/loss.py            # CUDA: hidden 4096, vocab 128256, bf16, 2048 and 8192 tokens
    python bench/loss.py --smoke    # CPU, Triton interpreter, tiny shapes: proves the script runs

Head frozen, gradient to the hidden states. Per variant and length: the median time of one
forward+backward (`triton.testing.do_bench`) and the peak memory above the inputs (the hidden
states, head and labels). Before timing, the kernel's loss and gradient are checked at the same
shape against an fp32 eager reference, next to stock bf16's own error. Writes `$OUT/loss.json` and
`$OUT/loss.md` (default bench/results/) and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._common import default_out_dir, environment, markdown_table  # noqa: E402
from lowmem_compile.ops.linear_cross_entropy import choose_chunk_tokens, fused_linear_cross_entropy  # noqa: E402

GIB = 2**30


def make_inputs(tokens, hidden, vocab, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, device=device, dtype=dtype)
    w = (torch.randn(vocab, hidden, generator=g, device=device, dtype=dtype) / hidden**0.5)
    y = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    y[::7] = -100
    return h.requires_grad_(), w, y


def variants(chunk):
    """name -> loss(h, w, y). Every variant is eager PyTorch code the user could write."""
    out = {
        "stock": lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y),
        "lowmem": lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_tokens=chunk),
        "lowmem_chunk2x": lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_tokens=2 * chunk),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda h, w, y: liger(w, h, y)
    except Exception as e:  # absent or broken install: report and go on
        print(f"liger_kernel unavailable ({type(e).__name__}: {e}); skipping it", flush=True)
    return out


def check(h, w, y, chunk):
    """Kernel (the CUDA launcher, or the interpreter in --smoke) and stock bf16 vs fp32 eager."""
    from lowmem_compile.codegen.linear_cross_entropy import linear_cross_entropy as launch

    h32 = h.detach().float().requires_grad_()
    ref = F.cross_entropy(F.linear(h32, w.float()), y)
    ref.backward()
    loss, _, dh, _, _ = launch(h.detach(), w, None, y, -100, "mean", None, chunk, True, False, False, False)
    h_stock = h.detach().clone().requires_grad_()
    stock = F.cross_entropy(F.linear(h_stock, w).float(), y)
    stock.backward()

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    errors = {
        "loss_rel_err": rel(loss, ref), "grad_rel_err": rel(dh, h32.grad),
        "stock_loss_rel_err": rel(stock, ref), "stock_grad_rel_err": rel(h_stock.grad, h32.grad),
    }  # fmt: skip
    ok = errors["loss_rel_err"] < 1e-3 and errors["grad_rel_err"] < max(2e-2, 2 * errors["stock_grad_rel_err"])
    return ok, errors


def measure(fn, h, w, y, device):
    """(median ms of forward+backward, peak bytes above the inputs)."""

    def step():
        fn(h, w, y).backward()
        h.grad = None

    if device == "cuda":
        import triton.testing

        step()  # compile/JIT outside the measurement
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
        return ms, peak
    import time

    step()
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", type=Path, default=default_out_dir())
    args = parser.parse_args()
    if args.smoke:
        device, dtype, hidden, vocab, lengths = "cpu", torch.float32, 32, 1000, (64, 160)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/loss.py needs CUDA; use --smoke on a CPU")
        device, dtype, hidden, vocab, lengths = "cuda", torch.bfloat16, 4096, 128256, (2048, 8192)
    chunk = choose_chunk_tokens(vocab, torch.tensor([], dtype=dtype).element_size())
    if args.smoke:
        chunk = 48

    rows, records, all_ok = [], [], True
    for tokens in lengths:
        h, w, y = make_inputs(tokens, hidden, vocab, dtype, device)
        ok, errors = check(h, w, y, chunk)
        all_ok &= ok
        print(f"tokens={tokens}: correctness {'ok' if ok else 'FAILED'} {errors}", flush=True)
        for name, fn in variants(chunk).items():
            try:
                ms, peak = measure(fn, h, w, y, device)
                error = None
            except Exception as e:  # one variant failing (OOM, missing kernel) must not lose the others
                ms, peak, error = None, None, f"{type(e).__name__}: {e}"[:300]
                if device == "cuda":
                    torch.cuda.empty_cache()
            records.append({"variant": name, "tokens": tokens, "ms": ms, "peak_above_inputs_bytes": peak,
                            "chunk_tokens": chunk * (2 if name == "lowmem_chunk2x" else 1), "error": error, **errors})  # fmt: skip
            rows.append([name, tokens, None if ms is None else f"{ms:.2f}",
                         None if peak is None else f"{peak / GIB:.3f}", error])  # fmt: skip
        del h, w, y

    args.out.mkdir(parents=True, exist_ok=True)
    shape = {"hidden": hidden, "vocab": vocab, "dtype": str(dtype), "head": "frozen", "smoke": args.smoke}
    (args.out / "loss.json").write_text(
        json.dumps({"env": environment(), "shape": shape, "correct": all_ok, "results": records}, indent=1)
    )
    table = markdown_table(["variant", "tokens", "fwd+bwd ms (median)", "peak GiB above inputs", "error"], rows)
    (args.out / "loss.md").write_text(f"# LM head + cross-entropy, {shape}\n\n{table}")
    print(table, flush=True)
    if not all_ok:
        sys.exit("correctness check FAILED (see above)")


if __name__ == "__main__":
    main()
