"""Sizes of graph values in bytes, concrete or symbolic."""

from __future__ import annotations

import torch


def size_hint(value: int | torch.SymInt) -> int:
    """A concrete int for a possibly symbolic size: its value in the example inputs."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        if hint is None:
            raise ValueError(f"size {value} has no hint (data-dependent size); cannot estimate its bytes")
        return int(hint)
    return int(value)


def tensor_bytes(val: torch.Tensor) -> int:
    """Bytes of a (possibly symbolic) tensor's elements at the example inputs' sizes."""
    return size_hint(val.numel()) * val.element_size()
