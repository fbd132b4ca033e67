"""Sweep the NF4 GEMV tiles (M ≤ 16) on a GPU and print the best per kernel family.

The GEMV kernels (`lowmem_compile/codegen/nf4_matmul.py`) take their tile from `_GEMV_TILES`:
(ROWS, TPR, warps, stages, warps an SM) for each of forward/backward × FMA (timed at 1 and 4 tokens)
/ tl.dot (8 and 16 tokens). This script sets each candidate in turn, checks the result against the
dequantized weight's product (bf16 on the GPU, 1e-2 relative), and times it as GPU time (CUDA-graph replay) on
Llama-3-8B's projection shapes, each captured call reading another copy of the weight (512 MB of NF4 in
all, so weights come from DRAM as in a model). A family's score is the geometric mean, over shapes and token counts,
of the time relative to the tile in the table today; the best tile goes into `_GEMV_TILES` by hand
(a measured choice, not a run-time autotuner: the kernels run inside graphs that must not tune).

Compiles dominate (one per tile, ~1-2 s each on the host), so worker processes compile every
candidate first (Triton's on-disk cache keeps them) and the timing process then only loads them.

    python bench/nf4_gemv_tiles.py                 # H100/H200: $OUT/nf4_gemv_tiles.{json,md}
    python bench/nf4_gemv_tiles.py --smoke         # CPU, interpreter, two tiny candidates a family
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
import json
import math
import multiprocessing
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lowmem_compile.codegen import nf4_matmul  # noqa: E402
from lowmem_compile.formats.nf4 import NF4Weight  # noqa: E402
from bench._common import cold_copies, cycling, environment, graph_replay_ms, markdown_table  # noqa: E402

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N)
SMOKE_SHAPES = [(256, 48)]
#: bf16 on the GPU; fp16 under the interpreter, whose tl.dot on two bf16 operands is wrong on the CPU
DTYPE = torch.float16 if SMOKE else torch.bfloat16
TOKENS = {"fma": [1, 4], "dot": [8, 16]}
#: Candidates per family: ROWS x TPR x warps x stages x warps an SM (the last changes the grid only).
CANDIDATES = {
    "fwd_fma": itertools.product((2, 4, 8), (64, 128, 256), (4, 8), (1, 2, 3), (16, 32, 64)),
    "fwd_dot": itertools.product((16, 32, 64, 128), (4, 8), (2, 4, 8), (2, 3, 4), (16, 32)),
    "bwd_fma": itertools.product((32, 64, 128, 256, 512), (4, 8, 16), (4, 8), (1, 2), (16, 32, 64)),
    "bwd_dot": itertools.product((16, 32, 64), (2, 4, 8), (2, 4, 8), (2, 3), (16, 32)),
}
CANDIDATES = {key: list(tiles) for key, tiles in CANDIDATES.items()}
SMOKE_CANDIDATES = {key: [nf4_matmul._INTERPRET_TILES[key], (*nf4_matmul._INTERPRET_TILES[key][:4], 32)]
                    for key in nf4_matmul._INTERPRET_TILES}


def _weights(shapes, device):
    out = {}
    for k, n in shapes:
        w = torch.randn(n, k, device=device, dtype=DTYPE) * 0.02
        q = NF4Weight.from_float(w, 64, double_quant=True)
        out[(k, n)] = (q, q.dequantize(DTYPE).double())
    return out


def _cold_copies(shapes, device) -> dict:
    """Per shape, NF4 copies of COLD_BYTES in all (`bench._common`): a timed call reads the next one,
    so weights come from DRAM as a model's layers do (one weight replayed alone sits in the L2)."""
    out = {}
    for k, n in shapes:
        count = 1 if SMOKE else cold_copies(n * k // 2)
        out[(k, n)] = [NF4Weight.from_float(torch.randn(n, k, device=device, dtype=DTYPE) * 0.02, 64, double_quant=True)
                       for _ in range(count)]
    return out


def _cycled_call(family: str, copies: list, t):
    """`_call` on the next of `copies` at every call."""
    pick = cycling([_call(family, q, t) for q in copies])
    return lambda: pick()()


def _call(family: str, q, t):
    fn = nf4_matmul.linear if family.startswith("fwd") else nf4_matmul.linear_backward
    bias = (None,) if family.startswith("fwd") else ()
    return lambda: fn(t, q.packed, q.absmax, q.shape, 64, *bias, q.absmax2, q.code2, q.offset, strategy="gemv")


def _inputs(family, m, k, n, device):
    return torch.randn(m, k if family.startswith("fwd") else n, device=device, dtype=DTYPE)


def _rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


def _check(family, tile, weights, device) -> str | None:
    """Run `tile` of `family` once on every shape; the first error (or a wrong result), else None."""
    nf4_matmul._GEMV_TILES[family] = tile
    nf4_matmul._INTERPRET_TILES[family] = tile
    try:
        for (k, n), (q, w64) in weights.items():
            for m in TOKENS[family.split("_")[1]]:
                t = _inputs(family, m, k, n, device)
                out = _call(family, q, t)()
                ref = t.double() @ (w64.T if family.startswith("fwd") else w64)
                if not _rel(out, ref) < 1e-2:
                    return f"wrong result at K={k}, N={n}, M={m}: rel {_rel(out, ref):.3g}"
    except Exception as err:  # a tile the compiler rejects (shared memory, registers): out of the sweep
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return None


def _compile_worker(jobs, shapes):
    """Compile (and check) a share of the candidates; Triton's on-disk cache keeps the binaries."""
    device = "cpu" if SMOKE else "cuda"
    weights = _weights(shapes, device)
    return [(family, tile, _check(family, tile, weights, device)) for family, tile in jobs]


def sweep(candidates, shapes, workers: int) -> dict:
    device = "cpu" if SMOKE else "cuda"
    saved = dict(nf4_matmul._GEMV_TILES), dict(nf4_matmul._INTERPRET_TILES)
    defaults = saved[1] if SMOKE else saved[0]
    jobs = [(family, tuple(tile)) for family, tiles in candidates.items() for tile in [defaults[family], *tiles]]
    unique = list(dict.fromkeys(jobs))
    start = time.perf_counter()
    errors = {}
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        shares = [unique[i::workers] for i in range(workers)]
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for done in pool.map(_compile_worker, shares, [shapes] * workers):
                errors.update({(f, t): e for f, t, e in done if e})
        print(f"compiled {len(unique)} tiles in {time.perf_counter() - start:.0f} s "
              f"({len(errors)} rejected or wrong)", flush=True)
    weights = _weights(shapes, device)
    cold = _cold_copies(shapes, device)
    rows = []
    for i, (family, tile) in enumerate(unique):
        error = errors.get((family, tile)) if workers > 1 else _check(family, tile, weights, device)
        if error:
            rows.append({"family": family, "tile": tile, "error": error})
            continue
        nf4_matmul._GEMV_TILES[family] = tile
        nf4_matmul._INTERPRET_TILES[family] = tile
        times = {}
        for (k, n), copies in cold.items():
            for m in TOKENS[family.split("_")[1]]:
                fn = _cycled_call(family, copies, _inputs(family, m, k, n, device))
                fn()
                times[f"{k}->{n} M={m}"] = (float("nan") if SMOKE else
                                            graph_replay_ms(fn, calls=len(copies), warmup=5, rep=20) * 1e3)
        rows.append({"family": family, "tile": tile, "us": times})
        if i % 25 == 0:
            print(f"timed {i + 1}/{len(unique)} ({time.perf_counter() - start:.0f} s)", flush=True)
    nf4_matmul._GEMV_TILES.update(saved[0])
    nf4_matmul._INTERPRET_TILES.update(saved[1])
    return {"defaults": defaults, "rows": rows}


def summarize(result: dict) -> tuple[dict, str]:
    """Per family: the default's times, the best tile by geometric-mean ratio, and its times."""
    best, lines = {}, []
    for family, default in result["defaults"].items():
        rows = [r for r in result["rows"] if r["family"] == family and "us" in r]
        base = next((r for r in rows if tuple(r["tile"]) == tuple(default)), None)
        if base is None or not rows:
            continue

        def score(row):
            ratios = [row["us"][key] / base["us"][key] for key in base["us"]]
            return math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if all(x == x for x in ratios) else 1.0

        ranked = sorted(rows, key=score)
        best[family] = {"tile": ranked[0]["tile"], "score": score(ranked[0]), "us": ranked[0]["us"],
                        "default_us": base["us"], "top5": [(r["tile"], score(r)) for r in ranked[:5]]}
        lines += [f"## {family}: default {tuple(default)}, best {tuple(ranked[0]['tile'])} "
                  f"(geomean time {score(ranked[0]):.3f} of the default)", "",
                  markdown_table(["shape, M", "default µs", "best µs"],
                                 [[key, f"{base['us'][key]:.1f}", f"{ranked[0]['us'][key]:.1f}"] for key in base["us"]]),
                  "", "top 5: " + "; ".join(f"{tuple(t)} {s:.3f}" for t, s in best[family]["top5"]), ""]
    return best, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--families", default=",".join(CANDIDATES), help="comma-separated kernel families")
    parser.add_argument("--workers", type=int, default=1 if SMOKE else max(1, min(12, (os.cpu_count() or 2) - 2)))
    args = parser.parse_args()
    families = args.families.split(",")
    unknown = set(families) - set(CANDIDATES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; known: {sorted(CANDIDATES)}")
    candidates = {f: (SMOKE_CANDIDATES if SMOKE else CANDIDATES)[f] for f in families}
    result = sweep(candidates, SMOKE_SHAPES if SMOKE else SHAPES, args.workers)
    result["defaults"] = {f: result["defaults"][f] for f in families}
    best, text = summarize(result)
    header = f"# NF4 GEMV tiles, {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n\n"
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "nf4_gemv_tiles.json"), "w") as f:
            json.dump({"environment": environment(), "best": best, **result}, f, indent=1, default=str)
        with open(os.path.join(out, "nf4_gemv_tiles.md"), "w") as f:
            f.write(header + text)
    rejected = sum("error" in r for r in result["rows"])
    print(header + text + f"\n{len(result['rows'])} tiles, {rejected} rejected or wrong")


if __name__ == "__main__":
    main()
