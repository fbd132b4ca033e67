"""Offload: the third answer for a value the backward needs, beside save and recompute.

Runs on a partitioned step (forward and backward graphs), not on the Dynamo graph: the partitioner
(`passes/remat.py`) applies it to every plan it scores, so the cost model sees each plan's peak with
the offloaded values off the device. A chosen saved value `x` becomes `offload(x)` in the forward
(a host copy, started right after `x` is computed; `x` itself is then freed after its last forward
use) and `reload(host)` in the backward, placed just before the first node that reads it.

Which values: the saved values of every layer but the last (by `layer_of`, values computed before
the last layer's first node), contiguous, of at least `MIN_BYTES`, owning their storage (a view, or a
storage the backward also gets through a view, would stay on the device anyway). The last layer's values are read
first by the backward, so parking them would only add a round trip; small ones are not worth a copy.
Under `remat="full"` those are the layer inputs: at 8192 tokens of Llama-3-8B, 64 MiB a layer.

The reload is synchronous (the backward waits for the copy, ~1.3 ms a layer at 50 GB/s); the cost
model charges it, the offload is not charged (it overlaps the forward on its own stream).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from ..cost.sizes import storage_root, tensor_bytes, tensor_val
from ..ops import offload as offload_ops

#: Saved values smaller than this stay on the device.
MIN_BYTES = 1 << 20


def choose(fw: torch.fx.GraphModule, num_fwd_outputs: int, last_layer_start: torch.fx.Node) -> list[torch.fx.Node]:
    """The saved forward values to park in host memory (see the module docstring)."""
    out = fw.graph.find_nodes(op="output")[0].args[0]
    user = {storage_root(o) for o in out[:num_fwd_outputs] if isinstance(o, torch.fx.Node)}
    saved = [o for o in out[num_fwd_outputs:] if isinstance(o, torch.fx.Node)]
    order = {n: i for i, n in enumerate(fw.graph.nodes)}
    limit = order[last_layer_start]
    sharing = Counter(storage_root(o) for o in saved)
    chosen = []
    for node in saved:
        val = tensor_val(node)
        # a view, or a storage also saved through a view, would stay on the device anyway
        if node.op != "call_function" or val is None or storage_root(node) is not node or sharing[node] > 1 or node in user:
            continue
        if order[node] < limit and val.is_contiguous() and tensor_bytes(val) >= MIN_BYTES:
            chosen.append(node)
    return chosen


def apply(fw: torch.fx.GraphModule, bw: torch.fx.GraphModule, values: list[torch.fx.Node], device: torch.device) -> int:
    """Rewrite `fw` and `bw` in place so that `values` travel through host memory; returns the bytes
    offloaded. The backward placeholder of each value takes the host copy's name, which is how the
    cost model matches saved values across the two graphs."""
    if not values:
        return 0
    output = fw.graph.find_nodes(op="output")[0]
    outs = list(output.args[0])
    placeholders = {p.name: p for p in bw.graph.find_nodes(op="placeholder")}
    order = {n: i for i, n in enumerate(bw.graph.nodes)}
    moved = 0
    for node in values:
        val = tensor_val(node)
        placeholder = placeholders[node.name]
        if not placeholder.users:
            continue
        with fw.graph.inserting_after(node):
            host = fw.graph.call_function(offload_ops.offload.default, (node,))
        with val.fake_mode:
            host.meta["val"] = offload_ops.offload.default(val)
        outs[outs.index(node)] = host
        placeholder._rename(host.name)
        placeholder.meta["val"] = host.meta["val"]
        with bw.graph.inserting_before(min(placeholder.users, key=order.__getitem__)):
            back = bw.graph.call_function(offload_ops.reload.default, (placeholder, device))
        back.meta["val"] = val
        placeholder.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        moved += tensor_bytes(val)
    output.args = (type(output.args[0])(outs),)
    fw.recompile()
    bw.recompile()
    return moved
