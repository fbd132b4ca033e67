"""The host link's measured rates, against the cost model's `host_link` (cost/timing.py: 50 GB/s).

    python bench/host_link.py            # on a CUDA machine; writes $OUT/host_link.json (or ./)

Why: a parked plan fills PARK_LINK_SHARE of the link's modelled bytes over each layer's modelled
forward time (passes/remat.py). If device-to-host copies run slower than modelled, they fall behind
the forward, and every block whose copy is still running is freed but not reusable: reserved memory
grows above the allocated peak (9.49 against 6.72 GiB at 8192 tokens on an H100, 2026-12-07T22,
where the lean row parks 323 MiB a layer every ~8 ms of forward: 38 GB/s needed).

Rows: device-to-host and host-to-device into pinned memory, on a side stream as `ops/offload.py`
copies, at 64 MiB and 1 GiB; and both directions at once (the backward's prefetches beside the
forward's tail). GB/s = 1e9 bytes a second.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def _rate(copy, nbytes: int, repeat: int = 10) -> float:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        copy()  # first touch
        stream.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(repeat):
            copy()
        end.record(stream)
    end.synchronize()
    return nbytes * repeat / (start.elapsed_time(end) / 1e3) / 1e9


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/host_link.py needs a CUDA device")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "modelled_gb_s": 50.0}
    for mib in (64, 1024):
        n = mib << 20
        device = torch.empty(n, dtype=torch.uint8, device="cuda")
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        result[f"d2h_{mib}MiB_gb_s"] = round(_rate(lambda: host.copy_(device, non_blocking=True), n), 1)
        result[f"h2d_{mib}MiB_gb_s"] = round(_rate(lambda: device.copy_(host, non_blocking=True), n), 1)
        back = torch.empty_like(device)
        host_in = torch.empty_like(host)
        other = torch.cuda.Stream()

        def both():
            host.copy_(device, non_blocking=True)
            with torch.cuda.stream(other):
                back.copy_(host_in, non_blocking=True)

        result[f"both_{mib}MiB_d2h_gb_s"] = round(_rate(both, n), 1)
        torch.cuda.synchronize()
    print(result)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "host_link.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
