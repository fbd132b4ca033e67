"""A/B: the FMA backward GEMV with a step's rows in groups that share one chunk's accumulators
(working tree) against the kernel before (.ab/nf4_matmul_nogroups.py), cold weights (each captured
call reads another copy, 512 MB of NF4 in all), over backward-FMA tiles; the dot backward beside."""
import importlib.util, json, os, statistics, sys, time
import torch
sys.path.insert(0, os.getcwd())
from bench._common import environment, graph_replay_ms
from lowmem_compile.codegen import nf4_matmul as new
from lowmem_compile.formats.nf4 import NF4Weight

def load_old():
    src = open(".ab/nf4_matmul_nogroups.py").read().replace("from ..formats import nf4", "from lowmem_compile.formats import nf4")
    path = "/tmp/nf4_matmul_nogroups.py"; open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location("nf4_matmul_nogroups", path); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m

old = load_old()
PROD = new._GEMV_TILES["bwd_fma"]
TILES = [PROD, (64, 4, 4, 2, 16), (128, 4, 4, 2, 16), (128, 4, 4, 1, 16), (128, 4, 4, 2, 32), (256, 4, 4, 2, 16),
         (128, 8, 4, 2, 16), (64, 4, 2, 2, 16), (128, 4, 8, 2, 16), (64, 4, 4, 2, 32)]
def run(mod, tile, g, q, fma_max_m):
    if tile is not None:
        mod._GEMV_TILES["bwd_fma"] = tile
    mod.FMA_MAX_M = fma_max_m
    return mod.linear_backward(g, q.packed, q.absmax, q.shape, 64, q.absmax2, q.code2, q.offset, strategy="gemv")
rows, errors = [], []
t0 = time.time()
for k, n in [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]:
    qs = [NF4Weight.from_float(torch.randn(n, k, device="cuda") * 0.02, 64, double_quant=True) for _ in range(min(64, -(-(512 << 20) // (n * k // 2))))]
    ws = [qq.dequantize(torch.bfloat16) for qq in qs]
    it = {"i": 0}
    def nxt(lst):
        it["i"] = (it["i"] + 1) % len(lst)
        return lst[it["i"]]
    for m in (1, 2, 4):
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        ref = (g.double() @ ws[0].double()).float()
        fns = {"cublas": lambda: g @ nxt(ws),
               "old_fma": lambda: run(old, PROD, g, nxt(qs), 4), "old_dot": lambda: run(old, None, g, nxt(qs), 0)}
        for tile in TILES:
            got = run(new, tile, g, qs[0], 4).float()
            err = ((got - ref).norm() / ref.norm()).item()
            if err > 1e-2:
                errors.append(f"{k}->{n} M={m} tile {tile}: rel err {err:.2e}")
            fns[f"new{tile}"] = (lambda tile=tile: run(new, tile, g, nxt(qs), 4))
        names = list(fns); times = {nm: [] for nm in names}
        for nm in names:
            fns[nm]()
        torch.cuda.synchronize()
        for r in range(3):
            for nm in names[r:] + names[:r]:
                times[nm].append(graph_replay_ms(fns[nm], calls=len(qs)) * 1e3)
        med = {nm: statistics.median(v) for nm, v in times.items()}
        best = min((v, nm) for nm, v in med.items() if nm.startswith("new"))
        rows.append({"K": k, "N": n, "M": m, "us": med})
        print(f"{k}->{n} M={m}: cublas {med['cublas']:.1f} old fma {med['old_fma']:.1f} old dot {med['old_dot']:.1f} "
              f"new(prod) {med[f'new{PROD}']:.1f} best {best[0]:.1f} {best[1]}  [{time.time()-t0:.0f}s]", flush=True)
geo = {nm: statistics.geometric_mean([r["us"][nm] / r["us"]["old_fma"] for r in rows]) for nm in rows[0]["us"] if nm.startswith("new")}
for nm, gm in sorted(geo.items(), key=lambda x: x[1])[:6]:
    print(f"geomean new/old_fma {gm:.3f} {nm}")
json.dump({"environment": environment(), "rows": rows, "geomean_vs_old_fma": geo, "errors": errors},
          open(os.path.join(os.environ.get("OUT", "."), "ab_groups.json"), "w"), indent=1)
print("errors:", errors[:5] or "none")
