"""The seam between graph and kernel: one helper that declares a `lowmem::` custom op.

Every replacement our passes make is such an op, so that Dynamo, AOTAutograd and Inductor see it as
one opaque node with known shapes (the fake impl), a known derivative (the autograd formula, whose
backward is itself an op) and two implementations: a plain-PyTorch reference that runs on any
device and is the specification every kernel is tested against, and a Triton implementation
chosen on CUDA. An op may also declare its workspace: the buffers its CUDA implementation allocates
for itself while it runs (a dequantized weight, a 16-bit K/V, a logits chunk). The graph cannot
show them, and the memory cost model must count them at the op or its predicted peak falls short.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

NAMESPACE = "lowmem"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_WORKSPACE: dict[str, Callable[..., list[torch.Tensor]]] = {}

#: Set LOWMEM_REFERENCE_OPS=1 to run the reference implementations on CUDA too (A/B and debugging).
_FORCE_REFERENCE = os.environ.get("LOWMEM_REFERENCE_OPS", "0") == "1"


def define_op(
    name: str,
    schema: str,
    *,
    reference: Callable[..., Any],
    fake: Callable[..., Any],
    cuda: Callable[..., Any] | None = None,
    backward: Callable[..., Any] | None = None,
    setup_context: Callable[..., Any] | None = None,
    workspace: Callable[..., list[torch.Tensor]] | None = None,
) -> torch._ops.OpOverloadPacket:
    """Declare `lowmem::<name><schema>` and return `torch.ops.lowmem.<name>`.

    `reference` serves every device (CompositeExplicitAutograd); `cuda`, when given, overrides it on
    CUDA tensors. `backward(ctx, *grads)` and `setup_context(ctx, inputs, output)` follow
    `torch.library.register_autograd`; an op without them is not differentiable. `workspace`, called
    like the fake impl, returns (fake) tensors shaped like the buffers the op allocates beyond its
    outputs and frees before returning (see :func:`workspace_of`).
    """
    qualname = f"{NAMESPACE}::{name}"
    if workspace is not None:
        _WORKSPACE[qualname] = workspace
    _LIB.define(name + schema)
    _LIB.impl(name, reference, "CompositeExplicitAutograd")
    if cuda is not None and not _FORCE_REFERENCE:
        _LIB.impl(name, cuda, "CUDA")
    torch.library.register_fake(qualname, fake, lib=_LIB)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIB)
    return getattr(torch.ops.lowmem, name)


def declares_workspace(target: Any) -> bool:
    """`target` is one of our ops and declares a workspace (a cheap test before `workspace_of`)."""
    return isinstance(target, torch._ops.OpOverload) and target._schema.name in _WORKSPACE


def workspace_of(target: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The buffers op `target` allocates while it runs, beyond its outputs, from its (fake) arguments;
    empty for an op that declares none and for anything that is not one of our ops."""
    return _WORKSPACE[target._schema.name](*args, **kwargs) if declares_workspace(target) else []
