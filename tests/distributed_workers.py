"""Worker processes for tests/test_distributed.py (a module of its own so that `torch.multiprocessing`
can start them by reference without importing pytest's test module): two CPU ranks over gloo, a tiny
NF4 Llama with LoRA, each rank on its half of the batch. Each writes what it saw to `out/rank<r>.pt`;
the test process compares it with one process's run of the same model."""

from __future__ import annotations

import os
import socket
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

OPTIONS = {"inner": "eager", "attention": "kv16"}
BATCH, SEQ = 4, 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, out: str, world: int = 2, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(worker, world, free_port(), out, *args), nprocs=world, join=True)


def _entry(rank, worker, world, port, out, *args):
    import torch.distributed as dist

    import torch._functorch.config
    import lowmem_compile  # noqa: F401  (registers the backend and the ops)

    torch.set_num_threads(1)
    torch._functorch.config.error_on_custom_op_aliasing = True
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = worker(rank, world, out, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(out, f"rank{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()


def build(lora: bool = True):
    """The tiny NF4 model every process builds alike (seeded): fp32, LoRA r=8 on every projection
    (B non-zero), frozen linears in NF4 (double quantization: uint8 absmax)."""
    import lowmem_compile
    from tests.models import tiny_model

    torch.manual_seed(1234)
    model = tiny_model("llama", lora=lora, num_hidden_layers=2)
    lowmem_compile.quantize_(model)
    return model


def batches(n: int = 2):
    from tests.models import batch

    return [batch(size=BATCH, seq=SEQ, seed=10 + i) for i in range(n)]


def half(b: dict, rank: int, world: int) -> dict:
    per = BATCH // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in b.items()}


def _nf4_state(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()
            if n.endswith((".weight_packed", ".weight_absmax"))}


def _mean(x: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _watch_unshards(events: list) -> None:
    """Log every FSDP2 param group's unshard / reshard (eager hooks: they run outside the graphs)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    unshard, reshard = FSDPParamGroup.unshard, FSDPParamGroup.reshard

    def on_unshard(self, *a, **k):
        events.append(("unshard", self._module_fqn))
        return unshard(self, *a, **k)

    def on_reshard(self, *a, **k):
        events.append(("reshard", self._module_fqn))
        return reshard(self, *a, **k)

    FSDPParamGroup.unshard, FSDPParamGroup.reshard = on_unshard, on_reshard


def _max_gathered(events: list, skip: str) -> int:
    """The most layer units (not `skip`, the root) unsharded at once."""
    live: set[str] = set()
    most = 0
    for what, fqn in events:
        if fqn == skip:
            continue
        (live.add if what == "unshard" else live.discard)(fqn)
        most = max(most, len(live))
    return most


def fsdp_worker(rank: int, world: int, out: str) -> dict:
    """fully_shard each decoder layer and the root, compile with lowmem, one AdamW step, save the
    adapters from the sharded model, then the next step's loss."""
    import lowmem_compile
    from lowmem_compile import distributed as ld
    from torch.distributed.tensor import DTensor

    lowmem_compile.reset()
    model = build()
    whole = _nf4_state(model)
    expected = ld.expected_sharding(model, world)
    ld.fully_shard_layers_(model)
    stats = ld.sharding_stats(model)
    params = dict(model.named_parameters())
    nf4_local = {n: params[n].to_local().numel() for n in whole}
    gathered_equal = all(isinstance(params[n], DTensor) and torch.equal(params[n].full_tensor(), t) for n, t in whole.items())

    events: list = []
    _watch_unshards(events)
    compiled = torch.compile(model, backend="lowmem", options=OPTIONS)
    b1, b2 = batches()
    loss1 = compiled(**half(b1, rank, world)).loss
    forward_events = list(events)
    loss1.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    trainable_local = {n: p.to_local().numel() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    opt.zero_grad()
    state_local = sum(v.to_local().numel() for s in opt.state.values() for v in s.values() if isinstance(v, DTensor))
    ld.save_adapters(model, os.path.join(out, "adapters"))
    with torch.no_grad():  # a forward only (eager: the grad mode would compile the graphs again)
        loss2 = model(**half(b2, rank, world)).loss
    return {
        "loss1": _mean(loss1.item()), "loss2": _mean(loss2.item()),
        "grads": grads if rank == 0 else None, "frozen_grads": frozen_grads,
        "nf4_whole": {n: t.numel() for n, t in whole.items()}, "nf4_local": nf4_local,
        "trainable_local": trainable_local, "optimizer_state_local": state_local,
        "gathered_equal": gathered_equal, "stats": stats, "expected": expected,
        "report": lowmem_compile.last_report().to_dict(),
        "max_gathered_forward": _max_gathered(forward_events, ""),
        "max_gathered": _max_gathered(events, ""),
        "units": sorted({fqn for _, fqn in events}),
    }


def ddp_worker(rank: int, world: int, out: str) -> dict:
    """DDP around the NF4 model, compiled with lowmem: the reducer holds the LoRA weights only."""
    import lowmem_compile
    from torch.nn.parallel import DistributedDataParallel as DDP

    lowmem_compile.reset()
    model = build()
    ddp = DDP(model)
    reducer_params, _ = ddp._build_params_for_reducer()
    trainable = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(ddp, backend="lowmem", options=OPTIONS)
    b1, _ = batches()
    loss = compiled(**half(b1, rank, world)).loss
    loss.backward()
    return {
        "loss1": _mean(loss.item()),
        "reducer_is_trainable": [id(p) for p in reducer_params] == [id(p) for p in trainable],
        "reducer_params": len(reducer_params), "trainable": len(trainable),
        "frozen_grads": [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
    }
