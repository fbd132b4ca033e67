"""Two CPU processes over gloo (tests/distributed_workers.py) against one process, fp32, exact attention:

- FSDP2: `fully_shard` on each decoder layer and the root of a tiny NF4 Llama with LoRA, then
  `torch.compile(backend="lowmem")`. The NF4 codes and absmax are sharded (each rank holds half,
  within FSDP2's padding to a multiple of the ranks) and gathered bit for bit; no more than two layer
  units are gathered at once; loss and LoRA gradients equal one process's on the whole batch (1e-5);
  the adapters saved from the sharded model after an AdamW step give one process the sharded run's
  next loss; the report says what is sharded.
- DDP: the reducer holds the LoRA weights only; loss and gradients equal one process's.

Each spawn of two ranks compiles the model in both (Dynamo per layer, `inner="eager"`): ~25-35 s on
two shared cores.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests import distributed_workers as w

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TOL = 1e-5


def _run(worker, tmp_path_factory, name: str) -> list[dict]:
    out = str(tmp_path_factory.mktemp(name))
    w.spawn(worker, out)
    results = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    for r in results:
        assert "error" not in r, r.get("error")
    for r in results:
        r["out"] = out
    return results


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return _run(w.fsdp_worker, tmp_path_factory, "fsdp")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _run(w.ddp_worker, tmp_path_factory, "ddp")


def _reference(batch: dict, model=None):
    """One process, eager, the whole batch: loss and LoRA gradients."""
    model = w.build() if model is None else model
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _max_rel(got: dict, want: dict) -> tuple[float, str]:
    assert got.keys() == want.keys() and want
    errs = {n: ((got[n] - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-30)).item() for n in want}
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def test_fsdp_shards_the_nf4_bytes(fsdp):
    for r in fsdp:
        assert r["gathered_equal"]  # the all-gathered codes and absmax are the unsharded ones, bit for bit
        whole, local = sum(r["nf4_whole"].values()), sum(r["nf4_local"].values())
        assert set(r["nf4_whole"]) == set(r["nf4_local"]) and len(r["nf4_whole"]) == 2 * 7 * 2
        # each rank holds its half: FSDP2 pads dim 0 to a multiple of the ranks (< 1 element a tensor)
        assert whole / 2 - len(r["nf4_whole"]) <= local <= whole / 2 + len(r["nf4_whole"]), (local, whole)
    assert sum(sum(r["nf4_local"].values()) for r in fsdp) == sum(fsdp[0]["nf4_whole"].values())
    stats = fsdp[0]["stats"]
    assert stats.ranks == 2 and stats.units == 3  # two layers and the root
    assert stats.nf4_local_bytes <= stats.nf4_bytes / 2 + 2 * 7 * 2
    assert stats.trainable_local_bytes <= stats.trainable_bytes / 2 + 4 * 2 * 7 * 2 * 2


def test_expected_sharding_is_what_fully_shard_leaves(fsdp):
    # computed on the unsharded model for 2 ranks, against what rank 0 holds once fully_shard ran
    assert fsdp[0]["expected"] == fsdp[0]["stats"]


def test_fsdp_gathers_a_layer_at_a_time(fsdp):
    r = fsdp[0]
    layers = [u for u in r["units"] if u]
    assert len(layers) == 2 and all(".layers." in u for u in layers), r["units"]
    assert r["max_gathered_forward"] == 1  # the forward gathers one layer, frees it, gathers the next
    assert r["max_gathered"] <= 2  # the backward may prefetch the next (FSDP2's default)


def test_fsdp_loss_and_lora_grads_equal_one_process(fsdp):
    b1, _ = w.batches()
    loss, grads = _reference(b1)
    assert abs(fsdp[0]["loss1"] - loss) <= TOL * abs(loss)
    err, name = _max_rel(fsdp[0]["grads"], grads)
    assert err <= TOL, (name, err)
    assert len(grads) == 2 * 7 * 2
    for r in fsdp:
        assert r["frozen_grads"] == []
        # the LoRA weights and their AdamW state are sharded too
        assert sum(r["trainable_local"].values()) <= sum(g.numel() for g in grads.values()) / 2 + len(grads)
        assert 0 < r["optimizer_state_local"] <= sum(g.numel() for g in grads.values()) + 2 * len(grads)


def test_fsdp_adapters_load_into_one_process(fsdp):
    import peft

    from tests.models import tiny_model

    torch.manual_seed(1234)
    base = tiny_model("llama", lora=False, num_hidden_layers=2)
    model = peft.PeftModel.from_pretrained(base, os.path.join(fsdp[0]["out"], "adapters"))
    import lowmem_compile

    lowmem_compile.quantize_(model)
    _, b2 = w.batches()
    with torch.no_grad():
        loss = model(**b2).loss.item()
    # the adapters moved in the AdamW step (the saved ones are not the initial ones) ...
    fresh = w.build()
    with torch.no_grad():
        assert abs(fresh(**b2).loss.item() - loss) > 1e-4
    # ... and one process continues the sharded run's loss curve
    assert abs(fsdp[0]["loss2"] - loss) <= TOL * abs(loss), (fsdp[0]["loss2"], loss)


def test_fsdp_report_says_what_is_sharded(fsdp):
    shard = fsdp[0]["report"]["sharding"]
    assert shard is not None and shard["ranks"] == 2
    assert shard["nf4_local_bytes"] < shard["nf4_bytes"] and shard["trainable_local_bytes"] < shard["trainable_bytes"]
    assert shard["largest_unit_bytes"] > 0
    report = fsdp[0]["report"]
    assert report["nf4"]["lowered"] == 2 * 7  # the NF4 pass matched the gathered weights
    assert report["attention"]["replaced"] == 2


def test_ddp_reduces_only_lora_grads(ddp):
    b1, _ = w.batches()
    loss, grads = _reference(b1)
    for r in ddp:
        assert r["reducer_is_trainable"] and r["reducer_params"] == r["trainable"] == 2 * 7 * 2
        assert r["frozen_grads"] == []
        assert abs(r["loss1"] - loss) <= TOL * abs(loss)
        err, name = _max_rel(r["grads"], grads)
        assert err <= TOL, (name, err)


def test_predicted_rank_peak_divides_the_sharded_bytes():
    from lowmem_compile.distributed import predicted_rank_peak
    from lowmem_compile.report import ShardingStats

    gib = 2**30
    # Llama-3-70B-like: 35 GiB of sharded weights, 0.44 GiB a layer, 4 GiB root
    stats = ShardingStats(ranks=2, units=81, sharded_bytes=35 * gib, largest_unit_bytes=gib // 2, root_unit_bytes=0)
    one = 45 * gib
    two, four = predicted_rank_peak(one, stats, 2), predicted_rank_peak(one, stats, 4)
    assert two == one - 35 * gib + 35 * gib // 2 + gib
    assert four < two < one
    assert predicted_rank_peak(one, stats, 2, prefetch=0) == two - gib // 2
    assert predicted_rank_peak(one, stats, 1) == one


def test_expected_sharding_of_a_model_on_the_meta_device():
    import transformers

    from lowmem_compile.distributed import expected_sharding, predicted_rank_peak
    from tests.models import tiny_config

    config = tiny_config("llama", num_hidden_layers=4, hidden_size=128, intermediate_size=384, head_dim=32)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config).requires_grad_(False)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    peaks = []
    for world in (1, 2, 4, 8):
        s = expected_sharding(model, world)
        assert s.units == 5 and s.largest_unit_bytes == layer and s.root_unit_bytes == total - 4 * layer
        # rank 0's rows: ceil(rows / world) of every parameter, so at least 1/world of the bytes
        assert total / world <= s.other_local_bytes <= total / world + sum(
            p[0].numel() * p.element_size() for p in model.parameters()) and s.other_bytes == total
        peaks.append(predicted_rank_peak(10 * total, s, world))
    assert peaks[0] == 10 * total and peaks[1] > peaks[2] > peaks[3]


@pytest.mark.slow
def test_example_runs_under_torchrun(tmp_path):
    """examples/finetune_fsdp.py on 2 CPU ranks (gloo) for 3 steps, FSDP2: the loss falls and the
    saved adapters load into one process (~25 s unloaded)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={w.free_port()}",
           os.path.join(root, "examples", "finetune_fsdp.py"), "--steps", "3", "--seq", "64",
           "--lr", "1e-2", "--save", str(tmp_path / "adapters")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "2 ranks: NF4" in out and "sharded over ranks                  2" in out, out
    first, last = (float(x) for x in out.split("\nloss ")[1].split()[0:3:2])
    assert last < first, out
    assert (tmp_path / "adapters" / "adapter_config.json").exists()
    assert (tmp_path / "adapters" / "adapter_model.safetensors").exists()
