"""Peak memory against step time: lowmem's recomputation planner at several budgets vs Inductor's
`activation_memory_budget` (1.0 / 0.5 / 0.3 / 0.1) vs eager gradient checkpointing.

    python bench/remat_sweep.py                      # Llama-3-8B shape, 4 layers, seq 8192, one H200
    python bench/remat_sweep.py --layers 32 --gpus 4 --budgets 20,30,40,50   # the full model
    python bench/remat_sweep.py --smoke              # tiny shapes on the CPU (eager inner compilers)
    # one GPU, two runs of under 10 minutes: the stock points, then lowmem's, compared in one table
    python bench/remat_sweep.py --layers 32 --kinds stock --parallel 2
    python bench/remat_sweep.py --layers 32 --kinds lowmem --fixed full --budgets 16,24,32 --previous OUT1/remat_sweep.json

Model: hidden 4096, MLP 14336, 32/8 heads, vocab 128256, bf16 frozen base + peft LoRA r=16 on every
projection, random weights built on the device, bf16 autocast; forward + backward, no optimizer.
Each configuration runs in its own process. The stock points run first; each lowmem budget is set
to just under a stock point's measured peak as soon as that point finishes (plus `remat=full` and
`remat=none`), so the table answers "same memory, less time?"; `--budgets` adds lowmem points at
fixed budgets that start at once (a 32-layer compile takes minutes: waiting for the stock points
would not fit one run). lowmem runs with its other passes off, so only the partitioner differs from
Inductor. Workers compile concurrently (a shared per-run cache) but run their steps one at a time per
GPU under a lock, so timings do not overlap; `--gpus N` spreads workers over N GPUs.
Output in $OUT (default bench/results): remat_sweep.json, remat_sweep.md, remat_sweep.png.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import default_out_dir, environment, markdown_table, run_process_group  # noqa: E402

MARKER = "REMAT_SWEEP "
GIB = 2**30
STOCK = [("inductor_amb1.0", 1.0), ("inductor_amb0.5", 0.5), ("inductor_amb0.3", 0.3), ("inductor_amb0.1", 0.1)]
#: Recomputation alone: the other passes off, and nothing left for `memory_budget` to decide beside it
#: (parking, MLP pieces and the logits stay as they were before the knob, lowmem_compile/knob.py).
OTHER_PASSES_OFF = {"attention": "off", "fused_loss": "off", "nf4": "off", "offload": "off", "mlp_chunks": "off",
                    "logits": "keep"}


def worker(cfg: dict) -> dict:
    """One configuration: build, compile on the first step, then time `steps` steps under the lock."""
    import torch

    from bench.e2e import add_lora, build_model, llama_config

    row = dict(cfg)
    device = cfg["device"]
    cuda = device == "cuda"
    config = llama_config("small" if cfg["smoke"] else "llama3-8b", cfg["layers"], cfg["seq"])
    model = add_lora(build_model(config, device, seed=0), gradient_checkpointing=cfg["kind"] == "eager_gc")
    model.train()
    if cfg["kind"] == "lowmem":
        import lowmem_compile  # noqa: F401

        inner = "eager" if cfg["smoke"] else "inductor"
        opts = {"inner": inner, "remat": cfg["remat"], "memory_budget": cfg.get("budget_bytes"), **OTHER_PASSES_OFF}
        run = torch.compile(model, backend="lowmem", options=opts)
    elif cfg["kind"] == "inductor":
        run = torch.compile(model, backend="aot_eager_decomp_partition" if cfg["smoke"] else "inductor")
    else:
        run = model
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, config.vocab_size, (1, cfg["seq"]), generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16):
            out = run(input_ids=ids, labels=ids)  # held through the backward, as a training loop does
        out.loss.backward()
        loss = out.loss.item()
        del out
        for p in params:
            p.grad = None
        return loss

    import torch._functorch.config as fconfig

    with fconfig.patch(activation_memory_budget=cfg.get("amb", 1.0)), open(cfg["lock"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # compiles (the first step) may overlap; timed steps may not
        start = time.perf_counter()
        row["loss"] = step()
        row["compile_s"] = round(time.perf_counter() - start, 1)
        fcntl.flock(lock, fcntl.LOCK_UN)
        if cuda:
            torch.cuda.empty_cache()  # hold only the weights while waiting for the device
        fcntl.flock(lock, fcntl.LOCK_EX)
        step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(cfg["steps"]):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        row["step_ms"] = round(1e3 * statistics.median(times), 2)
        row["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    if cfg["kind"] == "lowmem":
        import lowmem_compile

        remat = lowmem_compile.last_report().to_dict()["remat"]
        row["predicted_peak_bytes"] = remat["predicted_peak_bytes"]
        row["remat"] = remat
        if row["peak_bytes"] and remat["predicted_peak_bytes"]:
            row["predicted_over_measured"] = round(remat["predicted_peak_bytes"] / row["peak_bytes"], 4)
    return row


def spawn(cfg: dict, deadline: float) -> dict:
    """Run one configuration in its own process, killed at `deadline` (time.monotonic()): a job that
    waited for a free slot gets what is left of the run's time, not a fresh allowance."""
    timeout = deadline - time.monotonic()
    if timeout < 60:
        return {**cfg, "error": "not run: --time-limit reached"}
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHINDUCTOR_CACHE_DIR=cfg["cache"], TORCHINDUCTOR_COMPILE_THREADS="4")
    env["CUDA_VISIBLE_DEVICES"] = str(cfg["gpu"])
    if cfg["smoke"]:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["TRITON_INTERPRET"] = "1"
    rc, out, err = run_process_group([sys.executable, __file__, "--worker", json.dumps(cfg)], env, ROOT, timeout)
    for line in out.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    tail = (err or "").strip().splitlines()[-3:]
    return {**cfg, "error": f"rc={rc}: " + " | ".join(tail)[-400:]}


def dominated(point: dict, rows: list[dict]) -> bool:
    """A lowmem point with no more memory and less time, or no more time and less memory."""
    p, t = point["peak_bytes"], point["step_ms"]
    for r in rows:
        if r["kind"] != "lowmem" or r.get("peak_bytes") is None:
            continue
        if (r["peak_bytes"] <= p and r["step_ms"] < t) or (r["step_ms"] <= t and r["peak_bytes"] < p):
            return True
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=4, help="workers compiling at once")
    ap.add_argument("--time-limit", type=float, default=280.0, help="seconds; no worker starts after it")
    ap.add_argument("--budgets", default="", help="GiB, comma-separated: lowmem auto points started at once")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs to spread workers over (one lock each)")
    ap.add_argument("--kinds", default="stock,lowmem", help="points to start: stock (Inductor budgets, checkpointing), lowmem")
    ap.add_argument("--fixed", default="none,full", help="lowmem remat policies run beside the budgets")
    ap.add_argument("--previous", default=None, metavar="JSON", help="remat_sweep.json of an earlier run of the same shape to include")
    ap.add_argument("--gpu-lock", default=None, metavar="PATH", help="one GPU: the lock file to share with other jobs (`flock PATH cmd`)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(MARKER + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.smoke:
        args.layers, args.seq, args.steps, args.parallel, args.time_limit = 2, 64, 2, 2, 3600.0
    t0 = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="remat_sweep_")
    base = dict(
        device="cpu" if args.smoke else "cuda", smoke=args.smoke, layers=args.layers, seq=args.seq,
        steps=args.steps, cache=os.path.join(scratch, "cache"),
    )
    gpus = 1 if args.smoke else max(1, args.gpus)
    if args.gpu_lock and gpus != 1:
        ap.error("--gpu-lock shares one GPU's lock: use it with --gpus 1")
    placed = 0

    def place(cfg: dict) -> dict:
        """The next GPU, round robin, and its lock."""
        nonlocal placed
        gpu, placed = placed % gpus, placed + 1
        return dict(cfg, gpu=gpu, lock=args.gpu_lock or os.path.join(scratch, f"device{gpu}.lock"))

    kinds = set(args.kinds.split(","))
    stock = [dict(base, name=n, kind="inductor", amb=a) for n, a in STOCK] + [dict(base, name="eager_gc", kind="eager_gc")]
    fixed = [dict(base, name=f"lowmem_{p}", kind="lowmem", remat=p) for p in filter(None, args.fixed.split(","))]
    for gib in filter(None, args.budgets.split(",")):
        fixed.append(dict(base, name=f"lowmem_auto@{gib}GiB", kind="lowmem", remat="auto", budget_bytes=int(float(gib) * GIB)))
    stock, fixed = (stock if "stock" in kinds else []), (fixed if "lowmem" in kinds else [])
    rows: list[dict] = []
    if args.previous:  # an earlier run's points (e.g. the stock ones), so one table compares all
        previous = json.loads(Path(args.previous).read_text())["rows"]
        rows += [dict(r, run="previous") for r in previous if (r["layers"], r["seq"]) == (args.layers, args.seq)]
    deadline = time.monotonic() + args.time_limit - 10
    with ThreadPoolExecutor(args.parallel) as pool:
        pending = {pool.submit(spawn, c, deadline): c for c in map(place, stock + fixed)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                cfg, row = pending.pop(fut), fut.result()
                rows.append(row)
                result = row.get("error") or f"{row.get('step_ms')} ms, peak {(row.get('peak_bytes') or 0) / GIB:.2f} GiB"
                print(f"[{time.perf_counter() - t0:6.1f}s] {row['name']}: {result}", flush=True)
                write(rows, args, time.perf_counter() - t0, quiet=True)  # a run cut short keeps what it measured
                remaining = args.time_limit - (time.perf_counter() - t0)
                if cfg["kind"] != "lowmem" and "lowmem" in kinds and row.get("peak_bytes") and remaining > 60:
                    budget = int(0.97 * row["peak_bytes"])  # just under the stock point's peak
                    c = place(dict(base, name=f"lowmem_auto@{cfg['name']}", kind="lowmem", remat="auto", budget_bytes=budget))
                    pending[pool.submit(spawn, c, deadline)] = c
                elif cfg["kind"] != "lowmem" and "lowmem" in kinds and args.smoke and row.get("step_ms"):
                    c = place(dict(base, name=f"lowmem_auto@{cfg['name']}", kind="lowmem", remat="auto", budget_bytes=1))
                    pending[pool.submit(spawn, c, deadline)] = c
    write(rows, args, time.perf_counter() - t0)
    return 0


def write(rows: list[dict], args, wall: float, quiet: bool = False) -> None:
    out = default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        if r["kind"] != "lowmem" and r["peak_bytes"]:
            r["dominated_by_lowmem"] = dominated(r, ok)
    result = {"env": environment(), "args": vars(args), "wall_s": round(wall, 1), "rows": rows}
    (out / "remat_sweep.json").write_text(json.dumps(result, indent=1, default=str))
    gib = lambda b: None if not b else round(b / GIB, 2)  # noqa: E731
    table_rows = [
        (r["name"], gib(r.get("budget_bytes")), gib(r.get("peak_bytes")), gib(r.get("predicted_peak_bytes")),
         r.get("predicted_over_measured"), r.get("step_ms"), r.get("compile_s"), r.get("dominated_by_lowmem"),
         r.get("error"))
        for r in sorted(rows, key=lambda r: (r["kind"] != "lowmem", r["name"]))
    ]
    header = ["config", "budget GiB", "peak GiB", "predicted GiB", "pred/meas", "step ms", "compile s", "dominated", "error"]
    title = f"remat sweep: {'smoke (CPU)' if args.smoke else 'llama3-8b shape'}, {args.layers} layers, seq {args.seq}\n\n"
    table = markdown_table(header, table_rows)
    (out / "remat_sweep.md").write_text(title + table)
    if not quiet:
        plot(ok, out / "remat_sweep.png")
        print(title + table, flush=True)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("lowmem", "o"), ("inductor", "s"), ("eager_gc", "^")):
        pts = [r for r in rows if r["kind"] == kind and r.get("peak_bytes")]
        ax.scatter([r["peak_bytes"] / GIB for r in pts], [r["step_ms"] for r in pts], marker=marker, label=kind)
        for r in pts:
            ax.annotate(r["name"].replace("lowmem_", ""), (r["peak_bytes"] / GIB, r["step_ms"]), fontsize=6)
    ax.set_xlabel("peak memory (GiB, max_memory_allocated)")
    ax.set_ylabel("median step time (ms)")
    ax.set_title("forward + backward: peak memory vs step time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
