"""Attention pass: replaces SDPA and the eager softmax(QK^T)V form by `lowmem::attention`.

Runs first among the pre-autograd passes. Hook only for now: it matches nothing and reports zero.
"""

from __future__ import annotations

import torch

from ..options import Options
from ..report import AttentionStats
from . import CompileContext, GraphPass


class AttentionPass(GraphPass):
    name = "attention"
    section = "attention"

    def enabled(self, options: Options) -> bool:
        return options.attention != "off"

    def __call__(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> AttentionStats:
        return AttentionStats()
