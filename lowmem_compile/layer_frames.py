"""A Dynamo frame per decoder layer (`layer_frames_`): the layers' code is traced once, not once per layer.

Why: `torch.compile(model)` makes Dynamo trace the model's Python whole, every decoder layer's
`forward` again (and install guards for each): on an H100 that trace and its guards took 11.8 s of
a 35.4 s first step at Llama-3-8B's 32 layers, growing with depth. When each layer's `forward` is a
frame of its own, Dynamo compiles its code once and serves the other layers from its cache
(`inline_inbuilt_nn_modules` makes their weights graph inputs, not guarded by identity), as
PyTorch's regional compilation does; here no code of the model changes: `layer_frames_` replaces
each layer's bound `forward` with a call Dynamo skips (`torch.compiler.disable(recursive=False)`),
so the call into the real `forward` starts a frame.

The backend then receives the step in pieces: small graphs for what runs before and after the
layers (the mask and rotary tables, the final norm, head and loss), and one graph per distinct layer
kind. The layer graph is planned for the whole step, as a body of the split route is
(`cost/layered.py`): :func:`current` tells the backend, while Dynamo compiles a layer's frame, how
many layers the model has and what the model keeps on the device. The graphs after the layers are
not seen yet: the plan counts them by estimate (`tail_estimate`), so a budget, and the memory
knob's choice between parking in the layers and dropping the logits in the tail, cover the step.

The first layer's input (rows of a frozen embedding) needs no gradient while the others' do, which
would make Dynamo compile its frame apart; the call passes it through :class:`GradSink`, so every
layer is served by one graph at the price of one input gradient the first layer computes and drops.

The mask. Captured whole, the attention pass proves HF's mask from how the model builds it; here
the model builds it before its layers, and it would reach them as an opaque input (the
general-mask path, and at 131072 tokens 16 GiB of bools). The graphs before the layers run
uncompiled (backend.py), and the masks they prove (`attention_masks.mask_forms`) are marked
(`mark_mask`) and, for SDPA layers (`masks_rewritable`), never built: a plain causal one is an
empty stand-in the layer drops (its attention then reads no mask as causal), any other (a window,
packed documents, key padding) comes as its parts, and the layer's frame is then
`_with_mask_built`, which builds the mask from them before the layer's own `forward`: the layer's
graph shows the attention pass a mask it proves, the kernel runs without it, and the mask's
construction is dead code. That rewrite applies while the module holding the framed layers runs
(`in_framed_step`: its class is swapped too), so another model's masks stay as built.
`layer_frames_(model, False)` restores whole-model capture.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import weakref
from typing import Any, Iterator

import torch
from torch import nn

from .passes.attention_masks import mask_from_parts

__all__ = ["layer_frames_", "current", "GradSink", "LayerFrame", "framed", "suspended", "mark_mask", "in_framed_step"]

_CURRENT: contextvars.ContextVar[LayerFrame | None] = contextvars.ContextVar("lowmem_layer_frame", default=None)
_FRAMED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_MARKED: dict[int, tuple[weakref.ref, tuple[int, bool, bool] | None]] = {}
"""Masks a graph before the layers returned that are proven causal, by id (`mark_mask`): None for
plain causal, else the (window, documents, padding) its parts rebuild it with."""
_NONE_IS_CAUSAL = ("sdpa", "flash_attention_2", "flash_attention_3")
"""transformers' attention forms that read `attention_mask=None` as causal."""
_KEPT: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
"""Per framed model, the device bytes its compiled layers keep for their backward, all calls, with
the tables they share (rotary, mask)."""
_AFTER: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()
"""Per framed model, what each graph compiled after its layers (the final norm) keeps for its
backward, by the graph's code: held while the graphs after it (the head and loss) run theirs."""


@dataclasses.dataclass(frozen=True)
class LayerFrame:
    """The layer whose frame is running, for a backend compiling it."""

    model: weakref.ref
    """The module `layer_frames_` was called on."""
    calls: int
    """Decoder layers in the model: every one runs a body compiled for one of them."""
    hidden: torch.Tensor
    """The hidden state this call passes in: the input that belongs to one call (the others are
    weights or values the layers share)."""
    layer: weakref.ref | None = None
    """The layer whose frame it is."""

    def alike(self) -> int:
        """Layers of the model like this one (type, attributes and weights' shapes, dtypes and
        `requires_grad`): the calls one compiled body serves, as Dynamo's guards group them."""
        model, layer = self.model(), self.layer() if self.layer is not None else None
        layers = decoder_layers(model) if model is not None else None
        if layer is None or layers is None:
            return self.calls
        return sum(_kind(other) == _kind(layer) for other in layers)

    def device_bytes(self, device: torch.device) -> int:
        """Bytes of the model's parameters and buffers on `device`: held from the step's start."""
        model = self.model()
        return 0 if model is None else weight_bytes(model, device)


class GradSink(torch.autograd.Function):
    """`x` as a tensor that requires grad, whose gradient goes nowhere. A layer input that needs no
    gradient (the first layer's) is given one so that it calls the graph compiled for the others; a
    leaf made to require grad (`detach().requires_grad_()`) would instead keep that unused gradient
    in its `.grad` through the first layer's backward, where the step's peak is. `anchor`, a scalar
    leaf that requires grad, only makes the output require grad; it gets no gradient either."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        return None, None

    @classmethod
    def needing_grad(cls, x: torch.Tensor) -> torch.Tensor:
        return cls.apply(x, torch.ones((), requires_grad=True))


def weights_of(model: nn.Module) -> dict[int, torch.Tensor]:
    """The model's parameters and buffers, by id: what a graph of it takes as weight inputs."""
    return {id(t): t for t in [*model.parameters(), *model.buffers()]}


def weight_bytes(model: nn.Module, device: torch.device, leaving: Any = ()) -> int:
    """Bytes of the model's parameters and buffers on `device`, but for those in `leaving`."""
    left = {id(x) for x in leaving}
    return sum(t.numel() * t.element_size() for i, t in weights_of(model).items() if t.device == device and i not in left)


def _kind(layer: nn.Module) -> tuple:
    """What tells one layer's graph from another's besides the weights' values."""
    attributes = tuple(sorted((k, v) for m in layer.modules() for k, v in vars(m).items()
                              if isinstance(v, (bool, int, float, str)) and k not in ("layer_idx", "training")))
    weights = tuple((n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in
                    [*layer.named_parameters(), *layer.named_buffers()])
    return type(layer), attributes, weights


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's repeated layers: the `ModuleList` of two or more modules holding the most
    parameters (a decoder's blocks), or None."""
    best, best_size = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    return best


def layer_frames_(model: nn.Module, enable: bool = True) -> int:
    """Make each decoder layer's `forward` a Dynamo frame of its own (see the module docstring), in
    place; returns the number of layers framed (0 when the model has no repeated layers). With
    `enable=False`, restore the layers' own class (whole-model capture).

    Each layer's class becomes a subclass whose `forward` is the framed call (not an instance
    attribute: a copy made with `copy.deepcopy` or pickle would then call the original's layers); a
    copy gets the original class back, unframed."""
    layers = decoder_layers(model)
    if layers is None:
        return 0
    ref = weakref.ref(model)
    for layer in layers:
        base = getattr(type(layer), "_lowmem_unframed", type(layer))
        if enable:
            layer.__class__ = _framed_class(base)
            layer._lowmem_step = (ref, len(layers))
        else:
            layer.__class__ = base
            layer.__dict__.pop("_lowmem_step", None)
    holder = next((m for m in model.modules() if any(c is layers for c in m.children())), None)
    if holder is not None:
        base = getattr(type(holder), "_lowmem_unframed", type(holder))
        holder.__class__ = _stepping_class(base) if enable else base
    if enable:
        _FRAMED.add(model)
    else:  # every handle on these layers (a peft model and the model inside it): none is framed now
        for other in [m for m in list(_FRAMED) if decoder_layers(m) is layers]:
            _FRAMED.discard(other)
    return len(layers) if enable else 0


_CLASSES: dict[type, type] = {}
_STEPPING_CLASSES: dict[type, type] = {}
_STEPPING: contextvars.ContextVar[bool] = contextvars.ContextVar("lowmem_framed_step", default=False)


def _framed_class(base: type) -> type:
    """The subclass of the layer class `base` whose `forward` calls `base.forward` as a frame of its
    own: one per class (Dynamo guards on the layer's type, so every layer must share it)."""
    if base in _CLASSES:
        return _CLASSES[base]

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if (isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and not hidden.requires_grad
                and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            hidden = GradSink.needing_grad(hidden)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        mask = kwargs.get("attention_mask")
        form = _marked(mask)
        built_inside = form is not None and _takes_bool_masks(self)  # the frame builds it from its parts
        if form is None and mask is not None and _is_marked(mask):
            # None: the same attention, and the layer's graph shows it causal
            kwargs["attention_mask"] = None if _reads_none_as_causal(self) else _built(mask, None)
        elif form is not None and not built_inside:
            kwargs["attention_mask"] = _built(mask, form)
        model, calls = self._lowmem_step
        frame = LayerFrame(model, calls, hidden, weakref.ref(self)) if isinstance(hidden, torch.Tensor) else None
        token = _CURRENT.set(frame)
        try:
            if built_inside:
                del kwargs["attention_mask"]
                return _with_mask_built(self, base, mask, *form, *args, **kwargs)
            return base.forward(self, *args, **kwargs)
        finally:
            _CURRENT.reset(token)

    return _CLASSES.setdefault(base, _subclass(base, forward))


def _stepping_class(base: type) -> type:
    """The subclass of `base` (the module that holds the framed layers) whose `forward` runs eagerly
    with `in_framed_step()` true: the masks its graphs build then are for framed layers. (Dynamo
    runs that `forward` eagerly anyway: it cannot resume inside the layer loop after the break at a
    layer's call; skipping it from the start also saves that trace.)"""
    if base in _STEPPING_CLASSES:
        return _STEPPING_CLASSES[base]

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        token = _STEPPING.set(True)
        try:
            return base.forward(self, *args, **kwargs)
        finally:
            _STEPPING.reset(token)

    return _STEPPING_CLASSES.setdefault(base, _subclass(base, forward))


def _subclass(base: type, forward: Any) -> type:
    """`base` with `forward` as a call Dynamo skips (its callees are frames of their own); a copy
    (`copy.deepcopy`, pickle) of an instance gets `base` back."""

    def __reduce_ex__(self: nn.Module, protocol: int) -> Any:
        constructor, args, *rest = object.__reduce_ex__(self, protocol)
        return (constructor, (base, *args[1:]), *rest)

    cls = type(base.__name__, (base,), {
        "__reduce_ex__": __reduce_ex__,
        "_lowmem_unframed": base,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
    })
    # set after the class exists: a base's `__init_subclass__` may wrap a `forward` given in the class
    # body (transformers' checkpointing layers do), which would put a frame Dynamo traces around ours
    cls.forward = torch.compiler.disable(forward, recursive=False)
    return cls


def in_framed_step() -> bool:
    """Whether the module holding a framed model's layers is running: a mask built now is for them."""
    return _STEPPING.get()


def _with_mask_built(layer: nn.Module, base: type, parts: torch.Tensor, window: int, documents: bool, padding: bool,
                     *args: Any, **kwargs: Any) -> Any:
    """The layer's frame when its mask comes as parts: the mask is built inside it, so the layer's
    graph shows the attention pass how (`attention_masks.mask_from_parts`) and the kernel runs
    without it (the mask's construction is then dead code)."""
    return base.forward(layer, *args, attention_mask=mask_from_parts(parts, window, documents, padding), **kwargs)


def mark_mask(mask: torch.Tensor, form: tuple[int, bool, bool] | None = None) -> None:
    """`mask` is proven causal (`attention_masks.mask_forms`): plain (None; a layer given it may drop
    it), or the parts of a mask with (window, documents, padding) (`attention_masks.with_mask_parts`)."""
    key = id(mask)
    _MARKED[key] = (weakref.ref(mask, lambda _: _MARKED.pop(key, None)), form)


def _is_marked(mask: Any) -> bool:
    entry = _MARKED.get(id(mask))
    return entry is not None and entry[0]() is mask


def _marked(mask: Any) -> tuple[int, bool, bool] | None:
    """The (window, documents, padding) of a mask given as parts, else None."""
    return _MARKED[id(mask)][1] if _is_marked(mask) else None


@torch.compiler.disable  # eager: as a frame of its own, the backend would take it for a graph before the layers
def _built(mask: torch.Tensor, form: tuple[int, bool, bool] | None) -> torch.Tensor:
    """A marked mask as values, for a layer that reads it: one given as parts (`form`) rebuilt from
    them, a plain causal one left unbuilt ([B, 1, S, 0], `attention_masks.with_mask_parts`) the
    [B, 1, S, S] causal mask it stands for."""
    if form is not None:
        return mask_from_parts(mask, *form)
    if mask.shape[-1] != 0:
        return mask
    b, _, s, _ = mask.shape
    return torch.ones(s, s, dtype=torch.bool, device=mask.device).tril().expand(b, 1, s, s)


def masks_rewritable() -> bool:
    """Whether every framed model's layers take a bool mask built inside them and a missing mask as
    causal (SDPA): a mask proven before them then need not be built there (backend.py)."""
    models = list(_FRAMED)
    return bool(models) and all(_takes_bool_masks(layer) for m in models for layer in decoder_layers(m) or ())


def _takes_bool_masks(layer: nn.Module) -> bool:
    """Every attention in `layer` is causal SDPA: it reads a bool [B, 1, S, S] mask, or none as causal."""
    return _reads_none_as_causal(layer) and all(
        getattr(m.config, "_attn_implementation", None) == "sdpa" for m in _attentions(layer))


def _attentions(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if getattr(m, "is_causal", None) is not None and hasattr(m, "config")]


def _reads_none_as_causal(layer: nn.Module) -> bool:
    """Every attention in `layer` is causal and takes a missing mask as the causal one."""
    attentions = _attentions(layer)
    return bool(attentions) and all(
        m.is_causal is True and getattr(m.config, "_attn_implementation", None) in _NONE_IS_CAUSAL for m in attentions)


def current() -> LayerFrame | None:
    """The layer frame running on this thread, if any (Dynamo compiles a frame inside its call)."""
    return _CURRENT.get()


def note_kept(frame: LayerFrame, kept: int) -> None:
    """Record what a compiled layer body keeps over all `frame.calls` calls, for the graphs after it."""
    model = frame.model()
    if model is not None:
        _KEPT[model] = max(kept, _KEPT.get(model, 0))
        _AFTER.pop(model, None)  # a body compiled: the graphs after the layers register again


def note_after(model: nn.Module, graph: str, saved: int) -> None:
    """Record what graph `graph` (its code) of `model`, run after the layers, keeps for its backward
    (its saved values and its activation inputs)."""
    if model in _KEPT:
        _AFTER.setdefault(model, {})[graph] = saved


def tail_estimate(model: nn.Module, hidden: torch.Tensor, logits_kept: bool, fused_loss: bool) -> int:
    """Bytes the graphs after the layers (final norm, head, loss) add at their peak to what the step
    holds anyway, estimated for planning a layer body before they are seen: the final norm's output
    and the hidden state's gradient (the fused loss computes it in the forward), then the fused
    loss's chunk of logits and row losses (the whole logits in 16 and 32 bits without it), and the
    returned logits. The tail's own plan, made with what the layers keep, replaces it in the report."""
    size = hidden.numel() * hidden.element_size()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return 2 * size
    from .ops.linear_cross_entropy import choose_chunk_tokens

    tokens, vocab, item = hidden.numel() // hidden.shape[-1], weight.shape[0], hidden.element_size()
    if fused_loss:
        loss = min(tokens, choose_chunk_tokens(vocab, item)) * (vocab * item + 4)
    else:
        loss = tokens * vocab * 2 * 4  # the logits upcast to float32 and their log-softmax
    return 2 * size + loss + (tokens * vocab * item if logits_kept or not fused_loss else 0)


def owner(example_inputs: Any) -> nn.Module | None:
    """The framed model whose weights are among a graph's inputs: the graph is one of its pieces
    outside the layers (the rotary tables, the final norm, the head and loss)."""
    inputs = {id(x) for x in example_inputs if isinstance(x, torch.Tensor)}
    return next((model for model in list(_FRAMED) if not inputs.isdisjoint(weights_of(model))), None)


def held_outside(model: nn.Module, example_inputs: Any, device: torch.device, graph: str = "") -> int:
    """Device bytes a graph of `model` (code `graph`) compiled after its framed layers does not see
    but the step holds while it runs: what the layers and the other graphs after them keep for their
    backward, and the model's weights that are not among its inputs. Zero before a layer body was
    compiled (a graph before the layers)."""
    if model not in _KEPT:
        return 0
    after = sum(saved for code, saved in _AFTER.get(model, {}).items() if code != graph)
    return _KEPT[model] + after + weight_bytes(model, device, leaving=example_inputs)


def framed() -> bool:
    """Whether some live model has framed layers: its graphs outside the layers are not split again."""
    return len(_FRAMED) > 0


@contextlib.contextmanager
def suspended(model: nn.Module) -> Iterator[None]:
    """Whole-model capture for the duration (planning a step as one graph), then the frames again."""
    layers = decoder_layers(model)
    was = layers is not None and hasattr(type(layers[0]), "_lowmem_unframed")
    if was:
        layer_frames_(model, False)
    try:
        yield
    finally:
        if was:
            layer_frames_(model)
