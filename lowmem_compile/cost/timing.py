"""Op time model: how long recomputing a forward node would take on the device.

A node costs max(FLOPs / matmul rate, bytes moved / bandwidth) when it is compute-heavy (matmuls,
attention, our `lowmem::` ops, anything with a formula in `torch.utils.flop_counter`), its bytes
over bandwidth when it is a non-fusible memory op, and a tenth of that when it is a pointwise op or
reduction: after Inductor fuses it into its consumer, recomputing it costs little more than
re-reading its inputs. Rates are nominal datasheet figures (H200) or a modest CPU; what matters to the
planner is the *ratio* between ops, not the absolute time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch.utils.flop_counter import flop_registry

from .sizes import is_getitem, is_view, size_hint, tensor_val, tensor_bytes

#: The fraction of its bytes a fused pointwise op or reduction costs when recomputed.
FUSED_FRACTION = 0.1


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

    def flops_rate(self, dtype: torch.dtype) -> float:
        return self.matmul_flops_16bit if dtype in (torch.bfloat16, torch.float16) else self.matmul_flops_32bit


H200 = DeviceRates("H200", matmul_flops_16bit=790e12, matmul_flops_32bit=60e12, bandwidth=4.3e12)
CPU = DeviceRates("cpu (nominal)", matmul_flops_16bit=0.2e12, matmul_flops_32bit=0.2e12, bandwidth=20e9)


def rates_for(device: torch.device) -> DeviceRates:
    """Rates of `device`: H200 figures for CUDA (scaled by SM count for other GPUs), nominal CPU otherwise."""
    if device.type != "cuda":
        return CPU
    props = torch.cuda.get_device_properties(device)
    scale = props.multi_processor_count / 132  # the H200 has 132 SMs
    return DeviceRates(
        props.name, H200.matmul_flops_16bit * scale, H200.matmul_flops_32bit * scale, H200.bandwidth * min(1.0, scale)
    )


def _node_tensors(node: torch.fx.Node) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fake tensors read and written by `node`."""
    ins = [v for a in node.all_input_nodes if (v := tensor_val(a)) is not None]
    val = node.meta.get("val")
    outs = [v for v in (val if isinstance(val, (tuple, list)) else [val]) if isinstance(v, torch.Tensor)]
    return ins, outs


def _lowmem_flops(node: torch.fx.Node, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> int:
    """FLOPs of our own custom ops: attention is 4·B·H·Lq·Lk·D, the rest are linear-like (2·M·K·N)."""
    name = node.target.name()
    if not ins or not outs:
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
    """Pointwise ops and reductions: Inductor fuses them into neighbours, so they are nearly free."""
    target = node.target
    if is_view(node) or is_getitem(node):
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return False
    return torch.Tag.pointwise in target.tags or target.overloadpacket in _REDUCTIONS


_REDUCTIONS = {
    torch.ops.aten.sum,
    torch.ops.aten.mean,
    torch.ops.aten.amax,
    torch.ops.aten.amin,
    torch.ops.aten.var_mean,
    torch.ops.aten.prod,
}


def node_time(node: torch.fx.Node, rates: DeviceRates) -> float:
    """Seconds the node would take if it ran once more (its recompute cost)."""
    if node.op != "call_function" or is_view(node) or is_getitem(node):
        return 0.0
    ins, outs = _node_tensors(node)
    moved = sum(tensor_bytes(t) for t in ins + outs)
    flops = node_flops(node)
    if flops:
        dtype = ins[0].dtype if ins else torch.float32
        return max(flops / rates.flops_rate(dtype), moved / rates.bandwidth)
    if is_fusible(node):
        return FUSED_FRACTION * moved / rates.bandwidth
    return moved / rates.bandwidth
