"""The partition function: splits AOTAutograd's joint graph into forward and backward graphs and
decides what the forward saves for the backward.

Runs inside AOTAutograd (Inductor calls it through `config.custom_partitioner_fn`; the eager inner
compiler passes it as `partition_fn`). For now it delegates the choice to the stock min-cut
partitioner and measures what that saves; the cost-model planner replaces the delegation.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from ..cost.sizes import tensor_bytes
from ..options import Options
from ..report import GraphReport, RematStats
from ..sources import source_hash


def saved_values(fw_module: torch.fx.GraphModule, num_fwd_outputs: int) -> list[torch.fx.Node]:
    """The tensors the forward graph returns for the backward (after the user-visible outputs)."""
    output = fw_module.graph.find_nodes(op="output")[0]
    saved = output.args[0][num_fwd_outputs:]
    return [n for n in saved if isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)]


class RematPartitioner(CustomPartitionerFn):
    """Forward/backward split for one compiled graph; records what it saved in the graph's report."""

    def __init__(self, options: Options, report: GraphReport) -> None:
        self.options = options
        self.report = report

    def __call__(
        self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        kwargs.setdefault("compiler", "inductor")
        fw_module, bw_module = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        saved = saved_values(fw_module, kwargs["num_fwd_outputs"])
        self.report.add(
            "remat",
            RematStats(policy="none", saved_bytes=sum(tensor_bytes(n.meta["val"]) for n in saved)),
        )
        return fw_module, bw_module

    def uuid(self) -> str:
        return source_hash(RematPartitioner, extra=self.options.cache_key())
