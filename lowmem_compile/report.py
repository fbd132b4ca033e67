"""What each pass did, per compiled graph, as data (`to_dict`, a public contract) and as a table.

Every pass returns one stats dataclass; the backend files it under the pass's report key. A
:class:`Report` covers the graphs compiled since the last :func:`lowmem_compile.reset` (a model with
graph breaks compiles several), and sums them: counts and bytes add, peaks take the maximum, lists
concatenate. :func:`last_report` returns it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

_SUM, _MAX, _CONCAT, _LAST, _UNION, _UPDATE = "sum", "max", "concat", "last", "union", "update"


def _merged(a: Any, b: Any) -> Any:
    """Fold stats `b` into `a` (same dataclass type) by each field's declared rule."""
    updates = {}
    for f in dataclasses.fields(a):
        rule = f.metadata.get("merge", _SUM)
        x, y = getattr(a, f.name), getattr(b, f.name)
        if rule == _SUM:
            updates[f.name] = x + y
        elif rule == _MAX:
            updates[f.name] = y if x is None else x if y is None else max(x, y)
        elif rule == _CONCAT:
            updates[f.name] = list(x) + list(y)
        elif rule == _UNION:
            updates[f.name] = list(dict.fromkeys(list(x) + list(y)))
        elif rule == _UPDATE:
            updates[f.name] = y if x is None else x if y is None else {**x, **y}
        else:
            updates[f.name] = y if y is not None else x
    return dataclasses.replace(a, **updates)


def _rule(rule: str, default: Any = 0) -> Any:
    if rule in (_CONCAT, _UNION):
        return field(default_factory=list, metadata={"merge": rule})
    return field(default=default, metadata={"merge": rule})


@dataclass(frozen=True)
class AttentionStats:
    replaced: int = _rule(_SUM)
    causal_masks: int = _rule(_SUM)  # of those, sites whose HF 4-D mask became causal + key padding
    general_masks: int = _rule(_SUM)  # of those, sites left reading a full [Sq, Sk] mask tile by tile
    skipped: list[str] = _rule(_CONCAT)
    window_masks: int = _rule(_SUM)  # of the causal ones, sites with a sliding window (tiles outside skipped)
    packed_masks: int = _rule(_SUM)  # of the causal ones, sites with packed documents (segment ids)


@dataclass(frozen=True)
class NF4Stats:
    lowered: int = _rule(_SUM)
    bytes_before: int = _rule(_SUM)
    bytes_after: int = _rule(_SUM)
    skipped: list[str] = _rule(_CONCAT)


@dataclass(frozen=True)
class LossStats:
    fused: int = _rule(_SUM)
    chunk_tokens: int = _rule(_MAX)
    skipped: list[str] = _rule(_CONCAT)


@dataclass(frozen=True)
class MLPStats:
    chunked: int = _rule(_SUM)
    chunks: int = _rule(_MAX)
    skipped: list[str] = _rule(_CONCAT)


@dataclass(frozen=True)
class RematStats:
    policy: str = _rule(_LAST, "none")
    saved_bytes: int = _rule(_SUM)
    predicted_peak_bytes: int | None = _rule(_MAX, None)
    predicted_peak_outputs_freed_bytes: int | None = _rule(_MAX, None)
    recomputed: int = _rule(_SUM)
    offloaded_bytes: int = _rule(_SUM)
    added_flops: int = _rule(_SUM)
    added_seconds: float = _rule(_SUM, 0.0)
    budget_bytes: int | None = _rule(_LAST, None)
    longest_fitting_seq: int | None = _rule(_LAST, None)
    notes: list[str] = _rule(_CONCAT)
    knob: dict[str, Any] | None = _rule(_UPDATE, None)
    """What `memory_budget` chose for the options left at "budget" (knob.py), e.g. {"offload": "parked",
    "mlp_chunks": "off", "logits": "keep"}; None when it chose nothing (no budget, every one set). A
    framed step's pieces each add the options they decide (the layers parking and pieces, the tail
    the logits)."""
    knob_notes: list[str] = _rule(_UNION)
    """Why: each option set the knob planned, its predicted peak, and what it kept."""


@dataclass(frozen=True)
class CudaGraphStats:
    requested: int = _rule(_SUM)  # graphs compiled with `cudagraphs=True`
    skipped: list[str] = _rule(_CONCAT)  # Inductor's refusals seen while compiling them


@dataclass(frozen=True)
class LayerStats:
    bodies: int = _rule(_SUM)  # distinct layer graphs compiled
    calls: int = _rule(_SUM)  # layer calls those bodies serve
    skipped: list[str] = _rule(_CONCAT)  # why a graph compiled whole
    apart: list[str] = _rule(_CONCAT)  # why layers compiled as more than one body: where their graphs differ
    run_as_fx: int = _rule(_SUM)  # graphs of a framed model before its layers, run uncompiled (backend.py)
    masks_unbuilt: int = _rule(_SUM)  # of their causal masks, those not built: every layer drops them


@dataclass(frozen=True)
class WarmupStats:
    """First-use work done while Inductor compiled: our kernels (warmup.py, on a thread or in worker
    processes), and the host blocks a parked plan pins on a thread (ops/offload.py, `pin_ahead`)."""

    sites: int = _rule(_SUM)  # distinct sites of our ops found
    warmed: int = _rule(_SUM)  # of those, run once on the thread or in a worker: their kernels compiled there
    seconds: float = _rule(_SUM, 0.0)  # the thread's time, or the workers' wall time, beside the compile
    skipped: list[str] = _rule(_CONCAT)  # sites left to compile on first use, and why
    pinned_bytes: int = _rule(_SUM)  # pinned host memory allocated ahead for parked values
    pin_seconds: float = _rule(_SUM, 0.0)  # the pinning thread's time, beside the compile
    waited_seconds: float = _rule(_SUM, 0.0)  # how long the compile then waited for these threads to finish
    mode: str | None = _rule(_LAST, None)  # how our kernels were warmed: "thread" or "processes" (option warmup)
    workers: int = _rule(_SUM)  # worker processes started ("processes"); their wall time includes their start-up
    startup_seconds: float = _rule(_MAX, 0.0)  # from their start until the slowest worker was ready for its first site


@dataclass(frozen=True)
class CustomOpStats:
    """Calls of ops declared with `lowmem_compile.define_op` (passes/user.py)."""

    costed: int = _rule(_SUM)  # calls of ops that declare their cost: the planner may recompute them
    conservative: int = _rule(_SUM)  # calls of ops that declare none: never recomputed
    notes: list[str] = _rule(_UNION)  # one per conservative op


@dataclass(frozen=True)
class ShardingStats:
    """What FSDP2 shards on this rank, filed by `lowmem_compile.distributed.sharding_stats(model)`
    (and `fully_shard_layers_`), not by a compiled graph: the graphs see the gathered weights.
    `*_bytes` over all ranks, `*_local_bytes` held by this rank; `sharded_bytes` the parameters
    FSDP2 shards, `replicated_bytes` what every rank holds whole (parameters left unsharded, buffers);
    `largest_unit_bytes` one gathered layer unit, `root_unit_bytes` the root's own parameters."""

    ranks: int = 1
    units: int = 0
    nf4_bytes: int = 0
    nf4_local_bytes: int = 0
    trainable_bytes: int = 0
    trainable_local_bytes: int = 0
    other_bytes: int = 0
    other_local_bytes: int = 0
    sharded_bytes: int = 0
    replicated_bytes: int = 0
    largest_unit_bytes: int = 0
    root_unit_bytes: int = 0


#: The report's keys (a public contract) and the stats each holds.
SECTIONS: dict[str, type] = {
    "attention": AttentionStats,
    "nf4": NF4Stats,
    "remat": RematStats,
    "loss": LossStats,
    "mlp": MLPStats,
    "cudagraphs": CudaGraphStats,
    "layers": LayerStats,
    "custom_ops": CustomOpStats,
    "warmup": WarmupStats,
}


@dataclass
class GraphReport:
    """The stats of one compiled graph, keyed like :data:`SECTIONS`."""

    index: int
    nodes: int
    stats: dict[str, Any] = field(default_factory=dict)
    passes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """What each user pass returned (`options={"passes": [...]}`), by the pass's name."""

    def add(self, section: str, stats: Any) -> None:
        if section not in SECTIONS or not isinstance(stats, SECTIONS[section]):
            raise TypeError(f"report section {section!r} takes {SECTIONS.get(section)}, got {type(stats).__name__}")
        self.stats[section] = _merged(self.stats[section], stats) if section in self.stats else stats

    def add_pass(self, name: str, entry: dict[str, Any]) -> None:
        """File a user pass's report entry (a dict); a second entry of the same pass merges in."""
        self.passes[name] = _merged_entry(self.passes[name], entry) if name in self.passes else dict(entry)


@dataclass
class Report:
    graphs: list[GraphReport] = field(default_factory=list)
    sharding: ShardingStats | None = None
    """What FSDP2 shards (`lowmem_compile.distributed.sharding_stats`); None in one process."""

    def total(self, section: str) -> Any:
        """The section summed over every graph."""
        result = SECTIONS[section]()
        for graph in self.graphs:
            if section in graph.stats:
                result = _merged(result, graph.stats[section])
        return result

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"graphs": len(self.graphs)}
        for section in SECTIONS:
            out[section] = dataclasses.asdict(self.total(section))
        passes: dict[str, dict[str, Any]] = {}
        for graph in self.graphs:
            for name, entry in graph.passes.items():
                passes[name] = _merged_entry(passes[name], entry) if name in passes else dict(entry)
        out["passes"] = passes
        out["sharding"] = None if self.sharding is None else dataclasses.asdict(self.sharding)
        return out

    def __str__(self) -> str:
        d = self.to_dict()
        att, nf4, remat, loss, mlp, graphs, layers = (
            d[k] for k in ("attention", "nf4", "remat", "loss", "mlp", "cudagraphs", "layers"))
        peak = remat["predicted_peak_bytes"]
        rows = [
            ("graphs compiled", str(d["graphs"])),
            ("layer bodies compiled", f"{layers['bodies']} for {layers['calls']} layer calls"),
        ]
        if layers["run_as_fx"]:
            rows.append(("graphs before the layers, uncompiled",
                         f"{layers['run_as_fx']} ({layers['masks_unbuilt']} causal masks not built)"))
        rows += [
            ("attention sites replaced", str(att["replaced"])),
            ("linear layers in NF4", f"{nf4['lowered']} ({gib(nf4['bytes_before'])} -> {gib(nf4['bytes_after'])})"),
            ("LM head + loss fused", f"{loss['fused']} (chunk {loss['chunk_tokens']} tokens)"),
            ("MLP blocks in pieces", f"{mlp['chunked']} ({mlp['chunks']} pieces)"),
            ("remat policy", remat["policy"]),
            ("saved for backward", gib(remat["saved_bytes"])),
            ("values recomputed", str(remat["recomputed"])),
            ("offloaded to host memory", gib(remat["offloaded_bytes"])),
            ("predicted peak", gib(peak)),
        ]
        freed = remat["predicted_peak_outputs_freed_bytes"]
        if freed is not None and freed != peak:
            rows.append(("  if outputs freed before backward", gib(freed)))
        if remat["budget_bytes"] is not None:
            rows.append(("memory budget", gib(remat["budget_bytes"])))
        if remat["knob"]:
            rows.append(("memory knob chose", ", ".join(f"{k}={v}" for k, v in remat["knob"].items())))
        if remat["longest_fitting_seq"] is not None:
            rows.append(("longest sequence in budget", str(remat["longest_fitting_seq"])))
        if graphs["requested"]:
            rows.append(("CUDA graphs requested", f"{graphs['requested']} graph(s)"))
        warm = d["warmup"]
        if warm["sites"]:
            rows.append(("kernels warmed beside compile", f"{warm['warmed']} of {warm['sites']} sites ({warm['seconds']:.1f} s; "
                                                          f"the compile then waited {warm['waited_seconds']:.1f} s)"))
        if warm["pinned_bytes"]:
            rows.append(("host memory pinned ahead", f"{gib(warm['pinned_bytes'])} ({warm['pin_seconds']:.1f} s beside the compile)"))
        ops = d["custom_ops"]
        if ops["costed"] or ops["conservative"]:
            rows.append(("custom op calls", f"{ops['costed']} costed, {ops['conservative']} never recomputed"))
        shard = d["sharding"]
        if shard is not None:
            rows.append(("sharded over ranks", f"{shard['ranks']} ({shard['units']} FSDP units)"))
            rows.append(("  NF4 weights on this rank", f"{gib(shard['nf4_local_bytes'])} of {gib(shard['nf4_bytes'])}"))
            rows.append(("  trainable on this rank", f"{gib(shard['trainable_local_bytes'])} of {gib(shard['trainable_bytes'])}"))
            rows.append(("  other frozen on this rank", f"{gib(shard['other_local_bytes'])} of {gib(shard['other_bytes'])}"))
            rows.append(("  gathered layer unit", gib(shard["largest_unit_bytes"])))
        for name, entry in d["passes"].items():
            shown = ", ".join(f"{k}={_short(v)}" for k, v in entry.items() if k != "skipped")
            rows.append((f"pass {name}", shown or "ran"))
        width = max(len(k) for k, _ in rows)
        lines = ["lowmem report", "-" * (width + 30)]
        lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
        fallbacks = [("layers", s) for s in layers["skipped"] + layers["apart"]]
        fallbacks += [("attention", s) for s in att["skipped"]] + [("nf4", s) for s in nf4["skipped"]]
        if att["general_masks"]:
            fallbacks.append(("attention", _GENERAL_MASK_NOTE.format(n=att["general_masks"])))
        fallbacks += [("loss", s) for s in loss["skipped"]] + [("mlp", s) for s in mlp["skipped"]]
        fallbacks += [("knob", s) for s in remat["knob_notes"]]
        fallbacks += [("remat", s) for s in remat["notes"]] + [("cudagraphs", s) for s in graphs["skipped"]]
        fallbacks += [("custom_ops", s) for s in ops["notes"]] + [("warmup", s) for s in warm["skipped"]]
        for name, entry in d["passes"].items():
            skipped = entry.get("skipped", [])
            fallbacks += [(name, str(s)) for s in (skipped if isinstance(skipped, list) else [skipped])]
        for section, reason in fallbacks:
            lines.append(f"  [{section}] {reason}")
        return "\n".join(lines)


#: Why a general mask deserves a line: it cost the lean 8192-token step ~83 ms a layer on an H200.
_GENERAL_MASK_NOTE = (
    "{n} sites read a full [Sq, Sk] mask tile by tile (no causal block skipping, the mask kept for the "
    "backward): a mask the attention pass could not prove causal, windowed or made of packed documents "
    "(docs/attention.md says which forms it proves)"
)


def _merged_entry(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """A user pass's entries of two graphs as one: numbers add, lists concatenate, dicts merge the
    same way, anything else keeps the later value."""
    out = dict(a)
    for key, y in b.items():
        x = out.get(key)
        if key not in out:
            out[key] = y
        elif isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool) and not isinstance(y, bool):
            out[key] = x + y
        elif isinstance(x, list) and isinstance(y, list):
            out[key] = x + y
        elif isinstance(x, dict) and isinstance(y, dict):
            out[key] = _merged_entry(x, y)
        else:
            out[key] = y
    return out


def _short(value: Any) -> str:
    """A report entry's value in a table cell: a list by its length, long text cut."""
    text = f"{len(value)} items" if isinstance(value, list) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def gib(n: int | None) -> str:
    """Bytes in GiB, or MiB below one GiB so that small models do not read as zero; "n/a" for None."""
    if n is None:
        return "n/a"
    return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


class _ReportStore:
    """The graphs compiled since the last reset; guarded because Dynamo may compile from threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._report = Report()

    def set_sharding(self, stats: ShardingStats) -> None:
        with self._lock:
            self._report.sharding = stats

    def new_graph(self, nodes: int) -> GraphReport:
        with self._lock:
            graph = GraphReport(index=len(self._report.graphs), nodes=nodes)
            self._report.graphs.append(graph)
            return graph

    @contextlib.contextmanager
    def isolated(self) -> Iterator[Report]:
        """Graphs compiled inside go to a report of their own (yielded), not to `last_report()`:
        the memory knob's trial plans (knob.py)."""
        with self._lock:
            saved, self._report = self._report, Report()
            scratch = self._report
        try:
            yield scratch
        finally:
            with self._lock:
                self._report = saved

    def adopt(self, graph: GraphReport) -> GraphReport:
        """Append a graph's report made elsewhere (an isolated one), renumbered as the next graph."""
        with self._lock:
            graph.index = len(self._report.graphs)
            self._report.graphs.append(graph)
            return graph

    def graph(self, index: int) -> GraphReport | None:
        """The live report of graph `index` (None when there is none), to add to it."""
        with self._lock:
            graphs = self._report.graphs
            return graphs[index] if 0 <= index < len(graphs) else None

    def count(self) -> int:
        with self._lock:
            return len(self._report.graphs)

    def snapshot(self) -> Report:
        with self._lock:
            return Report(graphs=[dataclasses.replace(g, stats=dict(g.stats), passes=dict(g.passes)) for g in self._report.graphs],
                          sharding=self._report.sharding)

    def clear(self) -> None:
        with self._lock:
            self._report = Report()


STORE = _ReportStore()


def last_report() -> Report:
    """The report of the graphs compiled with `backend="lowmem"` since the last `lowmem_compile.reset()`."""
    return STORE.snapshot()
