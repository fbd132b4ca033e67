"""The token-chunked MLP pass on tiny LoRA models: loss and every trainable gradient equal eager
(fp32, so 1e-5 relative: reassociation only), at piece counts that do not divide the sequence,
with NF4 layers and under every remat policy; sites it must not split are reported, not split;
and under `remat="full"` the cost model predicts a lower peak with pieces than without."""

from __future__ import annotations

import pytest
import torch

import lowmem_compile
from lowmem_compile.options import Options
from lowmem_compile.passes.chunk_mlp import AUTO_MAX_PIECES, ChunkMLPPass

from .models import batch, rel_err, tiny_model, trainable_grads, twin

TOL = 1e-5
OTHER_PASSES_OFF = {"attention": "off", "fused_loss": "off"}


def _run(model, inputs, **options):
    lowmem_compile.reset()
    compiled = torch.compile(model, backend="lowmem", options={"inner": "eager", **OTHER_PASSES_OFF, **options})
    out = compiled(**inputs)
    out.loss.backward()
    return out, lowmem_compile.last_report().to_dict()


def _check(model, ref, out, ref_out):
    assert rel_err(out.loss, ref_out.loss) < TOL
    grads, ref_grads = trainable_grads(model), trainable_grads(ref)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < TOL, name


@pytest.mark.parametrize(
    "family,pieces,remat,seq",
    [("llama", 3, "none", 25), ("gemma", 4, "full", 23), ("qwen2", 2, "auto", 24), ("mistral", 5, "full", 7)],
)
def test_gradients_equal_eager(family, pieces, remat, seq):
    torch.manual_seed(0)
    model = tiny_model(family)
    ref = twin(model)
    inputs = batch(seq=seq, padding=True)
    ref_out = ref(**inputs)
    ref_out.loss.backward()
    out, report = _run(model, inputs, mlp_chunks=pieces, remat=remat)
    assert report["mlp"] == {"chunked": 2, "chunks": pieces, "skipped": []}
    _check(model, ref, out, ref_out)


def test_nf4_layers_and_auto_pieces():
    """Linears already in NF4 (`quantize_`) are split like any other; "auto" takes ~2048 tokens a
    piece, so 2 x 2100 tokens become 3 pieces."""
    torch.manual_seed(0)
    model = tiny_model("llama", max_position_embeddings=4096)
    lowmem_compile.quantize_(model)
    ref = twin(model)
    inputs = batch(size=2, seq=2100)
    ref_out = ref(**inputs)
    ref_out.loss.backward()
    out, report = _run(model, inputs, mlp_chunks="auto", nf4="auto")
    assert report["nf4"]["lowered"] > 0
    assert report["mlp"]["chunked"] == 2 and report["mlp"]["chunks"] == 3
    _check(model, ref, out, ref_out)


@pytest.mark.parametrize("tokens, pieces", [(4200, 3), (32768, 16), (65536, AUTO_MAX_PIECES), (131072, AUTO_MAX_PIECES)])
def test_auto_pieces_are_capped(tokens, pieces):
    """"auto" takes ~2048 tokens a piece up to AUTO_MAX_PIECES: each piece copies the block's nodes,
    and 64 copies of every MLP (131072 tokens) made a step too large to compile in minutes."""
    x = torch.fx.Graph().placeholder("x")
    x.meta["example_value"] = torch.empty(2, tokens // 2, 8, device="meta")
    assert AUTO_MAX_PIECES == 16 and ChunkMLPPass._pieces(x, "auto") == pieces
    assert ChunkMLPPass._pieces(x, 40) == 40  # an explicit count is the user's


def test_dropout_while_training_is_reported_not_split():
    """Pieces would draw other dropout masks than the whole block: the site stays whole."""
    import peft

    model = tiny_model("llama", lora=False)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=8, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.1)
    )
    model.train()
    _, report = _run(model, batch(), mlp_chunks=2)
    assert report["mlp"]["chunked"] == 0
    assert len(report["mlp"]["skipped"]) == 2 and all("dropout" in s for s in report["mlp"]["skipped"])


def test_pieces_lower_the_predicted_peak_under_full_recomputation():
    """The MLP's [tokens, intermediate] values dominate this model's backward; in 4 pieces they
    exist a quarter at a time."""
    model = tiny_model("llama", intermediate_size=1024)
    inputs = batch(size=1, seq=256)
    peaks = {}
    for pieces in ("off", 4):
        _, report = _run(twin(model), inputs, mlp_chunks=pieces, remat="full")
        peaks[pieces] = report["remat"]["predicted_peak_bytes"]
    assert peaks[4] < peaks["off"], peaks


@pytest.mark.parametrize("bad", [1, 0, True, "many", 2.5])
def test_bad_option_names_the_option(bad):
    with pytest.raises(ValueError, match="mlp_chunks"):
        Options.from_user({"mlp_chunks": bad})
