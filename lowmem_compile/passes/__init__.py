"""Graph passes. Each file holds one pass: an object with a `name`, the report `section` it fills,
`enabled(options)`, `uuid()` for compile caches, and `__call__(gm, ctx) -> stats`.

`GraphPass` and `CompileContext` below are public (`lowmem_compile.GraphPass`, `.CompileContext`)
and stable: passes from outside the package are written against them (docs/writing_a_pass.md) and
run by `user.py`.

The pre-autograd passes run, in the order of `backend.PRE_AUTOGRAD_PASSES`, on the FX graph that
Dynamo captures (torch IR, before AOTAutograd); `remat.py` is the partition function that runs
inside AOTAutograd on the joint forward/backward graph.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import operator
import re
from typing import Any, Iterator, Sequence

import torch

from ..options import Options
from ..report import GraphReport
from ..sources import source_hash


#: How a linear layer appears in the Dynamo graph (torch IR).
LINEAR_FUNCTIONS = (torch._C._nn.linear, torch.nn.functional.linear)


def example_value(node: Any) -> Any:
    """The fake value Dynamo recorded for a graph node (None for constants and value-less nodes)."""
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm` whose graph may be rewritten apart: new nodes (their metadata copied, the fake
    values shared), the same parameters and submodules."""
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen
    out, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out).meta = dict(old_output.meta)
    copy = torch.fx.GraphModule(gm, graph)
    copy.meta = dict(gm.meta)
    return copy


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


#: What Dynamo puts before a module path in `nn_module_stack` (`L['self'].__dict__['_modules']['base_model']...model.layers.3`).
_MODULE_PATH_PREFIX = re.compile(r"^.*[\]']\.")


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
    """What a pass may read besides the graph, and what it may ask of the backend (public, stable).

    One context serves every pass run on one Dynamo graph. A pass reads `options` (its own settings
    belong on the pass object, not here), `example_inputs` (Dynamo's example values of the graph's
    placeholders, in order), and writes nothing to `report` itself: its return value is its report
    entry. `node` is the node the running pass is at; iterating with :meth:`nodes` keeps it current,
    and a pass that walks the graph its own way may set it, so that an exception names the node.
    """

    options: Options
    example_inputs: Sequence[Any]
    report: GraphReport
    node: torch.fx.Node | None = None
    """The node the running pass is at (None between passes)."""

    def nodes(self, gm: torch.fx.GraphModule) -> Iterator[torch.fx.Node]:
        """The graph's nodes in order, each made :attr:`node` while the pass looks at it. A snapshot:
        the pass may insert and erase nodes while iterating (an erased node is skipped)."""
        for node in list(gm.graph.nodes):
            if node.graph is gm.graph and not getattr(node, "_erased", False):
                self.node = node
                yield node
        self.node = None

    @staticmethod
    def example_value(node: Any) -> Any:
        """The fake value Dynamo recorded for `node` (None for constants and nodes without one)."""
        return example_value(node)

    @staticmethod
    def propagate(node: torch.fx.Node) -> Any:
        """Run `node` on its arguments' example values (fake tensors: nothing is computed or
        allocated), store the result as its `meta["example_value"]` and return it. Every node a pass
        inserts needs one: later passes read it, and AOTAutograd's cache bypasses a graph whose
        tensor methods are called on a node without one. The backend calls this for any node a
        user pass leaves without one."""
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), example_value)
        fake_mode = next((v.fake_mode for v in torch.utils._pytree.tree_leaves((args, kwargs))
                          if hasattr(v, "fake_mode")), None)
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            if node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                raise ValueError(f"cannot propagate example values through a {node.op} node ({node.name})")
        node.meta["example_value"] = value
        return value

    @staticmethod
    def inherit_provenance(source: torch.fx.Node, *nodes: torch.fx.Node | None) -> None:
        """Give inserted `nodes` the module path and source line of `source` (the node they replace):
        the layer split and the recomputation planner find a model's layers by them."""
        inherit_provenance(source, *nodes)

    @staticmethod
    def layer_of(node: torch.fx.Node) -> str | None:
        """The repeated layer (e.g. `model.layers.3`) a node runs in, or None outside the layers.
        Nodes of one layer compile into that layer's body (docs/layers.md)."""
        from .remat import layer_of

        layer = layer_of(node)
        return None if layer is None else _MODULE_PATH_PREFIX.sub("", layer)


class GraphPass(abc.ABC):
    """A rewrite of the Dynamo graph before AOTAutograd (public, stable; docs/writing_a_pass.md).

    Subclass it, or give any object the same members (`options={"passes": [...]}` checks them):

    * `name` (str): the pass's report key, unique among the passes of a compile;
    * `__call__(gm, ctx) -> stats`: rewrite `gm` (a `torch.fx.GraphModule` in torch IR, as Dynamo
      captured it and the earlier passes left it) in place; return a dict, a dataclass or None,
      which the report files under `passes[name]`;
    * `uuid() -> str`: what the pass's output depends on besides the graph; part of the compile-cache
      key, so it must change when the pass changes (the default hashes the file defining the class);
    * `before` (optional, str or None): run just before the named built-in pass (see
      `backend.PRE_AUTOGRAD_PASSES`) instead of after all of them;
    * `enabled(options) -> bool` (optional): whether to run under these options.

    Match state lives on the instance (or in the call), never in module globals.
    """

    name: str
    section: str
    """Built-in passes only: the report section their stats dataclass fills."""
    before: str | None = None

    def enabled(self, options: Options) -> bool:
        return True

    @abc.abstractmethod
    def __call__(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> Any: ...

    def uuid(self) -> str:
        return source_hash(type(self))
