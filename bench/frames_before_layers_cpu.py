"""The graphs a framed model runs before its layers (embedding rows, rotary tables, the mask), on the CPU.

    python bench/frames_before_layers_cpu.py [--repo PATH] [--trials N]

A tiny 3-layer LoRA Llama with its embedding in host memory and a frame per decoder layer, compiled
by Inductor with cold caches (a fresh process and cache folder per trial), 1 row of 512 tokens:
seconds to the end of the first backward, the graphs compiled, the shapes of the masks the graph
before the layers marks for them, and the attention sites left on the general-mask path. `--packed`
packs two documents in the row (position ids restarting). `--repo` runs the same measurement on another checkout (an
earlier commit) so the two can be compared in one call; trials alternate between the checkouts.
CPU figures only: Inductor's C++ compiles here stand in for its Triton compiles on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(packed: bool) -> None:
    import torch

    import lowmem_compile
    from lowmem_compile import layer_frames
    from tests.models import batch, tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=3)
    model.config.use_cache = False
    lowmem_compile.offload_embeddings_(model)
    layer_frames.layer_frames_(model)
    shapes = []
    name = "mark_mask" if hasattr(layer_frames, "mark_mask") else "mark_causal"  # (an earlier checkout's name)
    mark = getattr(layer_frames, name)
    setattr(layer_frames, name, lambda mask, *form: (shapes.append(list(mask.shape)), mark(mask, *form)))
    inputs = batch(size=1, seq=512)
    if packed:
        inputs["position_ids"] = torch.cat([torch.arange(200), torch.arange(312)]).unsqueeze(0)
    start = time.perf_counter()
    torch.compile(model, backend="lowmem", options={"attention": "kv16"})(**inputs).loss.backward()
    seconds = time.perf_counter() - start
    report = lowmem_compile.last_report().to_dict()
    print(json.dumps({"first_step_s": round(seconds, 2), "graphs": report["graphs"], "marked_masks": shapes,
                      "run_as_fx": report["layers"].get("run_as_fx"), "general_masks": report["attention"]["general_masks"]}))


def trial(repo: str, packed: bool) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"), PYTHONPATH=repo)
        command = [sys.executable, os.path.join(HERE, os.path.basename(__file__)), "--worker"] + ["--packed"] * packed
        out = subprocess.run(command, cwd=repo,
                             env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--repo", help="another checkout to measure beside this one")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--packed", action="store_true", help="two documents in the row")
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, os.getcwd())
        worker(args.packed)
        return
    repos = {"this checkout": os.path.dirname(HERE)}
    if args.repo:
        repos["--repo " + args.repo] = os.path.abspath(args.repo)
    for i in range(args.trials):
        for name, repo in repos.items():
            print(f"trial {i + 1}, {name}{', packed' if args.packed else ''}: {json.dumps(trial(repo, args.packed))}", flush=True)


if __name__ == "__main__":
    main()
