"""The seam between graph and kernel: one helper that declares a `lowmem::` custom op.

Every replacement our passes make is such an op, so that Dynamo, AOTAutograd and Inductor see it as
one opaque node with known shapes (the fake impl), a known derivative (the autograd formula, whose
backward is itself an op) and two implementations: a plain-PyTorch reference that runs on any
device and is the specification every kernel is tested against, and a Triton implementation
chosen on CUDA. An op may also declare its workspace: the buffers its CUDA implementation allocates
for itself while it runs (a dequantized weight, a 16-bit K/V, a logits chunk). The graph cannot
show them, and the memory cost model must count them at the op or its predicted peak falls short.

Ops from outside the package (`lowmem_compile.define_op`, :func:`define_user_op`) live in a
namespace of their own and may declare what the planner reads besides the workspace: their FLOPs
(registered with `torch.utils.flop_counter`, which `cost/timing.py` reads) and the bytes they move.
One that declares neither is never forced to recompute (:func:`plans_conservatively`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
from typing import Any, Callable

import torch

NAMESPACE = "lowmem"
_LIBS: dict[str, torch.library.Library] = {NAMESPACE: torch.library.Library(NAMESPACE, "FRAGMENT")}
_LIB = _LIBS[NAMESPACE]
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
    namespace: str = NAMESPACE,
) -> torch._ops.OpOverloadPacket:
    """Declare `<namespace>::<name><schema>` and return `torch.ops.<namespace>.<name>` (the
    namespace is `lowmem` for the package's own ops).

    `reference` serves every device (CompositeExplicitAutograd); `cuda`, when given, overrides it on
    CUDA tensors. `backward(ctx, *grads)` and `setup_context(ctx, inputs, output)` follow
    `torch.library.register_autograd`; an op without them is not differentiable. `workspace`, called
    like the fake impl, returns (fake) tensors shaped like the buffers the op allocates beyond its
    outputs and frees before returning (see :func:`workspace_of`).
    """
    qualname = f"{namespace}::{name}"
    lib = _LIBS.get(namespace)
    if lib is None:
        lib = _LIBS[namespace] = torch.library.Library(namespace, "FRAGMENT")
    lib.define(name + schema)
    if workspace is not None:
        _WORKSPACE[qualname] = workspace
    lib.impl(name, reference, "CompositeExplicitAutograd")
    if cuda is not None and not _FORCE_REFERENCE:
        lib.impl(name, cuda, "CUDA")
    torch.library.register_fake(qualname, fake, lib=lib)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=lib)
    return getattr(getattr(torch.ops, namespace), name)


def declares_workspace(target: Any) -> bool:
    """`target` is one of our ops and declares a workspace (a cheap test before `workspace_of`)."""
    return isinstance(target, torch._ops.OpOverload) and target._schema.name in _WORKSPACE


def workspace_of(target: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The buffers op `target` allocates while it runs, beyond its outputs, from its (fake) arguments;
    empty for an op that declares none and for anything that is not one of our ops."""
    return _WORKSPACE[target._schema.name](*args, **kwargs) if declares_workspace(target) else []


@dataclasses.dataclass(frozen=True)
class UserOp:
    """An op declared from outside the package, and what it told the planner."""

    qualname: str
    flops: Callable[..., int] | None
    bytes_moved: Callable[..., int] | None
    source: str
    """sha256 of the files that define its callables (part of the compile-cache key)."""

    @property
    def costed(self) -> bool:
        """It declares a time: FLOPs, bytes moved, or both."""
        return self.flops is not None or self.bytes_moved is not None


_USER_OPS: dict[str, UserOp] = {}


def define_user_op(
    qualname: str,
    schema: str,
    *,
    reference: Callable[..., Any],
    fake: Callable[..., Any],
    cuda: Callable[..., Any] | None = None,
    backward: Callable[..., Any] | None = None,
    setup_context: Callable[..., Any] | None = None,
    flops: Callable[..., int] | None = None,
    bytes_moved: Callable[..., int] | None = None,
    workspace: Callable[..., list[torch.Tensor]] | None = None,
) -> torch._ops.OpOverloadPacket:
    """:func:`define_op` for an op from outside the package (public as `lowmem_compile.define_op`).

    `qualname` is "namespace::name"; the `lowmem` namespace is the package's own. `flops`,
    `bytes_moved` and `workspace` are called like the fake impl, on the op's (fake) arguments:
    FLOPs of one call (an int), bytes it reads and writes in memory (an int; without it, its
    inputs' and outputs' bytes), and tensors shaped like the buffers it allocates for itself.
    With neither `flops` nor `bytes_moved` the planner has no time for the op and never forces it
    to recompute: it is saved when the backward needs it.
    """
    namespace, sep, name = qualname.partition("::")
    if not sep or not namespace.isidentifier() or not name.isidentifier():
        raise ValueError(f"define_op: name {qualname!r} must be 'namespace::name' (e.g. 'mylib::fused_norm')")
    if namespace == NAMESPACE:
        raise ValueError(f"define_op: the {NAMESPACE!r} namespace is the package's own; use one of yours")
    for what, fn in (("reference", reference), ("fake", fake), ("cuda", cuda), ("backward", backward),
                     ("setup_context", setup_context), ("flops", flops), ("bytes_moved", bytes_moved),
                     ("workspace", workspace)):
        if fn is not None and not callable(fn):
            raise ValueError(f"define_op {qualname}: {what} must be callable, got {type(fn).__name__}")
    if (backward is None) != (setup_context is None):
        raise ValueError(f"define_op {qualname}: give backward and setup_context together")
    packet = define_op(name, schema, reference=reference, fake=fake, cuda=cuda, backward=backward,
                       setup_context=setup_context, workspace=workspace, namespace=namespace)
    if flops is not None:
        from torch.utils.flop_counter import register_flop_formula

        register_flop_formula(packet, get_raw=True)(lambda *args, out_val=None, **kwargs: flops(*args, **kwargs))
    callables = [f for f in (reference, fake, cuda, backward, setup_context, flops, bytes_moved, workspace) if f is not None]
    _USER_OPS[qualname] = UserOp(qualname, flops, bytes_moved, _sources(callables))
    return packet


def _sources(callables: list[Callable[..., Any]]) -> str:
    """sha256 over the source files of `callables` (their code where no file can be read)."""
    digest = hashlib.sha256()
    for fn in callables:
        try:
            with open(inspect.getsourcefile(fn), "rb") as f:
                digest.update(f.read())
        except (TypeError, OSError):
            code = getattr(fn, "__code__", None)
            digest.update(repr((getattr(fn, "__qualname__", fn), code.co_code if code else None)).encode())
    return digest.hexdigest()


def user_op(target: Any) -> UserOp | None:
    """The declaration of `target` when it is an op declared from outside the package, else None."""
    if isinstance(target, torch._ops.OpOverloadPacket):  # Dynamo records `torch.ops.ns.op(...)` so
        return _USER_OPS.get(target._qualified_op_name)
    if not isinstance(target, torch._ops.OpOverload):
        return None
    return _USER_OPS.get(target._schema.name)


def plans_conservatively(target: Any) -> bool:
    """`target` is an outside op that declares no time: the planner must never force it to recompute."""
    op = user_op(target)
    return op is not None and not op.costed


def declared_bytes_moved(node: Any, default: int) -> int:
    """The bytes an outside op declares it moves at `node` (its fake arguments), else `default`."""
    op = user_op(getattr(node, "target", None))
    if op is None or op.bytes_moved is None:
        return default
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
    moved = op.bytes_moved(*args, **kwargs)
    return int(moved.node.hint) if isinstance(moved, torch.SymInt) else int(moved)  # a hint: no guard


def user_ops_key() -> str:
    """What every outside op declared so far contributes to compile-cache keys: its name and sources
    ("" while there is none)."""
    if not _USER_OPS:
        return ""
    return hashlib.sha256(repr(sorted((q, o.source) for q, o in _USER_OPS.items())).encode()).hexdigest()
