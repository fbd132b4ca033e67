"""What every benchmark record carries (device, versions, date) and how results are written out.

Versions are read from package metadata, so nothing is imported (and no GPU is touched) to get them;
a peer library put on PYTHONPATH is found the same way as an installed one.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

#: Distributions whose versions go into every record (None where absent).
PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "liger_kernel", "unsloth", "unsloth_zoo")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_names() -> list[str]:
    """The GPUs `nvidia-smi` lists (empty without one), without starting CUDA in this process."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []


def environment() -> dict[str, Any]:
    """Device, versions and date for a benchmark record."""
    gpus = gpu_names()
    return {
        "gpu": gpus[0] if gpus else None,
        "gpu_count": len(gpus),
        "python": platform.python_version(),
        "versions": package_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def default_out_dir() -> Path:
    """`$OUT` where the runner sets it, else bench/results."""
    return Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; `None` prints as an empty cell and pipes in cells are escaped."""

    def cell(value: Any) -> str:
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def graph_replay_ms(fn, calls: int = 1, warmup: int = 10, rep: int = 40) -> float:
    """Median GPU ms of one call of `fn`: `calls` calls captured once in a CUDA graph, the replays
    timed by `triton.testing.do_bench` (ms of warm-up and of timing), so launch overhead and a busy
    host neither hide nor inflate the kernels. `fn` must have run once (lazy setup, autotuning).
    Raises RuntimeError where capture fails (an op that cannot be captured)."""
    import torch
    import triton.testing

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") / calls


#: Bytes of weight copies a memory-bound timing cycles through, well past the L2 (50 MB on H100/H200):
#: a model's layers each read their own weights from DRAM, and one weight replayed alone would be
#: read from the L2 (a 29 MB NF4 weight read at 5.4 TB/s, above the DRAM's peak).
COLD_BYTES = 512 << 20


def cold_copies(nbytes: int, most: int = 64) -> int:
    """How many copies of an `nbytes` weight make COLD_BYTES (at least 2, at most `most`)."""
    return min(most, max(2, -(-COLD_BYTES // nbytes)))


def cycling(items: Sequence[Any]) -> Callable[[], Any]:
    """A function returning the next of `items` at each call (so captured calls each read another)."""
    state = {"i": -1}

    def pick() -> Any:
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return pick


def run_process_group(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int | None, str, str]:
    """(returncode, stdout, stderr) of `cmd` run in its own process group, so that on timeout (returncode
    None) its children (Inductor's compile workers, say) are killed with it."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def grouped_bar_plot(
    groups: Sequence[str], series: Mapping[str, Mapping[str, float | str]], path: Path, title: str, ylabel: str
) -> str | None:
    """A PNG with a bar per series in each group; a string value marks that bar failed.

    Returns None, or why there is no plot (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups)), 4.5))
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        heights = [v if isinstance(v, (int, float)) else 0.0 for v in (values.get(g, 0.0) for g in groups)]
        ax.bar(xs, heights, width, label=label)
        for x, group, height in zip(xs, groups, heights):
            failed = isinstance(values.get(group), str)
            text = "failed" if failed else f"{height:.0f}" if group in values else ""
            ax.text(x, height, text, ha="center", va="bottom", fontsize=7, rotation=90 if failed else 0)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
