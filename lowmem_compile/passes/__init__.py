"""Graph passes. Each file holds one pass: an object with a `name`, the report `section` it fills,
`enabled(options)`, `uuid()` for compile caches, and `__call__(gm, ctx) -> stats`.

The pre-autograd passes run, in the order of `backend.PRE_AUTOGRAD_PASSES`, on the FX graph that
Dynamo captures (torch IR, before AOTAutograd); `remat.py` is the partition function that runs
inside AOTAutograd on the joint forward/backward graph.
"""

from __future__ import annotations

import abc
import dataclasses
import operator
from typing import Any, Sequence

import torch

from ..options import Options
from ..report import GraphReport
from ..sources import source_hash


#: How a linear layer appears in the Dynamo graph (torch IR).
LINEAR_FUNCTIONS = (torch._C._nn.linear, torch.nn.functional.linear)


def example_value(node: Any) -> Any:
    """The fake value Dynamo recorded for a graph node (None for constants and value-less nodes)."""
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def calls(node: Any, functions: Sequence[Any] = (), methods: Sequence[str] = ()) -> bool:
    """`node` calls one of `functions`, or one of the tensor `methods`. An operator function also
    matches its method form: Dynamo in torch 2.11 records some tensor comparisons (HF's `a == b` in its
    packed-sequence mask) as the method `__eq__` where later versions record `operator.eq`."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and (node.target in methods or node.target in _method_forms(functions))


def _method_forms(functions: Sequence[Any]) -> set[str]:
    """`__eq__` for `operator.eq`, `__and__` for `operator.and_`: the dunder of each operator function."""
    return {f"__{f.__name__.rstrip('_')}__" for f in functions if getattr(operator, getattr(f, "__name__", ""), None) is f}


#: Node metadata that says where in the user's model a node came from (module path, source line).
PROVENANCE_KEYS = ("nn_module_stack", "stack_trace")


def inherit_provenance(source: torch.fx.Node, *nodes: torch.fx.Node | None) -> None:
    """Give nodes a pass inserts the provenance of the node they replace. AOTAutograd copies it onto
    the aten nodes it traces from them, and the remat planner finds layer boundaries by it: without
    it an attention op looked as if it ran outside its layer, so `remat="full"` saved its output."""
    for key in PROVENANCE_KEYS:
        if key in source.meta:
            for node in nodes:
                if node is not None:
                    node.meta.setdefault(key, source.meta[key])


@dataclasses.dataclass
class CompileContext:
    """What a pass may read besides the graph: the options, Dynamo's example inputs, the report."""

    options: Options
    example_inputs: Sequence[Any]
    report: GraphReport


class GraphPass(abc.ABC):
    """A pre-autograd rewrite of the Dynamo graph; match state lives on the instance, never globally."""

    name: str
    section: str

    @abc.abstractmethod
    def enabled(self, options: Options) -> bool: ...

    @abc.abstractmethod
    def __call__(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> Any: ...

    def uuid(self) -> str:
        return source_hash(type(self))
