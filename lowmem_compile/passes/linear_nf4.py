"""NF4 pass: lowers linear layers whose frozen weight is stored in NF4 to `lowmem::nf4_linear`.

Hook only for now: it matches nothing and reports zero.
"""

from __future__ import annotations

import torch

from ..options import Options
from ..report import NF4Stats
from . import CompileContext, GraphPass


class LinearNF4Pass(GraphPass):
    name = "linear_nf4"
    section = "nf4"

    def enabled(self, options: Options) -> bool:
        return options.nf4 != "off"

    def __call__(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> NF4Stats:
        return NF4Stats()
