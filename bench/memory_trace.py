"""Where a step's device memory goes: one step recorded with PyTorch's allocator history, summarized.

The benchmarks measure a step's allocated and reserved peaks; this says what makes them: which
blocks are live at the allocated peak (with the Python frames that allocated them: the line of
Inductor's generated code names the buffer and the graph nodes it computes) and how much the
allocator holds beyond what is allocated when its reserved memory peaks. Used by `bench/e2e.py
--memory-trace` (one more step after the timed ones; the summary goes into the row, a few kB).

Recording starts mid-run, so blocks allocated before the step (weights, optimizer state, what the
previous step left) appear only as `allocated_at_start`; the trace adds and removes what the step
allocates and frees.

A block counts as allocated until its free is requested, as in the allocator's own statistics
(`max_memory_allocated`). A block used by another stream (a parked value's copy to the host) is
not reusable until that stream's work is done ("free_completed"): those bytes, freed but pending,
are reserved memory that holds no live tensor, and the summary gives them at the reserved peak.
"""

from __future__ import annotations

import linecache
from typing import Any, Iterable

#: Blocks listed at the allocated peak, largest first.
TOP = 30
#: Frames kept per block: the innermost ones outside PyTorch's own Python files.
FRAMES = 3
#: Events that map device memory into the allocator's segments, and that unmap it (plain segments,
#: and expandable ones).
_SEGMENT_UP, _SEGMENT_DOWN = ("segment_alloc", "segment_map"), ("segment_free", "segment_unmap")


def record_step(run_step) -> dict[str, Any]:
    """Run `run_step()` on CUDA with the allocator's history on, and summarize it. The allocator's
    cache is emptied first, so the step grows its reserved memory inside the trace (otherwise the
    reserved peak was reached in an earlier step and the trace cannot say what it held: 2026-12-07T22)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=1_000_000)
    try:
        run_step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    device = torch.cuda.current_device()
    trace = snapshot["device_traces"][device] if snapshot.get("device_traces") else []
    return summarize(trace, allocated, reserved)


def summarize(trace: Iterable[dict[str, Any]], allocated_at_start: int, reserved_at_start: int) -> dict[str, Any]:
    """Replay the allocator's events from the step's starting allocated and reserved bytes: the
    allocated peak and the blocks the step allocated that are live there, and the reserved peak
    with what was allocated at that moment."""
    allocated, reserved = allocated_at_start, reserved_at_start
    live: dict[int, dict[str, Any]] = {}  # address -> the alloc event of a block the step allocated
    pending: dict[int, int] = {}  # address -> bytes of a block freed but waiting for another stream
    peak = {"allocated": allocated, "live": [], "at": -1}
    peak_reserved = {"reserved": reserved, "allocated": allocated, "pending": 0, "at": -1}
    events = 0
    for i, event in enumerate(trace):
        action, size = event.get("action"), int(event.get("size", 0))
        events += 1
        if action == "alloc":
            allocated += size
            live[event["addr"]] = event
            if allocated > peak["allocated"]:
                peak = {"allocated": allocated, "live": list(live.values()), "at": i}
        elif action == "free_requested":
            allocated -= size
            live.pop(event.get("addr"), None)
            pending[event.get("addr")] = size
        elif action == "free_completed":
            pending.pop(event.get("addr"), None)
        elif action in _SEGMENT_UP:
            reserved += size
            if reserved > peak_reserved["reserved"]:
                peak_reserved = {"reserved": reserved, "allocated": allocated, "pending": sum(pending.values()), "at": i}
        elif action in _SEGMENT_DOWN:
            reserved -= size
    blocks = sorted(peak["live"], key=lambda e: -int(e.get("size", 0)))
    step_bytes = sum(int(e.get("size", 0)) for e in blocks)
    return {
        "events": events,
        "allocated_at_start": allocated_at_start,
        "reserved_at_start": reserved_at_start,
        "peak_allocated": peak["allocated"],
        "peak_event": peak["at"],
        "at_peak_from_before_the_step": peak["allocated"] - step_bytes,
        "at_peak_from_the_step": step_bytes,
        "at_peak_blocks": len(blocks),
        "at_peak_largest": [{"bytes": int(e.get("size", 0)), "where": where(e.get("frames", []))} for e in blocks[:TOP]],
        "peak_reserved": peak_reserved["reserved"],
        "allocated_at_peak_reserved": peak_reserved["allocated"],
        "pending_at_peak_reserved": peak_reserved["pending"],
        "peak_reserved_event": peak_reserved["at"],
    }


def where(frames: list[dict[str, Any]]) -> list[str]:
    """The innermost frames outside PyTorch's Python files, each as `file:line name`, with the
    source line when the file can be read (Inductor's generated code: the buffer and its nodes)."""
    out = []
    for frame in frames:
        filename = str(frame.get("filename", ""))
        if "/torch/" in filename and "torchinductor" not in filename:
            continue
        text = linecache.getline(filename, int(frame.get("line", 0))).strip()
        short = "/".join(filename.rsplit("/", 2)[-2:])
        out.append(f"{short}:{frame.get('line')} {frame.get('name')}" + (f"  | {text[:160]}" if text else ""))
        if len(out) == FRAMES:
            break
    return out


def table(summary: dict[str, Any], rows: int = 12) -> str:
    """The summary as a few lines of text (for the worker's log)."""
    gib = 2**30
    lines = [
        f"allocated peak {summary['peak_allocated'] / gib:.3f} GiB: {summary['at_peak_from_before_the_step'] / gib:.3f} "
        f"from before the step + {summary['at_peak_from_the_step'] / gib:.3f} the step allocated "
        f"({summary['at_peak_blocks']} blocks, event {summary['peak_event']} of {summary['events']})",
        f"reserved peak {summary['peak_reserved'] / gib:.3f} GiB with {summary['allocated_at_peak_reserved'] / gib:.3f} "
        f"allocated then and {summary.get('pending_at_peak_reserved', 0) / gib:.3f} freed but waiting for another "
        f"stream (event {summary['peak_reserved_event']})",
    ]
    for block in summary["at_peak_largest"][:rows]:
        lines.append(f"  {block['bytes'] / 2**20:9.1f} MiB  " + (" <- ".join(block["where"]) or "?"))
    return "\n".join(lines)
