"""Op time model: how long recomputing a forward node would take on the device.

A node costs max(FLOPs / matmul rate, bytes moved / bandwidth) when it is compute-heavy (matmuls,
attention, our `lowmem::` ops, anything with a formula in `torch.utils.flop_counter`) and its bytes
over bandwidth when it is a non-fusible memory op. A pointwise op, reduction or constant fill
(`full`) is fused by Inductor into the kernel that reads it: its output never reaches memory, so
recomputing it costs one read of its inputs, and a group of fused recomputed ops costs one read of
each distinct materialized value the group takes in (:func:`recompute_time`), not a read per op.
Rates are nominal datasheet figures (H200) or a modest CPU; the planner steers by the *ratio*
between ops, the report's added time by the absolute figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch.utils.flop_counter import flop_registry

from ..ops.library import declared_bytes_moved
from .sizes import is_getitem, is_view, size_hint, storage_root, tensor_bytes, tensor_outputs, tensor_val


@dataclass(frozen=True)
class DeviceRates:
    """Throughputs the time model divides by."""

    name: str
    matmul_flops_16bit: float
    """FLOP/s of bf16/fp16 matmuls (tensor cores on GPUs)."""
    matmul_flops_32bit: float
    """FLOP/s of fp32 matmuls."""
    bandwidth: float
    """Bytes/s of memory traffic."""
    host_link: float
    """Bytes/s of one direction of the host <-> device link (pinned copies)."""

    def flops_rate(self, dtype: torch.dtype) -> float:
        return self.matmul_flops_16bit if dtype in (torch.bfloat16, torch.float16) else self.matmul_flops_32bit


H200 = DeviceRates("H200", matmul_flops_16bit=790e12, matmul_flops_32bit=60e12, bandwidth=4.3e12, host_link=50e9)
CPU = DeviceRates("cpu (nominal)", matmul_flops_16bit=0.2e12, matmul_flops_32bit=0.2e12, bandwidth=20e9, host_link=20e9)


def rates_for(device: torch.device) -> DeviceRates:
    """Rates of `device`: H200 figures for CUDA (scaled by SM count for other GPUs), nominal CPU otherwise."""
    if device.type != "cuda":
        return CPU
    props = torch.cuda.get_device_properties(device)
    scale = props.multi_processor_count / 132  # the H200 has 132 SMs
    return DeviceRates(
        props.name,
        H200.matmul_flops_16bit * scale,
        H200.matmul_flops_32bit * scale,
        H200.bandwidth * min(1.0, scale),
        H200.host_link,
    )


def _node_tensors(node: torch.fx.Node) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fake tensors read and written by `node`."""
    ins = [v for a in node.all_input_nodes if (v := tensor_val(a)) is not None]
    return ins, tensor_outputs(node)


def _lowmem_flops(node: torch.fx.Node, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> int:
    """FLOPs of our own custom ops: attention is 4·B·H·Lq·Lk·D, NF4 dequantization none (it moves
    bytes: N·K/2 in, N·K 16-bit values out), the rest are linear-like (2·M·K·N)."""
    name = node.target.name()
    if not ins or not outs or "dequantize" in name:
        return 0
    if "attention" in name and len(ins) >= 2 and ins[0].dim() >= 2:
        q, k = ins[0], ins[1]
        return 4 * size_hint(q.numel()) * size_hint(k.shape[-2])
    if "cross_entropy" in name and len(ins) >= 2:
        x, w = ins[0], ins[1]
        return 2 * size_hint(x.numel()) * size_hint(w.shape[0])
    return 2 * size_hint(ins[0].numel()) * size_hint(outs[0].shape[-1]) if outs[0].dim() else 0


def node_flops(node: torch.fx.Node) -> int:
    """FLOPs of one node at the example sizes (0 for memory-bound ops)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return 0
    ins, outs = _node_tensors(node)
    if target.namespace == "lowmem":
        return _lowmem_flops(node, ins, outs)
    formula = flop_registry.get(target.overloadpacket)
    if formula is None:
        return 0
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    try:
        return size_hint(formula(*args, out_val=node.meta.get("val"), **kwargs))
    except (TypeError, ValueError, IndexError, RuntimeError):
        return 0  # a formula that does not accept this overload's arguments: treat as memory-bound


def is_fusible(node: torch.fx.Node) -> bool:
    """Pointwise ops (`prims.convert_element_type` included), reductions and constant fills:
    Inductor fuses them into neighbours, so they are nearly free and their outputs need no buffer."""
    target = node.target
    if is_view(node) or is_getitem(node):
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims"):
        return False
    return torch.Tag.pointwise in target.tags or target.overloadpacket in _REDUCTIONS | _FILLS | _GATHERS


_REDUCTIONS = {
    torch.ops.aten.sum,
    torch.ops.aten.mean,
    torch.ops.aten.amax,
    torch.ops.aten.amin,
    torch.ops.aten.var_mean,
    torch.ops.aten.prod,
}
#: Indexed loads Inductor lowers as pointwise kernels: the values they index are computed in place
#: (a gather of a log-softmax never materializes the log-softmax); they read only what they index.
_GATHERS = {torch.ops.aten.gather, torch.ops.aten.index, torch.ops.aten.embedding}
_FILLS = {
    torch.ops.aten.full,
    torch.ops.aten.full_like,
    torch.ops.aten.zeros,
    torch.ops.aten.zeros_like,
    torch.ops.aten.ones,
    torch.ops.aten.ones_like,
    torch.ops.aten.scalar_tensor,
}


def node_time(node: torch.fx.Node, rates: DeviceRates) -> float:
    """Seconds the node would take if it ran once more (its recompute cost)."""
    if node.op != "call_function" or is_view(node) or is_getitem(node):
        return 0.0
    ins, outs = _node_tensors(node)
    moved = declared_bytes_moved(node, sum(tensor_bytes(t) for t in ins + outs))  # an outside op may declare it
    flops = node_flops(node)
    if flops:
        dtype = ins[0].dtype if ins else torch.float32
        return max(flops / rates.flops_rate(dtype), moved / rates.bandwidth)
    if _is_gather(node):
        return 2 * sum(tensor_bytes(t) for t in outs) / rates.bandwidth  # the indices and the rows read
    if is_fusible(node):
        return sum(tensor_bytes(t) for t in ins) / rates.bandwidth
    return moved / rates.bandwidth


def _is_gather(node: torch.fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.overloadpacket in _GATHERS


def recompute_time(nodes: list[torch.fx.Node], rates: DeviceRates) -> float:
    """Seconds to run `nodes` (the recomputed forward ops of a backward graph) once more. Non-fusible
    ops cost :func:`node_time` each. The fusible ones run inside their readers' kernels: together
    they cost one read of every distinct storage they take in that is not itself a fused member of
    the group (a saved value, an input, a matmul's output), however many of them read it."""
    group = {n for n in nodes if is_fusible(n) and not _is_gather(n)}
    total = sum(node_time(n, rates) for n in nodes if n not in group)
    reads: dict[torch.fx.Node, int] = {}
    for node in group:
        for arg in node.all_input_nodes:
            root = storage_root(arg)
            if root in group or (is_getitem(root) and root.args[0] in group):
                continue
            val = tensor_val(root) if tensor_val(root) is not None else tensor_val(arg)
            if val is not None:
                reads[root] = tensor_bytes(val)
    return total + sum(reads.values()) / rates.bandwidth
