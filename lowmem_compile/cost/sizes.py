"""Sizes of graph values in bytes, concrete or symbolic.

A size is a sympy expression in the shape symbols of the graph (`s0`, `s1`, ...) when Dynamo made a
dimension dynamic and a plain int otherwise, so one liveness simulation answers "how much at
sequence length N" for every N. Views share their base's storage: :func:`storage_root` maps a value
to the node that owns the bytes, so a view is never counted twice.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx


def size_hint(value: int | torch.SymInt) -> int:
    """A concrete int for a possibly symbolic size: its value in the example inputs."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        if hint is None:
            raise ValueError(f"size {value} has no hint (data-dependent size); cannot estimate its bytes")
        return int(hint)
    return int(value)


def tensor_bytes(val: torch.Tensor) -> int:
    """Bytes of a (possibly symbolic) tensor's elements at the example inputs' sizes."""
    return size_hint(val.numel()) * val.element_size()


def sym_bytes(val: torch.Tensor) -> sympy.Expr:
    """Bytes of a tensor's elements as a sympy expression of the graph's shape symbols."""
    numel = val.numel()
    expr = numel.node.expr if isinstance(numel, torch.SymInt) else sympy.Integer(int(numel))
    return sympy.expand(expr * val.element_size())


def is_view(node: torch.fx.Node) -> bool:
    """True when the op's result aliases its first input (no new storage)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return len(returns) == 1 and returns[0].alias_info is not None and not returns[0].alias_info.is_write


def storage_root(node: torch.fx.Node) -> torch.fx.Node:
    """The node that owns the storage `node`'s value lives in (itself unless it is a view)."""
    while is_view(node) and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def tensor_val(node: torch.fx.Node) -> torch.Tensor | None:
    """The fake tensor a node produces, or None for non-tensor values (tuples, symbols, None)."""
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def tensor_outputs(node: torch.fx.Node) -> list[torch.Tensor]:
    """Every fake tensor a node produces (the elements of a multi-output op's tuple)."""
    val = node.meta.get("val")
    return [v for v in (val if isinstance(val, (tuple, list)) else [val]) if isinstance(v, torch.Tensor)]


def is_host_copy(node: torch.fx.Node) -> bool:
    """True for `lowmem::offload`: its result lives in host memory, which no device budget counts."""
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target.name() == "lowmem::offload"


def prefetch_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """For a `lowmem::reload` with a ticket, the `lowmem::prefetch` that made it: the device copy is
    allocated there, a layer of backward before the reload returns it."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.name() != "lowmem::reload":
        return None
    ticket = node.args[2] if len(node.args) > 2 else node.kwargs.get("ticket")
    return ticket if isinstance(ticket, torch.fx.Node) else None


def is_getitem(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem
