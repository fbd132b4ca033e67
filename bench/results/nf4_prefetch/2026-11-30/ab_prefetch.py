"""A/B: the FMA forward GEMV with two steps an iteration and the next step's loads issued first
(working tree) against the same kernel without the prefetch (.ab/nf4_matmul_noprefetch.py), over
forward-FMA tiles. GPU time by CUDA-graph replay, 3 rounds, medians: 20 calls on one weight, or with
--cold one call a copy over 512 MB of copies (weights from DRAM; writes ab_prefetch_cold.json)."""
import importlib.util, itertools, json, os, statistics, sys, time
import torch
sys.path.insert(0, os.getcwd())
from bench._common import cold_copies, cycling, environment, graph_replay_ms
from lowmem_compile.codegen import nf4_matmul as new
from lowmem_compile.formats.nf4 import NF4Weight

def load_old():
    src = open(".ab/nf4_matmul_noprefetch.py").read().replace("from ..formats import nf4", "from lowmem_compile.formats import nf4")
    path = "/tmp/nf4_matmul_noprefetch.py"; open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location("nf4_matmul_noprefetch", path); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m

old = load_old()
PROD = new._GEMV_TILES["fwd_fma"]
COLD = "--cold" in sys.argv
TILES = [PROD] + [t for t in itertools.product((2, 4, 8), (32, 64), (4,), (1,), (16, 32) if COLD else (16, 32, 64))]
def run(mod, tile, x, q):
    mod._GEMV_TILES["fwd_fma"] = tile
    mod.FMA_MAX_M = 4
    return mod.linear(x, q.packed, q.absmax, q.shape, 64, None, q.absmax2, q.code2, q.offset, strategy="gemv")
rows, errors = [], []
t0 = time.time()
for k, n in [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]:
    qs = [NF4Weight.from_float(torch.randn(n, k, device="cuda") * 0.02, 64, double_quant=True)
          for _ in range(cold_copies(n * k // 2) if COLD else 1)]
    ws = [qq.dequantize(torch.bfloat16) for qq in qs]
    q, w = qs[0], ws[0]
    calls = len(qs) if COLD else 20
    next_q, next_w = cycling(qs), cycling(ws)
    for m in ((1, 2) if COLD else (1, 2, 4)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = run(old, PROD, x, q).float()
        fns = {"cublas": lambda: torch.nn.functional.linear(x, next_w()), "old_prod": lambda: run(old, PROD, x, next_q())}
        for tile in TILES:
            got = run(new, tile, x, q).float()
            if not torch.allclose(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item()):
                errors.append(f"{k}->{n} M={m} tile {tile}: max diff {(got - ref).abs().max().item():.3e}")
            fns[f"new{tile}"] = (lambda tile=tile: run(new, tile, x, next_q()))
        names = list(fns); times = {nm: [] for nm in names}
        for nm in names:
            if nm.startswith("new"):
                new._GEMV_TILES["fwd_fma"] = eval(nm[3:])
            fns[nm]()
        torch.cuda.synchronize()
        for r in range(3):
            for nm in names[r:] + names[:r]:
                if nm.startswith("new"):
                    new._GEMV_TILES["fwd_fma"] = eval(nm[3:])
                times[nm].append(graph_replay_ms(fns[nm], calls=calls) * 1e3)
        med = {nm: statistics.median(v) for nm, v in times.items()}
        best = min((v, nm) for nm, v in med.items() if nm.startswith("new"))
        rows.append({"K": k, "N": n, "M": m, "us": med})
        print(f"{k}->{n} M={m}: cublas {med['cublas']:.1f} old {med['old_prod']:.1f} new(prod tile) {med[f'new{PROD}']:.1f} best new {best[0]:.1f} {best[1]}  [{time.time()-t0:.0f}s]", flush=True)
new._GEMV_TILES["fwd_fma"] = PROD
geo = {}
for nm in rows[0]["us"]:
    if nm.startswith("new"):
        geo[nm] = statistics.geometric_mean([r["us"][nm] / r["us"]["old_prod"] for r in rows])
for nm, g in sorted(geo.items(), key=lambda x: x[1])[:8]:
    print(f"geomean new/old {g:.3f} {nm}")
json.dump({"environment": environment(), "rows": rows, "geomean_vs_old": geo, "errors": errors}, open(os.path.join(os.environ.get("OUT", "."), "ab_prefetch_cold.json" if COLD else "ab_prefetch.json"), "w"), indent=1)
print("errors:", errors[:5] or "none")
