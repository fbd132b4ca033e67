"""The step's peak from the plan of one layer body, when each distinct layer compiles once.

A compiled body's liveness simulation (`liveness.simulate_step`) sees one call: its inputs as
resident, its own forward and backward. The step calls it `calls` times, and autograd keeps what
each call saved until that call's backward. So, on top of everything the step holds from its start
(`resident`: the weights of every layer, the batch, the values the prefix computes once for all
layers, such as the rotary tables):

* during the backward of the last layer (the most kept): the `calls - 1` earlier calls keep their
  saved values and their carried input (the hidden state each took from the layer before), and the
  body's own peak above its resident inputs (its carried input included, counted once);
* during the model's tail (norm, head and loss): every call's kept bytes and the tail's own peak
  above what is resident;
* with the body's values parked in host memory, the copies of the call before the running one,
  coming back while it runs its backward (`ops.offload`'s lookahead);
* what every call returns to the caller (a K/V cache), held to the step's end;
* the trainable weights' gradients of the layers whose backward ran stay to the end (LoRA:
  small, counted where they are most: the first layer's backward).

The tail is compiled before the bodies so that its peak is known when a body is planned.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .liveness import StepMemory


@dataclass(frozen=True)
class LayerExprs:
    """`LayerContext`'s byte counts as expressions in the shape symbols (a dynamic sequence length),
    for the longest sequence a budget holds: the tail's at each of its steps, above what is resident."""

    resident: sympy.Expr
    body_inputs: sympy.Expr
    carried: sympy.Expr
    held: sympy.Expr
    tail: tuple[sympy.Expr, ...] = ()


@dataclass(frozen=True)
class LayerContext:
    """What the planner of one layer body needs to know about the step around it."""

    calls: int
    """Layer calls this body serves."""
    resident: int
    """Device bytes held from the step's start: every outer input (weights, batch) and the
    prefix's values shared by the layers."""
    body_inputs: int
    """Device bytes of this body's inputs that are in `resident` (its weights, shared values)."""
    carried: int
    """Device bytes of the body's inputs that belong to one call (its hidden state input)."""
    grads: int
    """Bytes of the gradients of the body's trainable inputs (one call's LoRA weights)."""
    tail: int = 0
    """The tail's peak above `resident`: its carried input (the last layer's output) and working set."""
    held: int = 0
    """Bytes of one call's outputs that the step returns (a K/V cache): the caller holds them all."""
    exprs: LayerExprs | None = None
    """The same, symbolically, when the step's shapes are."""

    def kept(self, memory: StepMemory, carried_on_device: bool = True) -> int:
        """Bytes one call keeps from its forward to its backward."""
        return memory.saved + (self.carried if carried_on_device else 0)

    def step_peak(self, memory: StepMemory, carried_on_device: bool = True, parked: int = 0) -> int:
        """The step's predicted peak with this body's plan (see the module docstring); `parked`: the
        bytes a call keeps in host memory. The body's outputs are the next call's inputs, not held
        by the caller: its peak with them freed is the one that adds up."""
        kept = self.kept(memory, carried_on_device)
        body = memory.peak_outputs_freed
        others = self.resident - self.body_inputs
        held = self.calls * self.held
        last_layer = others + (self.calls - 1) * kept + body + parked + held
        first_layer = others + (self.calls - 1) * self.grads + body + held
        tail = self.resident + self.calls * kept + self.tail + held
        return max(last_layer, first_layer, tail)

    def step_exprs(self, memory: StepMemory, carried_on_device: bool = True, parked: int = 0) -> list[sympy.Expr]:
        """`step_peak`'s three terms at every step of the body's and the tail's walks, as expressions
        in the shape symbols (`memory` simulated symbolically): for `liveness.longest_fitting`.
        (`parked` at the example's size.)"""
        x = self.exprs
        if x is None:
            raise ValueError("step_exprs needs the context's expressions (a step with symbolic shapes)")
        kept = (memory.saved_expr or sympy.Integer(0)) + (x.carried if carried_on_device else 0)
        others = x.resident - x.body_inputs + self.calls * x.held
        body = memory.peak_exprs_outputs_freed()
        last_layer = [others + (self.calls - 1) * kept + e + parked for e in body]
        first_layer = [others + (self.calls - 1) * self.grads + e for e in body]
        tail = [x.resident + self.calls * (x.held + kept) + t for t in x.tail]
        return last_layer + first_layer + tail
