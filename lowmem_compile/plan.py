"""`plan(model, ...)`: what compiling would do, without compiling or running anything.

The passes and the recomputation planner run on the graph Dynamo captures (fake tensors: no
activation is allocated), and the backend stops before code generation. The report then holds what
each pass would replace and the cost model's prediction of the step's peak, including the longest
sequence that fits a budget when the sequence length is dynamic. So "will this fit at 32K tokens?"
is answered before the step that would run out of memory.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from .options import Options
from .report import Report, last_report


def _planned(exc: BaseException | None) -> bool:
    from .backend import Planned

    while exc is not None:
        if isinstance(exc, Planned):
            return True
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return False


def plan(model: torch.nn.Module, *args: Any, options: Mapping[str, Any] | Options | None = None, **kwargs: Any) -> Report:
    """The report of compiling `model` for one call `model(*args, **kwargs)`, nothing run.

    `options` as for `torch.compile(..., backend="lowmem", options=...)`. Covers the first graph Dynamo
    captures (a model with graph breaks is planned up to its first break); a model whose layers are
    framed (`layer_frames_`) is planned captured whole, as one step. Parameters are untouched and
    no gradient is produced. Resets Dynamo's caches before and after.
    """
    from . import reset
    from .backend import lowmem_backend
    from .layer_frames import suspended

    opts = Options.from_user(options)
    backend = functools.partial(lowmem_backend, options=opts, plan_only=True)
    reset()
    try:
        with suspended(model), torch._dynamo.config.patch(suppress_errors=False):  # never fall back to eager
            torch.compile(model, backend=backend)(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001  (Dynamo wraps the backend's exception)
        if not _planned(exc):
            raise
    else:
        raise RuntimeError("plan: the call compiled no graph (nothing for Dynamo to capture?)")
    report = last_report()
    torch._dynamo.reset()
    return report
