"""Attention forms fwd+bwd on the GPU: head dim 256 against SDPA, sliding windows and packed documents
against our causal kernel, with the issue's targets beside each row.

    python bench/attention_forms.py            # H100/H200, bf16, batch 1
    python bench/attention_forms.py --smoke    # the same code at tiny shapes on the CPU (interpreter)
    python bench/attention_forms.py --sections d256   # one section

Rows (GPU time: each fwd+bwd captured once in a CUDA graph and the replays timed, as bench/attention.py):
- `d256`: head dim 256, 16 query and 16 KV heads (Gemma-7B), causal, 2k / 8k / 32k: SDPA flash and
  cuDNN (where they take head dim 256 with a backward), ours at kv16 and kv4 (cuDNN's kernels on our
  K/V storage since 2026-12-07), and our Triton kernels at kv16 (the route switched off for the row).
  Targets: ours kv16 >= 1.0x the faster SDPA, kv4 within 15% of kv16.
- `window`: head dim 128, 32 q / 8 KV heads (Mistral-7B), window 4096 at 8k / 32k / 128k, against ours
  causal at 4096 tokens times S / 4096 (the time a band of 4096 keys should cost). Target: <= 1.1x.
  Ours causal at S beside it (8k, 32k) for the speedup.
- `packed`: 8 documents of 2048 in a 16k row against ours causal at 16k. Target: <= 1/4 of it + 10%.
Writes $OUT/attention_forms.json and .md (the current directory without $OUT).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.attention import _fwd_bwd, _inputs, _sdpa, _time_ms  # noqa: E402


def _ours(bits, scale, **form):
    segments = form.pop("segments", None)

    def f(q, k, v):
        return torch.ops.lowmem.attention(q, k, v, None, segments, causal=True, scale=scale, kv_bits=bits, **form)[0]

    return f


def _triton_ms(f, cfg, s, device, dtype, cuda):
    """`_ms` with the cuDNN route at head dim 256 off for the whole measurement, forward and backward
    (codegen/attention_cudnn.py)."""
    from lowmem_compile.codegen import attention_cudnn

    served, attention_cudnn.SERVED_HEAD_DIMS = attention_cudnn.SERVED_HEAD_DIMS, ()
    try:
        return _ms(f, cfg, s, device, dtype, cuda)
    finally:
        attention_cudnn.SERVED_HEAD_DIMS = served


def _ms(f, cfg, s, device, dtype, cuda):
    """GPU ms of f's fwd+bwd at length s (None where the backend refuses the shape)."""
    qkv, do = _inputs(s, cfg, device, dtype)
    try:
        step, _ = _fwd_bwd(f, qkv, do)
        step()
        return _time_ms(step, cuda, graph=cuda)
    except RuntimeError as e:  # an SDPA backend without this head dim
        print(f"  skipped at {s}: {str(e).splitlines()[0][:120]}")
        return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--sections", default="d256,window,packed", help="comma-separated: d256, window, packed")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    import lowmem_compile.ops  # noqa: F401  (registers lowmem::attention)

    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float16)
    big = not args.smoke
    wide = dict(batch=1, hq=16, hkv=16, d=256) if big else dict(batch=1, hq=2, hkv=2, d=256)
    gqa = dict(batch=1, hq=32, hkv=8, d=128) if big else dict(batch=1, hq=4, hkv=2, d=64)
    window = 4096 if big else 16
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "d256": {}, "window": {}, "packed": {}}
    from torch.nn.attention import SDPBackend

    scale = wide["d"] ** -0.5
    sdpa = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION} if cuda else {"sdpa_math": SDPBackend.MATH}
    for s in ([2048, 8192, 32768] if big else [40]) if "d256" in sections else []:
        row = {name: _ms(_sdpa(b, scale), wide, s, device, dtype, cuda) for name, b in sdpa.items()}
        row.update({f"ours_kv{bits}": _ms(_ours(bits, scale), wide, s, device, dtype, cuda) for bits in (16, 4)})
        row["ours_triton_kv16"] = _triton_ms(_ours(16, scale), wide, s, device, dtype, cuda)
        best = min((v for k, v in row.items() if k.startswith("sdpa") and v), default=None)
        row["ours_kv16_vs_best_sdpa"] = best / row["ours_kv16"] if best else None
        row["kv4_over_kv16"] = row["ours_kv4"] / row["ours_kv16"]
        result["d256"][s] = row
        print("d256", s, row, flush=True)
    scale = gqa["d"] ** -0.5
    base = _ms(_ours(16, scale), gqa, window, device, dtype, cuda) if "window" in sections else None
    for s in ([8192, 32768, 131072] if big else [64]) if "window" in sections else []:
        row = {"ours_window": _ms(_ours(16, scale, window=window), gqa, s, device, dtype, cuda),
               "causal_window_x_s_over_window": base * s / window}
        row["ratio"] = row["ours_window"] / row["causal_window_x_s_over_window"]
        if s <= 32768:
            row["ours_causal"] = _ms(_ours(16, scale), gqa, s, device, dtype, cuda)
        result["window"][s] = row
        print("window", s, row, flush=True)
    if "packed" in sections:
        s, docs = (16384, 8) if big else (64, 4)
        segments = (torch.arange(s, device=device) // (s // docs))[None]
        causal = _ms(_ours(16, scale), gqa, s, device, dtype, cuda)
        packed = _ms(_ours(16, scale, segments=segments), gqa, s, device, dtype, cuda)
        result["packed"] = {"seq": s, "docs": docs, "ours_packed": packed, "ours_causal": causal, "ratio_to_quarter": packed / (causal / 4)}
        print("packed", result["packed"], flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "attention_forms.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "attention_forms.md"), "w") as f:
        f.write(f"# attention forms, {result['gpu']}, torch {result['torch']}, triton {result['triton']}, {result['date']}\n\n")
        for section in ("d256", "window"):
            for s, row in result[section].items():
                f.write(f"- {section} {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if v is not None) + "\n")
        if result["packed"]:
            f.write("- packed: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result["packed"].items()) + "\n")


if __name__ == "__main__":
    main()
