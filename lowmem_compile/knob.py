"""The one memory knob: `memory_budget` decides the options a user left at "budget".

`torch.compile(model, backend="lowmem", options={"memory_budget": "7GiB"})` on a prepared model
(`prepare_`) should reach what the hand-set lean recipe reaches (`offload="parked"`,
`mlp_chunks="auto"`, `logits="drop"` and a budget chosen to land where it should), without the user
knowing those options. Recomputation alone cannot: parking saved values in host memory, the MLP in
pieces and the logits not returned each take memory that no recomputation plan frees.

How: the options are decided in order of what they cost, and only as far as the budget needs:

1. recomputation (the planner's own choice, `remat="auto"`, inside every option set below);
2. `offload="parked"`: saved values parked in host memory (costs host-link time where a copy is not
   hidden, and Inductor's buffer reuse in the compiled graphs);
3. `mlp_chunks="auto"`: the gated MLPs in pieces along the sequence (launches, a bigger graph);
4. `logits="drop"`: the model's logits no longer returned with its loss (the caller's
   `outputs.logits` is None: a change of what the model returns, so last, and with a warning).

Each option set is planned in full (the pre-autograd passes on a copy of the Dynamo graph, then
AOTAutograd and the partitioner in plan-only mode, fake tensors: nothing runs): the pieces and the
logits are decided before AOTAutograd traces, so only a plan of the rewritten graph can say what
they save, and with the per-layer compile the step's peak is the body's plan scored through
`cost/layered.py`. The first set is the fastest plan (every option at its no-budget value); if its
predicted peak is over the budget, each next option is added in turn, and kept only where it
lowers the predicted peak, until one fits. None fitting, the lowest peak found is compiled and the
partitioner warns that the budget is infeasible, as without the knob. Options the user set are never
changed, and a compile with no budget, or with no backward (an evaluation under `no_grad`), keeps
the fastest plan. The report's remat section says what was chosen and why (`knob`, `knob_notes`).

The budget is the step's on the card, so the plan is made for less: the optimizer's state,
which the compiled step never sees (an Adam-like optimizer's two values per trainable parameter,
`OPTIMIZER_VALUES`), and `MODEL_ERROR` of the budget for what the cost model misses (measured on
an H100, Llama-3-8B shape at 8192: predicted/measured 0.974 with the MLP in pieces, 0.924 without;
bench/results/layers/2026-12-07T16/) come off first. Options set by hand keep `memory_budget` as
the compiled step's own budget, as before the knob.

The price: each option set tried is one more trace and partition of the step (not of its code
generation); a generous budget costs one. Measured on an H100 (Llama-3-8B shape at 8192,
"7GiB", bench/results/layers/2026-12-07T22/): six plans, 53.1 s to the first step against the
hand-set options' 31.8 s. Two things shorten it: a min-cut split already made for the same joint
graph and tags is reused (passes/remat.py), and an option set before the last is kept without
planning the step without it when it took off more than `PRUNE_MARGIN` times the fitting plan's
room (that run's two such plans: parking took 1.76 GiB off and the MLP pieces 0.38, with 0.10 to
spare).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx

from . import layer_frames
from .options import KNOB_DEFAULTS, Options
from .passes import copy_graph_module
from .report import STORE, GraphReport, RematStats, gib

log = logging.getLogger(__name__)

#: The options the knob may set, in the order it tries them (cheapest first), and the value it sets.
STEPS: tuple[tuple[str, str], ...] = (("offload", "parked"), ("mlp_chunks", "auto"), ("logits", "drop"))

#: Per trainable parameter value, the optimizer's state values set aside from the budget (Adam's
#: first and second moments, in the parameter's dtype).
OPTIMIZER_VALUES = 2
#: Share of the budget set aside for the cost model's error (module docstring).
MODEL_ERROR = 0.05
#: An option set before the last is kept without planning the fit without it when what it took off
#: the peak, as it was added, is over this many times the fitting plan's room under the budget: the
#: options added after it would have to have taken over more than half of its saving. (Each plan
#: costs seconds of the first step; a wrong keep costs speed, never the budget.)
PRUNE_MARGIN = 2.0

_WHY = {
    "offload": "parking saved values in host memory",
    "mlp_chunks": "the MLP in pieces",
    "logits": "dropping the logits",
}


@dataclass
class _Trial:
    """One option set planned: its options and what the planner predicts."""

    options: Options
    report: GraphReport
    peak: int | None
    budget: int | None
    warnings: list[warnings.WarningMessage] = dataclasses.field(default_factory=list)
    """What planning it warned (an infeasible budget), held back unless it is the plan chosen."""

    @property
    def fits(self) -> bool:
        return self.peak is not None and self.budget is not None and self.peak <= self.budget


def compile_within_budget(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], opts: Options, *, plan_only: bool = False
) -> Callable[..., Any]:
    """The backend for options with some left at "budget": decide them (module docstring), then
    compile with the options decided. `plan_only` as for `backend.lowmem_backend`."""
    from .backend import Planned, lowmem_backend

    free = opts.left_to_budget()
    fastest = opts.without_knob()
    if opts.memory_budget is None or not free:
        return lowmem_backend(gm, example_inputs, fastest, plan_only=plan_only)
    steps = [(name, value) for name, value in STEPS if name in free and _applies(name, opts)]
    opts, fastest, notes = _for_the_step(opts, fastest, example_inputs)
    best = _plan(gm, example_inputs, fastest)
    if best.peak is None:  # nothing planned (no backward): nothing to fit
        return lowmem_backend(gm, example_inputs, fastest, plan_only=plan_only)
    notes.append(f"budget {gib(best.budget)}: the fastest plan ({_settings(fastest, free)}) peaks at {gib(best.peak)}"
                 + (", within it" if best.fits else ", over it"))
    without: dict[str, int] = {}  # the best peak before each option was tried
    gains: dict[str, int] = {}  # what each option chosen took off the best peak
    for name, value in steps:
        if best.fits:
            break
        without[name] = best.peak
        try:
            trial = _plan(gm, example_inputs, dataclasses.replace(best.options, **{name: value}))
        except Exception as exc:  # noqa: BLE001  (an option the user did not ask for must not break the compile)
            log.warning("memory knob: planning with %s=%s failed (%s); left out", name, value, exc)
            notes.append(f"{name}={value}: left out, planning with it failed: {type(exc).__name__}: {exc}")
            continue
        lower = trial.peak is not None and trial.peak < best.peak
        notes.append(
            f"{name}={value}: {'chosen' if lower else 'tried, not kept'}: budget {gib(best.budget)} below "
            f"{gib(best.peak)} without {_WHY[name]}, {gib(trial.peak)} with it"
            + ("" if lower else " (no lower)")
        )
        if lower:
            gains[name] = best.peak - trial.peak
            best = trial
    if best.fits:
        best = _prune(gm, example_inputs, best, fastest, notes, gains)
    else:
        notes.append(f"no option set fits: the closest, {gib(best.peak)}, is compiled")
    chosen = {name: getattr(best.options, name) for name in free if name in _decided_here(example_inputs)}
    log.info("memory knob: %s", "; ".join(notes))
    if best.options.logits == "drop" and "logits" in free:
        warnings.warn(
            f"lowmem memory_budget (the step planned for {gib(best.budget)}): the model's logits are dropped to fit it "
            f"(logits='drop'): outputs.logits is None. Set options logits='keep' to keep them "
            f"(the lowest plan that keeps them peaks at {gib(without['logits'])}).",
            UserWarning,
            stacklevel=2,
        )
    knob = RematStats(policy=opts.remat, knob=chosen, knob_notes=notes)
    final = dataclasses.replace(best.options, report=False)
    if plan_only:  # the chosen plan is the one just planned: its report (and its warnings) serve
        for warning in best.warnings:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        graph = STORE.adopt(best.report)
        graph.add("remat", knob)
        _print_if(opts)
        raise Planned
    index = STORE.count()
    compiled = lowmem_backend(gm, example_inputs, final)
    graph = STORE.graph(index)
    if graph is not None:
        graph.add("remat", knob)
    _print_if(opts)
    return compiled


def _for_the_step(opts: Options, fastest: Options, example_inputs: Sequence[Any]) -> tuple[Options, Options, list[str]]:
    """`opts` and `fastest` with the budget the compiled step may plan for: the user's, for the
    whole step on the card, less the optimizer's state and the cost model's margin (module
    docstring); and the note that says so."""
    from .passes.remat import budget_on

    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    budget = budget_on(opts, device)
    # a graph of a framed model (layer_frames.py) holds one layer's weights or none: the state is the model's
    frame = layer_frames.current()
    model = frame.model() if frame is not None else layer_frames.owner(example_inputs)
    weights = list(model.parameters()) if model is not None else [x for x in tensors if isinstance(x, torch.nn.Parameter)]
    state = OPTIMIZER_VALUES * sum(x.numel() * x.element_size() for x in weights if x.requires_grad)
    margin = int(MODEL_ERROR * budget)
    planned = budget - state - margin
    if planned <= 0:
        return opts, fastest, [f"budget {gib(budget)}: below the optimizer's state ({gib(state)}) and the "
                               f"cost model's margin ({gib(margin)}); planned as given"]
    note = (f"budget {gib(budget)} for the step: {gib(state)} set aside for the optimizer's state "
            f"({OPTIMIZER_VALUES} values per trainable parameter), {gib(margin)} ({MODEL_ERROR:.0%}) for the "
            f"cost model's error: planned for {gib(planned)}")
    return (dataclasses.replace(opts, memory_budget=planned), dataclasses.replace(fastest, memory_budget=planned),
            [note])


def _decided_here(example_inputs: Sequence[Any]) -> frozenset[str]:
    """The options this graph's plan decides: all of them for a whole step; a framed model's layer
    graph (layer_frames.py) decides parking and pieces, its graphs outside the layers the logits."""
    if layer_frames.current() is not None:
        return frozenset({"offload", "mlp_chunks"})
    if layer_frames.owner(example_inputs) is not None:
        return frozenset({"logits"})
    return frozenset(KNOB_DEFAULTS)


def _applies(name: str, opts: Options) -> bool:
    """Whether the knob may set `name` under the user's other options."""
    if name == "offload":
        return not opts.cudagraphs  # a CUDA graph replay would skip the offload ops' host-side table
    if name == "logits":
        return opts.fused_loss == "on"  # logits are dropped by the fused loss
    return True


def _plan(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], opts: Options) -> _Trial:
    """Plan `opts` on a copy of `gm` (the passes rewrite the graph they get), reported apart."""
    from .backend import Planned, lowmem_backend

    trial_opts = dataclasses.replace(opts, report=False)
    with STORE.isolated() as scratch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # an infeasible trial is not the user's plan: held back
        try:
            lowmem_backend(copy_graph_module(gm), example_inputs, trial_opts, plan_only=True)
        except Planned:
            pass
    graph = scratch.graphs[-1] if scratch.graphs else GraphReport(index=0, nodes=0)
    remat = graph.stats.get("remat")
    peak = None if remat is None else remat.predicted_peak_bytes
    budget = None if remat is None else remat.budget_bytes
    log.info("memory knob: %s peaks at %s", _settings(opts, tuple(KNOB_DEFAULTS)), gib(peak))
    return _Trial(opts, graph, peak, budget, list(caught))


def _prune(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], best: _Trial, fastest: Options, notes: list[str],
    gains: dict[str, int],
) -> _Trial:
    """`best` fits; take back each option the knob set that the fitting plan does without: parking
    where the plan chosen parks nothing and pieces where no MLP was split (the same plan without
    them), then, when two or more were set, each but the last set, if the plan still fits without
    it (the one set last was needed: without it nothing fitted). An option whose `gains` are over
    `PRUNE_MARGIN` times the fitting plan's room is kept without that plan (`PRUNE_MARGIN`)."""
    remat = best.report.stats.get("remat")
    mlp = best.report.stats.get("mlp")
    unused = {
        "offload": best.options.offload != fastest.offload and remat is not None and remat.offloaded_bytes == 0,
        "mlp_chunks": best.options.mlp_chunks != fastest.mlp_chunks and (mlp is None or mlp.chunked == 0),
    }
    for name, idle in unused.items():
        if idle:
            best = dataclasses.replace(best, options=dataclasses.replace(best.options, **{name: getattr(fastest, name)}))
            notes.append(f"{name}={getattr(fastest, name)}: taken back, the plan that fits does not use it")
    set_ = [name for name, _ in STEPS if getattr(best.options, name) != getattr(fastest, name)]
    for name in set_[:-1]:
        room = best.budget - best.peak
        if gains.get(name, 0) > PRUNE_MARGIN * room:
            notes.append(f"{name}={getattr(best.options, name)}: kept without planning the step without it: it took "
                         f"{gib(gains[name])} off, the plan has {gib(room)} to spare")
            continue
        try:
            trial = _plan(gm, example_inputs, dataclasses.replace(best.options, **{name: getattr(fastest, name)}))
        except Exception as exc:  # noqa: BLE001
            log.warning("memory knob: planning without %s failed (%s); kept", name, exc)
            continue
        if trial.fits:
            notes.append(f"{name}={getattr(fastest, name)}: taken back, {gib(trial.peak)} without it fits too")
            best = trial
    return best


def _settings(opts: Options, names: Sequence[str]) -> str:
    return ", ".join(f"{name}={getattr(opts, name)}" for name in names)


def _print_if(opts: Options) -> None:
    if opts.report:
        from .report import last_report

        print(last_report(), flush=True)

