"""`prepare_(model, device=None)`: make a model ready for a lowmem fine-tune in one call, in place.

What it does, module by module in the model's own order:

- frozen `nn.Linear` layers (the ones `quantize_` picks: all but the LM head and embeddings unless
  `include` names them) -> :class:`NF4Linear`, quantized where the model is going (`device`), the
  16-bit copy dropped before the next layer is touched;
- frozen, untied embedding tables -> :class:`HostEmbedding` in (pinned) host memory, exact, when the
  model's device is not the CPU (`offload_embeddings_`'s rules; the table never visits the device);
- `config.use_cache = False` (no K/V cache in training) when `training`;
- everything else moves to `device` as it is.

With `device`, the device never holds more than one 16-bit linear layer (plus a bounded quantization
workspace, `chunk_numel` elements (4M) at ~16 bytes each) beyond what the prepared model keeps: a model
on the CPU in bf16 reaches a GPU as NF4 without a full 16-bit copy there.

A model built on the meta device (`with torch.device("meta"): model = AutoModelForCausalLM.from_config(cfg)`,
optionally wrapped by peft) is materialized as it goes: each module's tensors get storage on their
destination and are filled from `weights` (a state dict, a `.safetensors` file, a list of them, or a
directory of them) or, when `weights` is None, initialized by the model's own `_init_weights` (random
weights, for benchmarks); peft's LoRA adapters are then initialized as peft does. So a
Llama-3-70B-shape model can be prepared on one GPU with no 16-bit copy in host or device memory.

Call it after wrapping the model with peft (LoRA) and before creating the optimizer and compiling:
it replaces modules and parameters, so references taken before (an optimizer's) point to the old ones.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .formats import nf4 as _nf4
from .formats.nf4 import DEFAULT_BLOCKSIZE, NF4Weight
from .host_embedding import HostEmbedding, _scale_of, _why_not
from .layer_frames import layer_frames_
from .quantize import _DEFAULT_EXCLUDE, NF4Linear, _matches

log = logging.getLogger(__name__)

#: Seconds between progress lines while `prepare_` quantizes (a 70B model takes minutes).
PROGRESS_SECONDS = 10.0

__all__ = ["prepare_", "PrepareSummary"]

_DEFAULT_CHUNK = 1 << 22  # elements quantized at a time: ~16 bytes of workspace each (fp32 copies, indices)


@dataclass
class PrepareSummary:
    """What `prepare_` did. Byte counts are of parameters and buffers (each shared tensor once).

    `bytes_before`: the model's tensors before, wherever they were (meta tensors counted at the size
    they get); `bytes_after`: the prepared model's tensors outside host-memory embeddings (on
    `device` when one was given); `host_bytes`: the host-memory embedding tables;
    `device_peak_bytes`: on CUDA, the peak allocated memory of the device while preparing (the
    allocator's peak statistics are reset at the start).
    """

    device: str | None
    quantized: list[str] = field(default_factory=list)
    offloaded: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    materialized: int = 0  # tensors given storage from the meta device
    initialized: int = 0  # of those, filled by the model's init (the rest from `weights`)
    loaded: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    host_bytes: int = 0
    device_peak_bytes: int | None = None
    use_cache_off: bool = False
    layer_frames: int = 0  # decoder layers made Dynamo frames of their own (layer_frames.py)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        def size(n: int) -> str:
            return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"

        lines = [
            f"prepare_: {len(self.quantized)} linear layers -> NF4, {len(self.offloaded)} embedding tables -> host memory"
            + (f", on {self.device}" if self.device else ""),
            f"  model tensors {size(self.bytes_before)} -> {size(self.bytes_after)}"
            + (f" (+ {size(self.host_bytes)} in host memory)" if self.host_bytes else ""),
        ]
        if self.materialized:
            lines.append(f"  from the meta device: {self.materialized} tensors ({self.loaded} loaded, "
                         f"{self.initialized} initialized by the model's init)")
        if self.device_peak_bytes is not None:
            lines.append(f"  device peak while preparing: {size(self.device_peak_bytes)}")
        if self.use_cache_off:
            lines.append("  config.use_cache = False (training)")
        if self.layer_frames:
            lines.append(f"  {self.layer_frames} decoder layers traced as one frame each (layer_frames=False: the model whole)")
        for name, why in self.left.items():
            lines.append(f"  left: {name}: {why}")
        return "\n".join(lines)


# --- NF4 in bounded workspace --------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True,
                    chunk_numel: int = _DEFAULT_CHUNK) -> NF4Weight:
    """`NF4Weight.from_float(weight)`, bit for bit, computed `chunk_numel` elements at a time.

    `from_float` works on the whole weight in fp32 with integer indices (~16 bytes an element of
    workspace: 3.8 GB for a 70B model's MLP weight); chunks of whole blocks quantize alike (each block
    has its own absmax, codes pack in pairs), and the double quantization runs once on all the absmax.
    """
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    step = max(blocksize, chunk_numel // blocksize * blocksize)
    if n <= step:
        return NF4Weight.from_float(weight, blocksize, double_quant)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(_nf4.num_blocks(n, blocksize), dtype=torch.float32, device=flat.device)
    for start in range(0, n, step):  # step is even and a whole number of blocks
        p, a = _nf4.quantize(flat[start : start + step], blocksize)
        packed[start // 2 : start // 2 + p.numel()] = p
        absmax[start // blocksize : start // blocksize + a.numel()] = a
        del p, a
    extra: dict = {}
    if double_quant:
        absmax, extra["absmax2"], extra["code2"], extra["offset"] = _nf4.double_quantize(absmax)
    return NF4Weight(packed, absmax, tuple(weight.shape), blocksize, weight.dtype, **extra)


# --- weights for a meta model ----------------------------------------------------------------------------


class _Weights:
    """Lazy access to checkpoint tensors by name: a mapping, or `.safetensors` files (memory-mapped)."""

    def __init__(self, source) -> None:
        self._files: dict[str, object] = {}
        self._where: dict[str, str] = {}
        self._mapping: Mapping | None = None
        if isinstance(source, Mapping):
            self._mapping = source
            self.keys = set(source.keys())
            return
        paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                index = p / "model.safetensors.index.json"
                if index.exists():
                    files += sorted({p / f for f in json.loads(index.read_text())["weight_map"].values()})
                else:
                    files += sorted(p.glob("*.safetensors"))
            else:
                files.append(p)
        if not files:
            raise FileNotFoundError(f"prepare_: no .safetensors files in {source!r}")
        from safetensors import safe_open

        for f in files:
            handle = safe_open(str(f), framework="pt", device="cpu")
            self._files[str(f)] = handle
            for k in handle.keys():
                self._where[k] = str(f)
        self.keys = set(self._where)

    def find(self, name: str) -> str | None:
        """The checkpoint key for a model tensor name (peft's `base_model.model.` and `.base_layer` ignored)."""
        candidates = [name]
        bare = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        candidates += [bare, name.replace(".base_layer.", ".")]
        return next((c for c in candidates if c in self.keys), None)

    def get(self, key: str) -> torch.Tensor:
        if self._mapping is not None:
            return self._mapping[key]
        return self._files[self._where[key]].get_tensor(key)


# --- the walk ------------------------------------------------------------------------------------------


def _init_owners(model: nn.Module) -> dict[int, nn.Module | None]:
    """Each module -> the nearest Hugging Face `PreTrainedModel` at or above it (whose `_init_weights` applies)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = ()
    owners: dict[int, nn.Module | None] = {}

    def visit(module: nn.Module, owner: nn.Module | None) -> None:
        if PreTrainedModel and isinstance(module, PreTrainedModel):
            owner = module
        owners[id(module)] = owner
        for child in module.children():
            if id(child) not in owners:
                visit(child, owner)

    visit(model, None)
    return owners


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class _Walk:
    def __init__(self, model, device, weights, strict, summary):
        self.model, self.device, self.weights, self.strict, self.summary = model, device, weights, strict, summary
        self.owners = _init_owners(model)
        # Tensors owned by more than one module (tied weights): materialized or moved once, then shared.
        count: dict[int, int] = {}
        for m in model.modules():
            for t in [*m._parameters.values(), *m._buffers.values()]:
                if t is not None:
                    count[id(t)] = count.get(id(t), 0) + 1
        self.shared = {k: c for k, c in count.items() if c > 1}
        self.memo: dict[int, list] = {}  # id(old) -> [new, uses left, old (kept alive while its id is a key)]
        self.lora_fresh: set[int] = set()  # LoRA layers whose adapters came from the meta device

    def _reuse(self, old: torch.Tensor):
        entry = self.memo.get(id(old))
        if entry is None:
            return None
        entry[1] -= 1
        if entry[1] == 0:
            del self.memo[id(old)]
        return entry[0]

    def _remember(self, old: torch.Tensor, new: torch.Tensor) -> None:
        if id(old) in self.shared:
            self.memo[id(old)] = [new, self.shared[id(old)] - 1, old]

    def place(self, module: nn.Module, prefix: str, target: torch.device) -> None:
        """Give `module`'s own tensors storage on `target`: moved, loaded from `weights`, or initialized."""
        fresh, kept = [], []
        persistent = set(module._buffers) - module._non_persistent_buffers_set
        for store, is_param in ((module._parameters, True), (module._buffers, False)):
            for n, t in list(store.items()):
                if t is None:
                    continue
                new = self._reuse(t)
                if new is not None:
                    store[n] = new
                    kept.append((store, n))
                    continue
                full = prefix + n
                if t.is_meta:
                    self.summary.materialized += 1
                    key = self.weights.find(full) if self.weights is not None else None
                    if key is not None:
                        src = self.weights.get(key)
                        if tuple(src.shape) != tuple(t.shape):
                            raise ValueError(f"prepare_: {full}: checkpoint tensor {key!r} has shape "
                                             f"{tuple(src.shape)}, the model expects {tuple(t.shape)}")
                        new = src.to(device=target, dtype=t.dtype, copy=True)
                        self.summary.loaded += 1
                        kept.append((store, n))
                    else:
                        if (self.weights is not None and self.strict and "lora_" not in full
                                and (is_param or n in persistent)):
                            raise KeyError(f"prepare_: {full} is on the meta device and not in `weights` "
                                           f"(pass strict=False to initialize what is missing)")
                        new = torch.empty_like(t, device=target)
                        fresh.append((store, n))
                    if is_param:
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                else:
                    new = t.to(target)
                    if is_param and not isinstance(new, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                    kept.append((store, n))
                store[n] = new
                self._remember(t, new)
        if fresh:
            self._initialize(module, prefix, fresh, kept)

    def _initialize(self, module, prefix, fresh, kept) -> None:
        if any("lora_" in prefix + n for _, n in fresh):
            self.lora_fresh.add(id(module))
        owner = self.owners.get(id(module))
        # Hide the tensors that already hold values (moved, loaded, shared) behind meta placeholders, so
        # the init writes only the fresh ones.
        hidden = []
        for store, n in kept:
            t = store[n]
            stand_in = torch.empty_like(t, device="meta")
            hidden.append((store, n, t))
            store[n] = nn.Parameter(stand_in, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else stand_in
        try:
            with torch.no_grad():
                if owner is not None:
                    owner._init_weights(module)
                elif hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                elif not all("lora_" in prefix + n for _, n in fresh):
                    raise ValueError(f"prepare_: {prefix.rstrip('.') or 'the model'} ({type(module).__name__}) is on the "
                                     "meta device and neither a Hugging Face model's _init_weights nor reset_parameters "
                                     "covers it; pass weights=")
        finally:
            for store, n, t in hidden:
                store[n] = t
        self.summary.initialized += len(fresh)


def _offload_pays(device: torch.device) -> bool:
    """Whether a table in host memory saves anything: only when the model's device is not the host."""
    return device.type not in ("cpu", "meta")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _lora_init(model: nn.Module, walk: _Walk) -> None:
    """peft's own initialization for adapters that came from the meta device."""
    if not walk.lora_fresh:
        return
    from peft.tuners.lora import LoraLayer

    configs = getattr(model, "peft_config", {}) or {}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [*module.lora_A.keys(), *module.lora_embedding_A.keys()]
        touched = any(id(m) in walk.lora_fresh for m in module.modules())
        if not touched:
            continue
        for name in adapters:
            init = getattr(configs.get(name), "init_lora_weights", True)
            if init not in (True, False) and str(init).lower() != "gaussian":
                raise ValueError(f"prepare_: LoRA init {init!r} needs the base weights; build the adapters after "
                                 "the model has its weights (or use init_lora_weights=True)")
            if getattr(module, "use_dora", {}).get(name, False):
                raise ValueError("prepare_: DoRA's magnitude needs the base weights; not supported from the meta device")
            with torch.no_grad():
                module.reset_lora_parameters(name, init)


def _configs(model: nn.Module) -> list:
    """The model configs its modules hold (a peft wrapper, the model, its attention modules)."""
    configs = (m.__dict__.get("config") for m in model.modules())
    return [c for c in configs if c is not None and not isinstance(c, dict)]


def prepare_(
    model: nn.Module,
    device: torch.device | str | int | None = None,
    *,
    weights: Mapping[str, torch.Tensor] | str | os.PathLike | Iterable | None = None,
    quantize: bool = True,
    offload_embeddings: bool = True,
    training: bool = True,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    include: Iterable[str] | Callable[[str, nn.Linear], bool] | None = None,
    exclude: Iterable[str] = (),
    strict: bool = True,
    chunk_numel: int = _DEFAULT_CHUNK,
    layer_frames: bool = True,
) -> PrepareSummary:
    """Prepare `model` for a lowmem fine-tune, in place; returns a :class:`PrepareSummary`.

    `device`: where the model goes (moved module by module, quantized there). None leaves each tensor
    where it is (a meta tensor goes to the CPU). `weights`: for tensors on the meta device, a state
    dict or `.safetensors` file(s)/directory, keys as the model's own names (peft's
    `base_model.model.` and `.base_layer` are ignored); missing ones raise unless `strict=False`,
    which initializes them. `quantize`, `offload_embeddings`, `training`: the three steps (NF4 for
    frozen linears, host-memory embeddings, `use_cache=False`). `blocksize`, `double_quant`,
    `include`, `exclude`: as in `quantize_`. `chunk_numel`: elements quantized at a time.
    `layer_frames`: trace each decoder layer's code once (`layer_frames_`: the first step's Dynamo
    trace stops growing with depth; docs/layers.md); False traces the model whole.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_ takes an nn.Module, got {type(model).__name__}")
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type == "meta":
            raise ValueError("prepare_: device='meta' materializes nothing; pass a real device or None")
    if isinstance(include, str):
        include = (include,)
    exclude = tuple(exclude)
    summary = PrepareSummary(device=str(device) if device is not None else None)
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    tensors = [t for m in model.modules() for t in [*m._parameters.values(), *m._buffers.values()]]
    summary.bytes_before = _tensor_bytes(tensors)
    del tensors
    walk = _Walk(model, device, _Weights(weights) if weights is not None else None, strict, summary)

    def where(module: nn.Module) -> torch.device:
        if device is not None:
            return device
        t = next((t for t in [*module._parameters.values(), *module._buffers.values()] if t is not None), None)
        return torch.device("cpu") if t is None or t.is_meta else t.device

    # What happens to each module, decided before anything moves (names, types and flags only).
    to_quantize: dict[int, str] = {}
    to_offload: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight is not None and not module.weight.requires_grad:
            if not quantize:
                continue
            if type(module) is not nn.Linear:
                kind = type(module).__name__
                summary.left[name] = (f"{kind}: already 4-bit, compiled as it is" if "4bit" in kind
                                      else f"{kind} is not a plain nn.Linear")
            elif _matches(name, exclude):
                summary.left[name] = "excluded"
            elif not (include(name, module) if callable(include) else
                      _matches(name, include) if include is not None else not _matches(name, _DEFAULT_EXCLUDE)):
                summary.left[name] = ("the LM head, embeddings and peft adapters stay 16-bit unless include= names them"
                                      if include is None else "not selected by include")
            elif id(module.weight) in walk.shared:
                summary.left[name] = "its weight is shared with another module (tied)"
            elif not module.weight.is_floating_point() or module.weight.dtype == torch.float64:
                raise ValueError(f"prepare_: layer {name!r} has a {module.weight.dtype} weight; NF4 needs fp32/fp16/bf16")
            else:
                to_quantize[id(module)] = name
        elif isinstance(module, nn.Embedding) and name and offload_embeddings:
            if _matches(name, exclude):
                summary.left[name] = "excluded"
                continue
            reason = _why_not(module, id(module.weight) in walk.shared)
            if reason is None and not _offload_pays(where(module)):
                reason = "the model stays on the CPU (pass device= to keep the table in host memory for it)"
            if reason is None:
                to_offload[id(module)] = name
            else:
                summary.left[name] = reason
    if (quantize and not to_quantize and any(type(m) is nn.Linear for m in model.modules())
            and not any(isinstance(m, NF4Linear) for m in model.modules())):
        summary.left["(model)"] = ("no frozen nn.Linear to quantize: wrap the model with peft (LoRA) first, "
                                   "or freeze the base weights")

    start = last_said = time.perf_counter()
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if time.perf_counter() - last_said >= PROGRESS_SECONDS:
            last_said = time.perf_counter()
            log.info("prepare_: %d of %d linears in NF4 after %.0f s (at %s)", len(summary.quantized), len(to_quantize),
                     last_said - start, name)
        if id(module) in to_quantize:
            target = where(module)
            walk.place(module, prefix, target)
            nf4 = quantize_weight(module.weight, blocksize, double_quant, chunk_numel)
            parent, child = _parent(model, name)
            setattr(parent, child, NF4Linear(nf4, module.bias))
            module.weight = None  # the 16-bit copy goes now, before the next layer
            summary.quantized.append(name)
            del nf4
        elif id(module) in to_offload:
            target = where(module)
            walk.place(module, prefix, torch.device("cpu"))  # the table never visits the device
            # a subclass (Gemma's scaled embedding) moves only if its forward is the lookup times a
            # constant, checked by running it (offload_embeddings_'s rule): now that it has its values
            scale, reason = _scale_of(module)
            if reason is not None:
                summary.left[name] = reason
                walk.place(module, prefix, target)
                continue
            parent, child = _parent(model, name)
            setattr(parent, child, HostEmbedding(module.weight, target, None if scale is None else scale.to(target)))
            module.weight = None
            summary.offloaded.append(name)
        elif isinstance(module, HostEmbedding):
            continue  # already in host memory (offload_embeddings_, or prepare_ called before): stays there
        else:
            walk.place(module, prefix, where(module))

    _lora_init(model, walk)

    if training:
        for config in _configs(model):
            if hasattr(config, "use_cache"):
                config.use_cache = False
                summary.use_cache_off = True

    if layer_frames:
        summary.layer_frames = layer_frames_(model)

    host, other = [], []
    for m in model.modules():
        bucket = host if isinstance(m, HostEmbedding) else other
        bucket += [t for t in [*m._parameters.values(), *m._buffers.values()] if t is not None]
    summary.host_bytes = _tensor_bytes(host)
    summary.bytes_after = _tensor_bytes(other)
    if cuda:
        summary.device_peak_bytes = torch.cuda.max_memory_allocated(device)
    log.info("prepare_: %d linears in NF4, %d embedding tables in host memory, in %.1f s", len(summary.quantized),
             len(summary.offloaded), time.perf_counter() - start)
    return summary
