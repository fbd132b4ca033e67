"""The backend's options: one frozen dataclass, validated once, with errors that name the option.

`torch.compile(model, backend="lowmem", options={...})` hands the dict to the backend, which turns it
into :class:`Options` with :meth:`Options.from_user`. Every pass can be switched off on its own so
that A/B runs isolate it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class Options:
    inner: str = "inductor"
    """What compiles the graphs after our passes: "inductor", or "eager" (run as FX; tests, debugging)."""

    attention: str = "kv8"
    """Attention pass and the bits K/V keep for the backward: "kv8", "kv4", "kv16" (exact), "off".
    kv8 by default: kv4 moves LoRA gradients ~10x more than kv8 against fp32, for no measured
    speed and ~0.01 GiB of the 8192-token headline step (docs/DESIGN.md, "K/V width")."""

    nf4: str = "auto"
    """"auto" lowers weights already in NF4; "quantize" also quantizes frozen 16-bit linears; "off"."""

    nf4_matmul: str = "op"
    """How a lowered NF4 linear of more than 16 tokens multiplies: "op", one `nf4_linear` call that
    dequantizes inside (forward, recomputation and backward each); "graph", one `nf4_dequantize`
    node (never saved) and the graph's own linear, so Inductor runs the matmul and the backward
    dequantizes once for its recomputation and its gradient. Measured as fast as the op on
    bitsandbytes weights at 2048 tokens (bench/results/nf4e2e/2026-11-29T17/)."""

    remat: str = "auto"
    """Recomputation policy: "auto" (cost-model solver), "none" (stock saving), "full" (layer inputs only)."""

    offload: str = "budget"
    """Park saved activations in host memory between forward and backward: "budget" (the default:
    "off", unless a `memory_budget` is not met without parking: then "parked"; knob.py); "off";
    "layers" (the saved values of every layer but the last; the cost model then plans with them off
    the device); "parked" (the same, and `remat="auto"` may also save and park what is dear to
    recompute: the `full+parked` plan: docs/remat.md)."""

    memory_budget: int | float | None = None
    """Peak bytes the step must fit: None, bytes (int or "20GB"/"18GiB"), or a fraction (0, 1] of device
    memory. The one memory knob: besides fitting the recomputation plan to it, it decides the
    options left at "budget" (`offload`, `mlp_chunks`, `logits`), in order of cost and only as far
    as it needs (knob.py)."""

    fused_loss: str = "on"
    """Fuse the LM head with cross-entropy: "on" or "off"."""

    logits: str = "budget"
    """When the model computes its loss: "keep" returns logits (model dtype), "drop" returns none;
    "budget" (the default): "keep", unless a `memory_budget` is met no other way: then "drop", with
    a warning (a caller reading `outputs.logits` gets None)."""

    mlp_chunks: int | str = "budget"
    """Run each gated MLP in pieces along the sequence, so its [tokens, intermediate] values exist a
    piece at a time: "off", "auto" (pieces of about 2048 tokens), or a number of pieces (>= 2);
    "budget" (the default): "off", unless a `memory_budget` is not met without pieces: then "auto"."""

    cudagraphs: bool = False
    """Replay each compiled graph (forward, backward) as a CUDA graph: Inductor's CUDA graph trees.
    For steps whose host time exceeds their GPU time (short sequences, many small kernels, an op
    call costs the host tens of µs). Inductor skips a graph it cannot capture (a CPU input, e.g.
    embeddings in host memory) and logs why; not with `offload` (its ops hand the prefetched copy to
    the reload through a host-side table, Python work that a replay would skip)."""

    layers: str = "auto"
    """How the repeated decoder layers compile: "auto", one compile of each distinct layer body,
    called for every layer like it (the step's time to first step no longer grows with depth);
    "off", the whole step as one graph (what the per-layer compile is measured against)."""

    warmup: str = "thread"
    """Compile our own Triton kernels while Inductor compiles the step: "thread" runs each distinct
    site of our ops once, forward and backward, on random values of its shapes on a thread begun
    after the passes, so their compiles no longer wait for Inductor's inside the first step
    (warmup.py), and pins the host blocks a parked plan will use on another thread once the plan is
    chosen (ops/offload.py); "processes" runs the sites in a few worker processes instead, in
    parallel and off the training process's GIL, which loads their kernels from Triton's on-disk
    cache (a CUDA context, ~0.5 GiB, per worker while they run; not yet measured on a GPU);
    "off" leaves both to the first step."""

    report: bool = False
    """Print the report after each compiled graph."""

    passes: tuple = ()
    """User passes (docs/writing_a_pass.md): `lowmem_compile.GraphPass` objects, or import strings
    "package.module:attribute" naming one (a GraphPass subclass is instantiated). Each runs on the
    Dynamo graph after the built-in pre-autograd passes, or just before the built-in pass its
    `before` names; what it returns is `last_report().to_dict()["passes"][name]`."""

    @classmethod
    def from_user(cls, options: Mapping[str, Any] | Options | None) -> Options:
        """Build validated options from what the user passed to `torch.compile(..., options=...)`."""
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"lowmem options must be a dict or lowmem_compile.Options, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown lowmem option(s) {unknown}; allowed: {sorted(known)}")
        values = dict(options)
        if "passes" in values and isinstance(values["passes"], list):
            values["passes"] = tuple(values["passes"])
        if "memory_budget" in values:
            values["memory_budget"] = parse_memory_budget(values["memory_budget"])
        return cls(**values)

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"lowmem option {name}={value!r} is not allowed; choose one of {list(allowed)}")
        chunks = self.mlp_chunks
        if chunks not in ("off", "auto", BUDGET) and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 2):
            raise ValueError(f"lowmem option mlp_chunks={chunks!r} is not allowed; "
                             f"choose {BUDGET!r}, 'off', 'auto' or a number of pieces >= 2")
        for flag in ("report", "cudagraphs"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"lowmem option {flag}={getattr(self, flag)!r} must be True or False")
        if self.cudagraphs and self.offload in ("layers", "parked"):
            raise ValueError(f"lowmem option cudagraphs=True does not combine with offload={self.offload!r}: "
                             "the offload ops hand copies from prefetch to reload through a host-side "
                             "table, which a CUDA graph replay would skip")
        if self.cudagraphs and self.inner != "inductor":
            raise ValueError("lowmem option cudagraphs=True needs inner='inductor' (Inductor captures the graphs)")
        if not isinstance(self.passes, tuple) or self.passes:
            from .passes.user import resolve

            object.__setattr__(self, "passes", resolve(self.passes))  # frozen: set once, here
        budget = self.memory_budget
        if isinstance(budget, bool) or (budget is not None and not isinstance(budget, (int, float))):
            raise ValueError(f"lowmem option memory_budget={budget!r}: use Options.from_user or parse_memory_budget")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(f"lowmem option memory_budget={budget!r}: a fraction must lie in (0, 1]")
        if isinstance(budget, int) and budget <= 0:
            raise ValueError(f"lowmem option memory_budget={budget!r}: a byte count must be positive")

    def left_to_budget(self) -> tuple[str, ...]:
        """The options left at "budget": `memory_budget` decides them (knob.py)."""
        return tuple(name for name in KNOB_DEFAULTS if getattr(self, name) == BUDGET)

    def without_knob(self) -> Options:
        """These options with every one left at "budget" set to what it is without a budget to
        meet (offload "off", mlp_chunks "off", logits "keep"): the fastest plan."""
        return dataclasses.replace(self, **{name: KNOB_DEFAULTS[name] for name in self.left_to_budget()})

    @property
    def kv_bits(self) -> int | None:
        """Bits per K/V element kept for the backward, or None when the attention pass is off."""
        return None if self.attention == "off" else int(self.attention[2:])

    def budget_bytes(self, device_total_bytes: int | None) -> int | None:
        """The budget in bytes; a fraction is resolved against the device's total memory."""
        if self.memory_budget is None:
            return None
        if isinstance(self.memory_budget, float):
            if device_total_bytes is None:
                raise ValueError("lowmem option memory_budget is a fraction of device memory, but there is no device")
            return int(self.memory_budget * device_total_bytes)
        return self.memory_budget

    def cache_key(self) -> str:
        """A stable string of every option, for compile caches keyed on what changes the output: the
        user passes by name, place and `uuid()`, and with them the sources of every op declared
        with `lowmem_compile.define_op` (editing a pass or its op recompiles)."""
        from .ops.library import user_ops_key

        values = tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "passes")
        extra = [user_ops_key()] if user_ops_key() else []
        if self.passes:
            from .passes.user import cache_key

            extra.insert(0, cache_key(self.passes))
        return repr((values, *extra)) if extra else repr(values)


#: The default of the options the memory knob decides: left at it, `memory_budget` chooses (knob.py).
BUDGET = "budget"
#: What each of them is when no budget asks for more: the fastest plan.
KNOB_DEFAULTS = {"offload": "off", "mlp_chunks": "off", "logits": "keep"}

_CHOICES = {
    "inner": ("inductor", "eager"),
    "attention": ("kv8", "kv4", "kv16", "off"),
    "nf4": ("auto", "quantize", "off"),
    "nf4_matmul": ("op", "graph"),
    "remat": ("auto", "none", "full"),
    "offload": (BUDGET, "off", "layers", "parked"),
    "fused_loss": ("on", "off"),
    "logits": (BUDGET, "keep", "drop"),
    "layers": ("auto", "off"),
    "warmup": ("thread", "processes", "off"),
}


def parse_memory_budget(value: Any) -> int | float | None:
    """`None`, a byte count, a size string ("20GB", "18GiB", "512 MB") or a fraction in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"lowmem option memory_budget={value!r} is not a size")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer() and value > 1:
            return int(value)
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _BYTE_UNITS and unit != "":
            raise ValueError(
                f"lowmem option memory_budget={value!r} is not a size; "
                f"write e.g. '20GB', '18GiB', '512MB', a byte count, or a fraction like 0.5"
            )
        number = float(match.group(1))
        if unit == "":
            return parse_memory_budget(number if "." in match.group(1) else int(number))
        return int(number * _BYTE_UNITS[unit])
    raise ValueError(f"lowmem option memory_budget={value!r} has type {type(value).__name__}; use bytes, '20GB' or a fraction")
