"""Hugging Face `Trainer` / TRL `SFTTrainer` with a lowmem-compiled model.

The route that works: compile the model in place with nn.Module's own method, then hand the model
itself to the trainer, with `torch_compile` left off in its arguments:

    lowmem_compile.prepare_(model, device="cuda")          # a peft (LoRA) model
    model.compile(backend="lowmem", options={...})         # options pass through here
    trainer = Trainer(model=model, args=TrainingArguments(...), ..., callbacks=[LowmemCallback()])

Why the other routes fail (transformers 5.25, accelerate 1.16, TRL 1.16; tests/test_trainer.py checks
that they still do, so this page is told when they start working):

- `TrainingArguments(torch_compile=True, torch_compile_backend="lowmem")`: the Trainer builds
  accelerate's `TorchDynamoPlugin(backend="lowmem")`, whose `__post_init__` converts the name to the
  closed enum `DynamoBackend` (`DynamoBackend("LOWMEM")`), which lists only the backends PyTorch
  shipped when accelerate was written: `ValueError: 'LOWMEM' is not a valid DynamoBackend`. Nothing
  of ours runs before it. Even where the name passed, the plugin takes no `options` from
  `TrainingArguments`.
- `Trainer(model=torch.compile(model, backend="lowmem"))`: the wrapper's `forward(*args, **kwargs)`
  is what the Trainer inspects to decide which dataset columns the model accepts
  (`remove_unused_columns`), so it drops them all ("No columns in the dataset match the model's forward
  method signature"). `remove_unused_columns=False` gets past that, but the trainer then saves and
  unwraps a wrapper instead of the model; `model.compile` keeps the model the object it was.
"""

from __future__ import annotations

import logging
import warnings

from transformers import TrainerCallback

from .memory import release_compile_memory

__all__ = ["LowmemCallback", "is_compiled"]

log = logging.getLogger("lowmem_compile")


def is_compiled(model) -> bool:
    """Whether `model` (or the module a trainer wraps) runs compiled: `model.compile(...)` was called."""
    return getattr(model, "_compiled_call_impl", None) is not None


class LowmemCallback(TrainerCallback):
    """Warns when the trainer's model was not compiled in place or gradient checkpointing is on, and gives the compile's scratch memory
    back to the driver after the first optimizer step and the first evaluation (each compiles graphs):
    see `lowmem_compile.release_compile_memory`."""

    def __init__(self, release: bool = True) -> None:
        self.release = release
        self._released_train = self._released_eval = False
        self.released: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not is_compiled(model):
            warnings.warn("LowmemCallback: the trainer's model is not compiled; call "
                          "model.compile(backend='lowmem', options=...) before Trainer(model=model, ...)", stacklevel=2)
        if getattr(args, "gradient_checkpointing", False):
            warnings.warn("LowmemCallback: gradient_checkpointing is on (TRL's SFTConfig turns it on by default): "
                          "the layers run inside checkpoint regions the lowmem passes do not rewrite (no NF4 "
                          "lowering, no planned recomputation); set gradient_checkpointing=False, lowmem's remat "
                          "pass decides what to recompute", stacklevel=2)

    def _release(self) -> None:
        if self.release:
            stats = release_compile_memory()
            self.released.append(stats)
            log.info("released %.2f GiB of cached device memory after compiling", stats["released"] / 2**30)

    def on_step_end(self, args, state, control, **kwargs):
        if not self._released_train:
            self._released_train = True
            self._release()

    def on_evaluate(self, args, state, control, **kwargs):
        if not self._released_eval:
            self._released_eval = True
            self._release()
