"""lowmem_compile: a `torch.compile` backend for fine-tuning large language models in little memory.

    import lowmem_compile
    model = torch.compile(model, backend="lowmem", options={"memory_budget": "20GB"})

Importing registers the backend "lowmem" (an installed package also registers it through the
`torch_dynamo_backends` entry point, so `backend="lowmem"` works even without the import).

A compile of a large model takes minutes; its progress (each pass, the partition, code generation,
with times) is logged at INFO on the `lowmem_compile` logger:
`logging.basicConfig(); logging.getLogger("lowmem_compile").setLevel(logging.INFO)`.

Extending it from outside the package (docs/writing_a_pass.md): `GraphPass` and `CompileContext`
for a rewrite of the Dynamo graph, passed as `options={"passes": [...]}`; `define_op` for a custom
op with the costs the memory planner reads.
"""

from __future__ import annotations

import logging

from .host_embedding import HostEmbedding, offload_embeddings_
from .layer_frames import layer_frames_
from .memory import release_compile_memory
from .ops.library import define_user_op as define_op
from .options import Options
from .passes import CompileContext, GraphPass
from .passes.user import PassError
from .plan import plan
from .prepare import PrepareSummary, prepare_
from .quantize import NF4Linear, quantize_
from .report import Report, last_report

__all__ = [
    "Options", "Report", "last_report", "reset", "BACKEND_NAME", "quantize_", "NF4Linear",
    "offload_embeddings_", "HostEmbedding", "plan", "prepare_", "PrepareSummary",
    "release_compile_memory", "GraphPass", "CompileContext", "PassError", "define_op", "layer_frames_",
]
__version__ = "0.1.0"

BACKEND_NAME = "lowmem"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def reset() -> None:
    """Forget compiled graphs (Dynamo's caches too) and start a new report."""
    import torch

    from .report import STORE

    torch._dynamo.reset()
    STORE.clear()


def _register_backend() -> None:
    """Register with Dynamo unless the installed entry point will (registering twice is an error)."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if any(ep.name == BACKEND_NAME for ep in entry_points(group="torch_dynamo_backends")):
        return
    if BACKEND_NAME not in registry._COMPILER_FNS:
        from .backend import lowmem_backend

        registry.register_backend(compiler_fn=lowmem_backend, name=BACKEND_NAME)


_register_backend()
