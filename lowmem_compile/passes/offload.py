"""Offload: the third answer for a value the backward needs, beside save and recompute.

Runs on a partitioned step (forward and backward graphs), not on the Dynamo graph: the partitioner
(`passes/remat.py`) applies it to every plan it scores, so the cost model sees each plan's peak with
the offloaded values off the device. A chosen saved value `x` becomes `offload(x)` in the forward
(a host copy, started right after `x` is computed; `x` itself is then freed after its last forward
use) and `reload(host, ticket)` in the backward, placed just before the first node that reads it.

Which values: the saved values of every layer but the last (by `layer_of`, values computed before
the last layer's first node), contiguous, of at least `MIN_BYTES`, owning their storage (a view, or a
storage the backward also gets through a view, would stay on the device anyway). The last layer's values are read
first by the backward, so parking them would only add a round trip; small ones are not worth a copy.
Under `remat="full"` those are the layer inputs: at 8192 tokens of Llama-3-8B, 64 MiB a layer.
A layer body compiled once for every layer (`passes/layers.py`) parks all it saves, its hidden-state
input included, in every call: the last layer runs the same code.

Prefetch: each copy back starts (`prefetch`) as late as it can and still be done when its value
is first read, on the time model's clock for the backward's nodes with `PREFETCH_SLACK` to spare,
the copies back to back on one link in reading order; the device copy is live from there, which
the liveness walk sees. At 8192 tokens of Llama-3-8B under `full` that is one layer input (64 MiB)
started about a layer of backward ahead. The copies are charged only where they would keep the
backward waiting (:func:`exposed_seconds`); the forward's copies overlap the forward on their own
stream and are charged where they would outlast it.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from itertools import accumulate

import torch
import torch.fx

from ..cost.sizes import prefetch_of, storage_root, tensor_bytes, tensor_val
from ..cost.timing import DeviceRates, node_time
from ..ops import offload as offload_ops

#: Saved values smaller than this stay on the device.
MIN_BYTES = 1 << 20
#: Share of the host's physical memory that a step's parked values may take; the rest is the
#: process's own (Python, tables kept in host memory, the optimizer's copies) and the system's. Of the
#: physical memory, not of what is free at compile time, so the plan, and AOTAutograd's cache key
#: that holds this module's tunables, does not change from run to run.
HOST_SHARE = 0.75
#: A prefetch starts this many copy times ahead of its read on the time model, whose rates are
#: nominal: a copy slower than modelled, or work faster, must still not keep the backward waiting.
PREFETCH_SLACK = 1.5


def choose(
    fw: torch.fx.GraphModule,
    num_fwd_outputs: int,
    last_layer_start: torch.fx.Node | None,
    inputs: frozenset[str] = frozenset(),
) -> list[torch.fx.Node]:
    """The saved forward values to park in host memory (see the module docstring). With no
    `last_layer_start` (a layer body compiled once for every layer), all of them, and the saved
    inputs named in `inputs` too (the hidden state a call took from the layer before)."""
    out = fw.graph.find_nodes(op="output")[0].args[0]
    user = {storage_root(o) for o in out[:num_fwd_outputs] if isinstance(o, torch.fx.Node)}
    saved = [o for o in out[num_fwd_outputs:] if isinstance(o, torch.fx.Node)]
    order = {n: i for i, n in enumerate(fw.graph.nodes)}
    limit = len(order) if last_layer_start is None else order[last_layer_start]
    sharing = Counter(storage_root(o) for o in saved)
    chosen = []
    for node in saved:
        val = tensor_val(node)
        movable = node.op == "call_function" or (node.op == "placeholder" and node.name in inputs)
        # a view, or a storage also saved through a view, would stay on the device anyway
        if not movable or val is None or storage_root(node) is not node or sharing[node] > 1 or node in user:
            continue
        if order[node] < limit and val.is_contiguous() and tensor_bytes(val) >= MIN_BYTES:
            chosen.append(node)
    return chosen


def host_bytes_for_parking() -> int:
    """What one step may park in host memory (`HOST_SHARE` of the host's physical memory)."""
    import os

    return int(HOST_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def within_host(values: list[torch.fx.Node], calls: int, limit: int) -> tuple[list[torch.fx.Node], int]:
    """The values to park, largest first, such that `calls` calls of the graph park at most `limit`
    bytes, and the bytes a call keeps on the device instead. Where the host cannot hold everything
    (a long sequence: 32 layers of Llama-3-8B at 524288 tokens park 128 GiB of layer inputs alone),
    the device keeps the rest rather than the host running out of memory mid-step."""
    kept, total, left = [], 0, 0
    for node in sorted(values, key=lambda n: tensor_bytes(tensor_val(n)), reverse=True):
        size = tensor_bytes(tensor_val(node))
        if (total + size) * calls <= limit:
            kept.append(node)
            total += size
        else:
            left += size
    order = {n: i for i, n in enumerate(values)}
    return sorted(kept, key=order.__getitem__), left


def apply(
    fw: torch.fx.GraphModule,
    bw: torch.fx.GraphModule,
    values: list[torch.fx.Node],
    device: torch.device,
    rates: DeviceRates,
    ahead: bool = False,
) -> int:
    """Rewrite `fw` and `bw` in place so that `values` travel through host memory; returns the
    bytes moved. The backward placeholder of each value takes the host copy's name, which is how
    the cost model matches saved values across the two graphs. With `ahead` (a layer body that
    every layer calls), each prefetch also starts the same value's copy of the call before
    (`ops.offload`), so a layer's values come back while the layer after it runs its backward."""
    output = fw.graph.find_nodes(op="output")[0]
    outs = list(output.args[0])
    placeholders = {p.name: p for p in bw.graph.find_nodes(op="placeholder")}
    nodes = list(bw.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    clock = list(accumulate((node_time(n, rates) for n in nodes), initial=0.0))  # clock[i]: node i starts
    moves = [(min(p.users, key=order.__getitem__), node, p) for node in values if (p := placeholders[node.name]).users]
    moves.sort(key=lambda m: order[m[0]])
    # as late as possible on the time model, copies back to back on one link, each done when read
    first_compute = next(i for i, n in enumerate(nodes) if n.op != "placeholder")
    starts, next_start = [], math.inf
    for reader, node, _ in reversed(moves):
        start = min(clock[order[reader]], next_start) - PREFETCH_SLACK * tensor_bytes(tensor_val(node)) / rates.host_link
        next_start = start
        at = max(bisect.bisect_right(clock, start, hi=order[reader] + 1) - 1, first_compute)
        starts.append(nodes[at])
    moved = 0
    for (reader, node, placeholder), start in zip(moves, reversed(starts)):
        val = tensor_val(node)
        # an input's copy starts after the last input: placeholders come first in a graph
        after = node if node.op != "placeholder" else fw.graph.find_nodes(op="placeholder")[-1]
        with fw.graph.inserting_after(after):
            host = fw.graph.call_function(offload_ops.offload.default, (node,))
        with val.fake_mode:
            host.meta["val"] = offload_ops.offload.default(val)
        outs[outs.index(node)] = host
        placeholder._rename(host.name)
        placeholder.meta["val"] = host.meta["val"]
        with bw.graph.inserting_before(start):
            ticket = bw.graph.call_function(offload_ops.prefetch.default, (placeholder, device, len(moves) if ahead else 0))
        with bw.graph.inserting_before(reader):
            back = bw.graph.call_function(offload_ops.reload.default, (placeholder, device, ticket))
        with val.fake_mode:
            ticket.meta["val"] = offload_ops.prefetch.default(host.meta["val"], device, 0)
        back.meta["val"] = val
        placeholder.replace_all_uses_with(back, delete_user_cb=lambda u: u not in (back, ticket))
        moved += tensor_bytes(val)
    output.args = (type(output.args[0])(outs),)
    fw.recompile()
    bw.recompile()
    return moved


def exposed_seconds(fw: torch.fx.GraphModule, bw: torch.fx.GraphModule, rates: DeviceRates, ahead: bool = False) -> float:
    """Seconds the host link adds to the step, from a walk of both graphs on the time model: the
    copies queue on one link (the forward's first, then each prefetch as issued), a reload waits
    for its copy, every other node takes its `node_time`. With `ahead` (see `apply`), a call's
    copies back run during the backward of the call after it: only what outlasts a backward shows."""
    link = now = 0.0
    for node in fw.graph.nodes:
        if node.target is offload_ops.offload.default:
            link = max(link, now) + tensor_bytes(tensor_val(node)) / rates.host_link
        else:
            now += node_time(node, rates)
    if ahead:
        back = sum(tensor_bytes(tensor_val(n.args[0])) for n in bw.graph.nodes if n.target is offload_ops.prefetch.default)
        work = sum(node_time(n, rates) for n in bw.graph.nodes)
        return max(0.0, link - now) + max(0.0, back / rates.host_link - work)
    link, now, work = max(0.0, link - now), 0.0, 0.0
    done: dict[torch.fx.Node, float] = {}
    for node in bw.graph.nodes:
        if node.target is offload_ops.prefetch.default:
            link = max(link, now) + tensor_bytes(tensor_val(node.args[0])) / rates.host_link
            done[node] = link
        elif node.target is offload_ops.reload.default:
            ticket = prefetch_of(node)
            if ticket is None:
                link = max(link, now) + tensor_bytes(tensor_val(node)) / rates.host_link
            now = max(now, done.get(ticket, link))
        else:
            cost = node_time(node, rates)
            now, work = now + cost, work + cost
    return now - work
