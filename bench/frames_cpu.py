"""The framed step (layer_frames.py) against the whole capture, on the CPU's planner and knob.

    python bench/frames_cpu.py

1. Predicted peak of a tiny 4-layer NF4 LoRA Llama (`full`, logits kept and dropped): the
   per-layer split of the whole capture against the framed step composed from its pieces.
2. The memory knob's case from tests/test_memory_knob.py where the whole step must park and drop
   the logits to meet its budget: what the knob chooses and predicts, whole and framed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def predicted_peaks() -> None:
    import torch

    import lowmem_compile
    from tests.models import batch, tiny_model, twin

    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=4, vocab_size=2048)
    lowmem_compile.quantize_(model)
    model.config.use_cache = False
    framed = twin(model)
    lowmem_compile.layer_frames_(framed)
    for logits in ("keep", "drop"):
        peaks = {}
        for name, m in (("split", model), ("framed", framed)):
            lowmem_compile.reset()
            options = {"inner": "eager", "attention": "kv16", "remat": "full", "logits": logits}
            torch.compile(m, backend="lowmem", options=options)(**batch(vocab=2048, seq=256)).loss.backward()
            peaks[name] = lowmem_compile.last_report().to_dict()["remat"]["predicted_peak_bytes"]
        print(f"full, logits {logits}: predicted peak split {peaks['split']} B, framed {peaks['framed']} B "
              f"({peaks['framed'] / peaks['split'] - 1:+.2%})", flush=True)


def knob_needing_the_logits_drop() -> None:
    import warnings

    import torch

    import lowmem_compile
    from lowmem_compile.passes import chunk_mlp, offload
    from tests import test_memory_knob as knob_tests
    from tests.models import batch

    chunk_mlp.AUTO_TOKENS_PER_CHUNK, offload.MIN_BYTES = 128, 64 * 1024  # the tests' `short_steps`
    vocab, seq = 4096, 256
    for framed in (False, True):
        model = knob_tests._prepared(vocab)
        if framed:
            lowmem_compile.layer_frames_(model)
        inputs = batch(vocab=vocab, size=1, seq=seq)
        lean = knob_tests._peak(model, inputs, {"attention": "kv16", **knob_tests.LEAN, "memory_budget": 1})
        budget = int(lean * 1.02)
        lowmem_compile.reset()
        options = {"inner": "eager", "attention": "kv16", "memory_budget": knob_tests._asked(model, budget)}
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            torch.compile(model, backend="lowmem", options=options)(**inputs).loss.backward()
        remat = lowmem_compile.last_report().to_dict()["remat"]
        print(f"{'framed' if framed else 'whole'}: knob {remat['knob']}, predicted {remat['predicted_peak_bytes']} B "
              f"for a {budget} B budget", flush=True)


if __name__ == "__main__":
    predicted_peaks()
    knob_needing_the_logits_drop()
