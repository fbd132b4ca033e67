"""Passes and ops from outside the package: checking `options={"passes": [...]}`, running each
user pass at its place among the built-in pre-autograd passes, and planning the ops declared with
`lowmem_compile.define_op` that a graph calls.

When it runs: the backend calls :func:`run` for each user pass on the Dynamo graph, before the
built-in pass the user pass names in `before`, or after all of them (then before the layer split,
so each pass sees the whole model); :func:`plan_user_ops` runs once after every pass.

Invariants: a user pass leaves a graph that lints and whose every call node has a fake example
value (filled here by fake propagation where the pass left none); an exception inside it is re-raised
as :class:`PassError` naming the pass and the node it was at; an outside op that declares no cost
is tagged MUST_SAVE, so neither torch's partitioner nor ours recomputes it.

Counts: what each user pass returns (its report entry), outside ops costed and conservative.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
import traceback
from typing import Any, Sequence

import torch
from torch.utils.checkpoint import CheckpointPolicy

from ..ops.library import user_op
from ..report import CustomOpStats
from . import _MODULE_PATH_PREFIX, CompileContext, GraphPass

log = logging.getLogger(__name__)

#: What `options={"passes": [...]}` takes, for error messages.
PASS_CONTRACT = (
    "a pass is a lowmem_compile.GraphPass (or any object with `name` (str), `__call__(gm, ctx)` and "
    "`uuid()` -> str), or an import string 'package.module:attribute' naming one"
)


class PassError(RuntimeError):
    """A user pass raised, or left a graph the backend cannot compile; names the pass and the node."""

    def __init__(self, message: str, pass_name: str, node: str | None) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node


def resolve(passes: Any) -> tuple[Any, ...]:
    """The passes of `options["passes"]` as a tuple of pass objects: import strings resolved, a
    GraphPass subclass instantiated, each checked against the contract; ValueError otherwise."""
    if isinstance(passes, (str, GraphPass)) or not isinstance(passes, Sequence):
        raise ValueError(f"lowmem option passes={passes!r} must be a list of passes; {PASS_CONTRACT}")
    out = tuple(_check(_load(p)) for p in passes)
    names = [p.name for p in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"lowmem option passes: two passes are named {dup}; a pass's name is its report key")
    return out


def _load(spec: Any) -> Any:
    if isinstance(spec, str):
        module, sep, attr = spec.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"lowmem option passes: {spec!r} is not an import string 'package.module:attribute'")
        try:
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"lowmem option passes: cannot import {spec!r} ({type(exc).__name__}: {exc})") from exc
        spec = obj
    if isinstance(spec, type) and issubclass(spec, GraphPass):
        spec = spec()
    return spec


def _check(p: Any) -> Any:
    missing = []
    if not isinstance(getattr(p, "name", None), str) or not p.name:
        missing.append("`name` (a non-empty str)")
    if not callable(p) or isinstance(p, type):
        missing.append("`__call__(gm, ctx)`")
    if not callable(getattr(p, "uuid", None)):
        missing.append("`uuid()`")
    if missing:
        raise ValueError(f"lowmem option passes: {p!r} has no {', '.join(missing)}; {PASS_CONTRACT}")
    builtin = _builtin_names()
    if p.name in builtin:
        raise ValueError(f"lowmem option passes: the name {p.name!r} is a built-in pass's; choose another")
    before = getattr(p, "before", None)
    if before is not None and before not in builtin:
        raise ValueError(f"lowmem option passes: {p.name!r} has before={before!r}; choose None (after every "
                         f"built-in pass) or one of {list(builtin)}")
    if not isinstance(p.uuid(), str):
        raise ValueError(f"lowmem option passes: {p.name!r}.uuid() must return a str")
    return p


def _builtin_names() -> list[str]:
    from ..backend import PRE_AUTOGRAD_PASSES

    return [p.name for p in PRE_AUTOGRAD_PASSES]


def cache_key(passes: Sequence[Any]) -> str:
    """What the user passes contribute to compile-cache keys: each one's name, place and uuid."""
    return repr([(p.name, getattr(p, "before", None), p.uuid()) for p in passes])


def scheduled(passes: Sequence[Any], before: str | None) -> list[Any]:
    """The user passes that run just before built-in pass `before` (None: after all of them), in order."""
    return [p for p in passes if getattr(p, "before", None) == before]


def run_scheduled(before: str | None, gm: torch.fx.GraphModule, ctx: CompileContext) -> None:
    """Run the user passes of `ctx.options` placed before built-in pass `before` (None: after all
    of them) and file their entries in the graph's report."""
    for graph_pass in scheduled(ctx.options.passes, before):
        start = time.perf_counter()
        result = run(graph_pass, gm, ctx)
        if result is not None:
            ctx.report.add_pass(graph_pass.name, result)
            log.info("user pass %s: %s (%.2f s)", graph_pass.name, result, time.perf_counter() - start)


def run(graph_pass: Any, gm: torch.fx.GraphModule, ctx: CompileContext) -> dict[str, Any] | None:
    """Run one user pass; return its report entry, or None when it is disabled for these options."""
    enabled = getattr(graph_pass, "enabled", None)
    if enabled is not None and not enabled(ctx.options):
        return None
    ctx.node = None
    before = set(gm.graph.nodes)
    try:
        result = graph_pass(gm, ctx)
    except Exception as exc:
        node = ctx.node or _node_in_traceback(exc, gm.graph)
        raise PassError(f"lowmem pass {graph_pass.name!r} failed at {_where(node)}: {type(exc).__name__}: {exc}",
                        graph_pass.name, node.name if node is not None else None) from exc
    finally:
        ctx.node = None
    _check_graph(graph_pass, gm, ctx, before)
    return entry(graph_pass.name, result)


def entry(name: str, result: Any) -> dict[str, Any]:
    """A pass's return value as its report entry."""
    if result is None:
        return {}
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    if isinstance(result, dict) and all(isinstance(k, str) for k in result):
        return dict(result)
    raise PassError(f"lowmem pass {name!r} returned {type(result).__name__}; return a dict with str keys, "
                    "a dataclass instance, or None", name, None)


def _check_graph(graph_pass: Any, gm: torch.fx.GraphModule, ctx: CompileContext, before: set) -> None:
    """The graph lints and every call node the pass inserted has an example value (propagated here
    where missing)."""
    try:
        gm.graph.lint()
    except Exception as exc:
        raise PassError(f"lowmem pass {graph_pass.name!r} left an invalid graph: {exc}", graph_pass.name, None) from exc
    for node in gm.graph.nodes:
        if node not in before and node.op in ("call_function", "call_method") and "example_value" not in node.meta:
            try:
                ctx.propagate(node)
            except Exception as exc:
                raise PassError(
                    f"lowmem pass {graph_pass.name!r} inserted {_where(node)} without meta['example_value'], "
                    f"and running it on fake values failed ({type(exc).__name__}: {exc}); set it "
                    "(ctx.propagate(node)) where the node is made", graph_pass.name, node.name) from exc
    gm.recompile()


def _node_in_traceback(exc: BaseException, graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The node a failing pass was at, when it did not say: the innermost frame holding a node of
    `graph` in a local variable (`node` preferred)."""
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
        found = [(key != "node", v) for key, v in frame.f_locals.items()
                 if isinstance(v, torch.fx.Node) and v.graph is graph]
        if found:
            return min(found, key=lambda kv: kv[0])[1]
    return None


def _where(node: torch.fx.Node | None) -> str:
    """`node add_3 (call_function operator.add) in model.layers.0.post_attention_layernorm, file.py:12`."""
    if node is None:
        return "no node it named (iterate with ctx.nodes(gm) or set ctx.node to have it named)"
    target = getattr(node.target, "__name__", node.target) if node.op != "placeholder" else ""
    text = f"node {node.name} ({node.op} {target})".replace(" )", ")")
    stack = node.meta.get("nn_module_stack")
    if stack:
        text += f" in {_MODULE_PATH_PREFIX.sub('', str(list(stack.values())[-1][0]))}"
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [line.strip() for line in trace.strip().splitlines() if line.strip().startswith("File ")]
        if lines:
            text += f", {lines[-1]}"
    return text


def plan_user_ops(gm: torch.fx.GraphModule) -> CustomOpStats | None:
    """Tag each call of an outside op that declares no cost MUST_SAVE (AOTAutograd copies the tag to
    the joint graph: the min-cut partitioner never recomputes a MUST_SAVE node, and ours never
    forces a tagged one); count the costed and conservative calls. None when the graph calls none."""
    costed, conservative, notes = 0, 0, []
    for node in gm.graph.nodes:
        op = user_op(node.target) if node.op == "call_function" else None
        if op is None:
            continue
        if op.costed:
            costed += 1
            continue
        conservative += 1
        node.meta.setdefault("recompute", CheckpointPolicy.MUST_SAVE)  # a user's own tag stays
        note = (f"{op.qualname}: no cost declared (flops, bytes_moved): planned conservatively, never "
                "recomputed (saved where the backward needs it)")
        if note not in notes:
            notes.append(note)
    if not costed and not conservative:
        return None
    return CustomOpStats(costed=costed, conservative=conservative, notes=notes)
