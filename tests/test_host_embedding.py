"""`offload_embeddings_`: frozen embedding tables in host memory give the same rows (exactly), the
same loss and gradients through the backend, and every table it must not move is reported with
its reason; on CUDA the table's bytes leave the device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem_compile import HostEmbedding, offload_embeddings_

from .models import batch, compiled_and_eager, rel_err, tiny_model, trainable_grads, twin


def test_rows_equal_the_original_lookup():
    torch.manual_seed(0)
    emb = nn.Embedding(97, 24).requires_grad_(False)
    holder = nn.Sequential(emb)
    ref = emb.weight.detach().clone()
    stats = offload_embeddings_(holder)
    assert stats["moved"] == ["0"] and isinstance(holder[0], HostEmbedding)
    ids = torch.randint(0, 97, (3, 11))
    assert torch.equal(holder(ids), ref[ids])
    assert torch.equal(holder(ids.int()), ref[ids])
    assert set(holder.state_dict()) == {"0.weight"}


def test_model_loss_and_gradients_equal_eager_through_the_backend():
    """Llama (untied head): the table moves; LoRA gradients and loss equal the original model's."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ref = twin(model)
    stats = offload_embeddings_(model)
    assert len(stats["moved"]) == 1 and "embed_tokens" in stats["moved"][0]
    out, ref_out, _ = compiled_and_eager(model, ref, batch(padding=True), {"inner": "eager", "attention": "off"})
    assert rel_err(out.loss, ref_out.loss) < 1e-5
    grads, ref_grads = trainable_grads(model), trainable_grads(ref)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-5, name


def test_tables_it_must_not_move_are_reported():
    tied = tiny_model("gemma")  # Gemma ties its head to the embedding (and scales the lookup)
    stats = offload_embeddings_(tied)
    assert stats["moved"] == [] and len(stats["skipped"]) == 1
    (reason,) = stats["skipped"].values()
    assert "tied" in reason

    trainable = nn.Sequential(nn.Embedding(10, 4), nn.Embedding(10, 4, max_norm=1.0).requires_grad_(False))
    stats = offload_embeddings_(trainable)
    assert stats["moved"] == [] and stats["skipped"] == {"0": "trainable", "1": "max_norm rewrites the table"}

    frozen = nn.Sequential(nn.Embedding(10, 4).requires_grad_(False), nn.Embedding(10, 4).requires_grad_(False))
    assert offload_embeddings_(frozen, exclude=["1"])["moved"] == ["0"]


class _Scaled(nn.Embedding):
    """A scaled embedding as Gemma writes it: the lookup times a 0-d `embed_scale` in the table's dtype."""

    def __init__(self, *args, scale=8.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_scale = nn.Buffer(torch.tensor(scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class _Shifted(_Scaled):
    def forward(self, ids):
        return super().forward(ids) + 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_embedding_rows_are_exact(dtype):
    """A lookup times embed_scale moves with its scale (√hidden, not a power of two: rounding shows),
    and gives the module's own rows bit for bit; a forward that does more stays, with its reason."""
    torch.manual_seed(0)
    emb = _Scaled(97, 24, padding_idx=0, scale=24**0.5, dtype=dtype).requires_grad_(False)
    ids = torch.randint(0, 97, (3, 11))
    want = emb(ids)
    holder = nn.Sequential(emb, _Shifted(10, 4).requires_grad_(False))
    stats = offload_embeddings_(holder)
    assert stats["moved"] == ["0"] and "forward is not its lookup times embed_scale" in stats["skipped"]["1"]
    assert torch.equal(holder[0](ids), want) and holder[0](ids).dtype == dtype
    assert set(holder[0].state_dict()) == {"weight"}


def test_untied_gemma_moves_and_matches_eager():
    """Gemma's scaled embedding, untied from the head: moved; loss and LoRA gradients as the original."""
    torch.manual_seed(0)
    model = tiny_model("gemma", tie_word_embeddings=False)
    ref = twin(model)
    stats = offload_embeddings_(model)
    assert len(stats["moved"]) == 1 and stats["skipped"] == {}
    out, ref_out, _ = compiled_and_eager(model, ref, batch(), {"inner": "eager", "attention": "off"})
    assert rel_err(out.loss, ref_out.loss) < 1e-5
    grads, ref_grads = trainable_grads(model), trainable_grads(ref)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-5, name


def test_bad_ids_name_the_problem():
    holder = nn.Sequential(nn.Embedding(10, 4).requires_grad_(False))
    offload_embeddings_(holder)
    with pytest.raises(ValueError, match="ids must be int32/int64"):
        holder(torch.zeros(3))


@pytest.mark.gpu
def test_cuda_table_leaves_the_device():
    torch.manual_seed(0)
    emb = nn.Embedding(50000, 512, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    holder = nn.Sequential(emb)
    ref = emb.weight.detach().clone()
    before = torch.cuda.memory_allocated()
    stats = offload_embeddings_(holder)
    del emb
    torch.cuda.synchronize()
    assert before - torch.cuda.memory_allocated() == stats["bytes"] == 50000 * 512 * 2
    assert holder[0].weight.is_pinned()
    ids = torch.randint(0, 50000, (2, 4096), device="cuda")
    out = torch.compile(holder, backend="lowmem")(ids)
    assert out.device.type == "cuda" and torch.equal(out, ref[ids])
