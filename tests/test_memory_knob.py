"""The one memory knob (issue 21): `memory_budget` alone decides the options left at "budget"
(`offload`, `mlp_chunks`, `logits`; lowmem_compile/knob.py) on a model prepared by `prepare_`.

Each expectation is measured against plans of the same model with the options set by hand (the
lean recipe, the fastest options), never against the knob's own figures. The models are tiny but
the step is long (4096 tokens, planned with fake tensors): the MLP goes in pieces of ~2048 tokens
and only values of 1 MiB or more are parked, as at full size.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import lowmem_compile
from lowmem_compile import knob
from lowmem_compile.report import gib

from .models import batch, rel_err, tiny_model, trainable_grads, twin

#: The hand-set lean recipe's options (README's "Long sequences in little memory"), less its budget.
LEAN = {"offload": "parked", "logits": "drop", "mlp_chunks": "auto"}
#: What those options are without a budget to meet: the fastest plan.
FASTEST = {"offload": "off", "logits": "keep", "mlp_chunks": "off"}
SEQ = 4096


def _prepared(vocab: int = 256, layers: int = 4, frames: bool = False):
    """NF4 frozen linears, use_cache off (embeddings stay: the model is on the CPU); captured whole
    unless `frames` (prepare_'s default)."""
    model = tiny_model("llama", hidden_size=128, intermediate_size=512, num_hidden_layers=layers, vocab_size=vocab)
    lowmem_compile.prepare_(model, layer_frames=frames)
    return model


def _plan(model, inputs, options):
    """plan()'s report as a dict, its printed table, and the messages of what it warned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = lowmem_compile.plan(model, **inputs, options={"inner": "eager", **options})
    return report.to_dict(), str(report), [str(w.message) for w in caught if "lowmem" in str(w.message)]


def _state(model) -> int:
    """An Adam optimizer's state for the model's trainable parameters: two values each."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _asked(model, planned: int) -> int:
    """The `memory_budget` under which the knob plans the compiled step for `planned` bytes or a
    byte over: it sets aside the optimizer's state and MODEL_ERROR of the budget (knob.py)."""
    return math.ceil((planned + _state(model)) / (1 - knob.MODEL_ERROR))


def _planned(model, asked: int) -> int:
    return asked - _state(model) - int(knob.MODEL_ERROR * asked)


_PEAKS: dict[str, int] = {}


def _peak(model, inputs, options):
    """The predicted peak of `options` set by hand (memoized by the model's shape, the inputs' and
    the thresholds: several tests plan the same baselines)."""
    from lowmem_compile.passes import chunk_mlp, offload

    config = model.config
    key = repr((config.vocab_size, config.num_hidden_layers, inputs["input_ids"].shape, sorted(options.items()),
                chunk_mlp.AUTO_TOKENS_PER_CHUNK, offload.MIN_BYTES))
    if key not in _PEAKS:
        _PEAKS[key] = _plan(model, inputs, options)[0]["remat"]["predicted_peak_bytes"]
    return _PEAKS[key]


def test_budget_between_lean_and_default_reaches_the_lean_plan():
    """A budget 3% over the lean recipe's lowest plan, which recomputation alone cannot meet: the knob
    parks and splits the MLP, keeps the logits (they weigh little here), fits, and lands within 5%
    of the lean options' prediction; the report says what it chose and why."""
    model, inputs = _prepared(), batch(size=1, seq=SEQ)
    default = _peak(model, inputs, {})
    lean = _peak(model, inputs, {**LEAN, "memory_budget": 1})  # infeasible: the lowest plan of those options
    alone = _peak(model, inputs, {**FASTEST, "memory_budget": 1})  # the budget alone, before the knob
    budget = int(lean * 1.03)
    assert lean < budget < alone < default

    asked = _asked(model, budget)
    report, table, warned = _plan(model, inputs, {"memory_budget": asked})
    remat = report["remat"]
    assert remat["budget_bytes"] == _planned(model, asked) and 0 <= remat["budget_bytes"] - budget <= 2
    assert remat["predicted_peak_bytes"] <= remat["budget_bytes"]
    assert remat["knob_notes"][0].startswith(f"budget {gib(asked)} for the step: {gib(_state(model))} set aside")
    assert abs(remat["predicted_peak_bytes"] - lean) <= 0.05 * lean
    assert remat["offloaded_bytes"] > 0 and report["mlp"]["chunked"] > 0
    assert remat["knob"] == {"offload": "parked", "mlp_chunks": "auto", "logits": "keep"}
    assert warned == []
    assert "memory knob chose         offload=parked, mlp_chunks=auto, logits=keep" in table
    assert any(n.startswith("offload=parked: chosen: budget ") and "without parking" in n for n in remat["knob_notes"])
    assert "[knob] mlp_chunks=auto: chosen" in table


def test_generous_budget_keeps_the_fastest_plan():
    """A budget the fastest plan fits: nothing parked, no pieces, logits returned, and the same
    predicted peak as those options set by hand under that budget."""
    model, inputs = _prepared(), batch(size=1, seq=SEQ)
    budget = 4 * _peak(model, inputs, {})
    fastest = _peak(model, inputs, {**FASTEST, "memory_budget": budget})
    report, _, warned = _plan(model, inputs, {"memory_budget": budget})
    assert report["remat"]["predicted_peak_bytes"] == fastest
    assert report["remat"]["offloaded_bytes"] == 0 and report["mlp"]["chunked"] == 0
    assert report["remat"]["knob"] == FASTEST and warned == []

    lowmem_compile.reset()
    small = batch(size=1, seq=64)
    out = torch.compile(model, backend="lowmem", options={"inner": "eager", "memory_budget": budget})(**small)
    out.loss.backward()
    assert out.logits is not None and out.logits.shape == (1, 64, 256)


def test_no_budget_decides_nothing():
    model, inputs = _prepared(), batch(size=1, seq=SEQ)
    report, _, _ = _plan(model, inputs, {})
    assert report["remat"]["knob"] is None and report["mlp"]["chunked"] == 0
    assert report["remat"]["predicted_peak_bytes"] == _peak(model, inputs, FASTEST)


@pytest.fixture
def short_steps(monkeypatch):
    """Steps run for real at 256 tokens with the thresholds scaled down as the step is (pieces of
    128 tokens, values of 64 KiB or more parked), so that the knob's choices are made and run fast."""
    from lowmem_compile.passes import chunk_mlp, offload

    monkeypatch.setattr(chunk_mlp, "AUTO_TOKENS_PER_CHUNK", 128)
    monkeypatch.setattr(offload, "MIN_BYTES", 64 * 1024)
    return 256


def _compiled_and_eager(model, inputs, options):
    """One step compiled (inner eager, kv16) and one eager on a twin: (compiled outputs, eager
    outputs, the report, the messages of what the compiled step warned)."""
    reference = twin(model)
    expected = reference(**inputs)
    expected.loss.backward()
    lowmem_compile.reset()
    compiled = torch.compile(model, backend="lowmem", options={"inner": "eager", "attention": "kv16", **options})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled(**inputs)
        got.loss.backward()
    assert rel_err(got.loss, expected.loss) < 1e-5
    grads, ref_grads = trainable_grads(model), trainable_grads(reference)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name
    return got, expected, lowmem_compile.last_report().to_dict(), [str(w.message) for w in caught]


@pytest.mark.parametrize("framed", [False, True])
def test_budget_needing_the_logits_drop_warns_and_matches_eager(short_steps, framed):
    """A large vocabulary: no plan that returns the logits meets the budget. The knob parks and drops
    them, says so loudly, `outputs.logits` is None, and the loss and every LoRA gradient match
    eager (kv16). With a frame per layer the same joint choice: the layers, planned before the
    tail is seen, count it by estimate (layer_frames.tail_estimate)."""
    vocab = 4096
    model, inputs = _prepared(vocab, frames=framed), batch(vocab=vocab, size=1, seq=short_steps)
    kv16 = {"attention": "kv16"}
    lean = _peak(model, inputs, {**kv16, **LEAN, "memory_budget": 1})
    kept = _peak(model, inputs, {**kv16, **LEAN, "logits": "keep", "memory_budget": 1})
    budget = int(lean * 1.02)
    assert budget < kept  # what is over is the logits' own bytes

    got, _, report, warned = _compiled_and_eager(model, inputs, {"memory_budget": _asked(model, budget)})
    assert got.logits is None
    assert any("logits are dropped" in w and "outputs.logits is None" in w for w in warned)
    remat = report["remat"]
    assert remat["knob"] == {"offload": "parked", "mlp_chunks": "off", "logits": "drop"}
    assert remat["offloaded_bytes"] > 0 and remat["predicted_peak_bytes"] <= budget + 2
    assert not any("infeasible" in w for w in warned)
    assert report["layers"]["bodies"] == 1 and (report["layers"]["run_as_fx"] > 0) == framed


def test_knob_chosen_pieces_match_eager(short_steps):
    """A budget only the MLP in pieces meets (the logits weigh little here): the step runs in pieces,
    with the loss, the logits and every LoRA gradient as eager's (kv16)."""
    model, inputs = _prepared(), batch(size=1, seq=short_steps)
    kv16 = {"attention": "kv16"}
    lean = _peak(model, inputs, {**kv16, **LEAN, "memory_budget": 1})
    alone = _peak(model, inputs, {**kv16, **FASTEST, "memory_budget": 1})
    budget = int(lean * 1.03)
    assert budget < alone

    got, expected, report, warned = _compiled_and_eager(model, inputs, {"memory_budget": _asked(model, budget)})
    assert report["mlp"]["chunked"] > 0 and report["remat"]["predicted_peak_bytes"] <= budget + 2
    assert report["remat"]["knob"]["mlp_chunks"] == "auto" and report["remat"]["knob"]["logits"] == "keep"
    assert got.logits is not None and rel_err(got.logits, expected.logits) < 1e-4
    assert not any("logits are dropped" in w or "infeasible" in w for w in warned)


def test_options_set_by_the_user_are_kept():
    """Under a budget only the lean recipe meets, `offload="off"` and `logits="keep"` stay as set: the
    knob may only split the MLP (the same plan as those three set by hand), and warns of no drop.
    Under a generous one, `mlp_chunks=2` and `logits="drop"` set by hand stay too."""
    model, inputs = _prepared(), batch(size=1, seq=SEQ)
    lean = _peak(model, inputs, {**LEAN, "memory_budget": 1})
    budget = int(lean * 1.03)
    user = {"offload": "off", "logits": "keep", "memory_budget": _asked(model, budget)}
    by_hand = _peak(model, inputs, {**user, "mlp_chunks": "auto", "memory_budget": _planned(model, user["memory_budget"])})
    report, _, warned = _plan(model, inputs, user)
    assert report["remat"]["predicted_peak_bytes"] == by_hand
    assert report["remat"]["offloaded_bytes"] == 0 and report["mlp"]["chunked"] > 0
    assert report["remat"]["knob"] == {"mlp_chunks": "auto"}
    assert not any("logits are dropped" in w for w in warned)

    lowmem_compile.reset()
    small = batch(size=1, seq=64)
    options = {"inner": "eager", "mlp_chunks": 2, "logits": "drop", "memory_budget": 10**12}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="lowmem", options=options)(**small)
    out.loss.backward()
    mlp = lowmem_compile.last_report().to_dict()["mlp"]
    assert out.logits is None and mlp["chunked"] > 0 and mlp["chunks"] == 2
    assert not any("logits are dropped" in str(w.message) for w in caught)  # the user's own choice: no alarm


def test_impossible_budget_gives_the_closest_plan_and_a_warning():
    vocab = 4096
    model, inputs = _prepared(vocab), batch(vocab=vocab, size=1, seq=SEQ)
    lean = _peak(model, inputs, {**LEAN, "memory_budget": 1})
    report, table, warned = _plan(model, inputs, {"memory_budget": 1})
    assert any("infeasible" in w for w in warned) and any("logits are dropped" in w for w in warned)
    assert abs(report["remat"]["predicted_peak_bytes"] - lean) <= 0.05 * lean
    assert "[knob] no option set fits" in table


def test_evaluation_without_grad_keeps_the_logits():
    """No backward, nothing to plan: a tight budget leaves an evaluation step's logits alone."""
    model = _prepared()
    small = batch(size=1, seq=64)
    lowmem_compile.reset()
    compiled = torch.compile(model, backend="lowmem", options={"inner": "eager", "memory_budget": 1})
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(**small)
    assert out.logits is not None and out.logits.shape == (1, 64, 256)
    assert not any("logits are dropped" in str(w.message) for w in caught)


def test_budget_default_is_validated():
    with pytest.raises(ValueError, match="offload='budgets'.*'budget'"):
        lowmem_compile.Options.from_user({"offload": "budgets"})
    with pytest.raises(ValueError, match="mlp_chunks='Budget'.*'budget'"):
        lowmem_compile.Options.from_user({"mlp_chunks": "Budget"})
    assert lowmem_compile.Options(memory_budget=1).without_knob().left_to_budget() == ()


def test_an_option_that_fails_to_plan_is_left_out(monkeypatch):
    """An option the user did not ask for must not break the compile: if planning with it raises,
    the knob goes on without it and says why."""
    from lowmem_compile.passes.chunk_mlp import ChunkMLPPass

    def broken(self, gm, ctx):
        raise RuntimeError("pieces broke")

    monkeypatch.setattr(ChunkMLPPass, "__call__", broken)
    model, inputs = _prepared(), batch(size=1, seq=SEQ)
    report, table, _ = _plan(model, inputs, {"memory_budget": 1})
    assert report["remat"]["knob"]["mlp_chunks"] == "off" and report["mlp"]["chunked"] == 0
    assert "[knob] mlp_chunks=auto: left out, planning with it failed: RuntimeError: pieces broke" in table


def test_the_knobs_trials_reuse_the_same_splits_and_plan_as_without(monkeypatch):
    """The knob plans one joint graph under several option sets, and the planner tries the same
    tags under each: a split already made is reused (passes/remat.py, `_min_cut`). Reusing changes
    nothing: the same options chosen, the same predicted peak and the same notes as with every split
    made afresh, and fewer splits made."""
    from lowmem_compile.passes import remat

    model, inputs = _prepared(), batch(size=1, seq=SEQ)
    lean = _peak(model, inputs, {**LEAN, "memory_budget": 1})
    options = {"memory_budget": _asked(model, int(lean * 1.03))}
    cut, made = remat.min_cut_rematerialization_partition, []
    monkeypatch.setattr(remat, "min_cut_rematerialization_partition", lambda *a, **k: (made.append(1), cut(*a, **k))[1])
    partition, asked = remat._Planner.partition, []
    monkeypatch.setattr(remat._Planner, "partition", lambda self, *a: (asked.append(1), partition(self, *a))[1])
    runs = {}
    for kept in (0, remat.PARTITIONS_KEPT):
        monkeypatch.setattr(remat, "PARTITIONS_KEPT", kept)
        remat._PARTITIONS.clear()
        made.clear()
        asked.clear()
        report = _plan(model, inputs, options)[0]["remat"]
        runs[kept] = (report, len(made), len(asked))
    (fresh, fresh_made, fresh_asked), (reused, reused_made, reused_asked) = runs[0], runs[remat.PARTITIONS_KEPT]
    assert fresh_made == fresh_asked == reused_asked
    assert reused_made < fresh_made
    for field in ("knob", "knob_notes", "predicted_peak_bytes", "offloaded_bytes", "recomputed", "notes"):
        assert reused[field] == fresh[field], field


def test_an_option_that_took_off_far_more_than_the_room_is_kept_without_planning_the_step_without_it(monkeypatch):
    """Taking back an option set before the last costs one more plan of the step (seconds of the first
    step); when the option took off more than PRUNE_MARGIN times the fitting plan's room, that plan
    is not made: the same options and predicted peak as when every such plan is made, fewer plans,
    and a note for each one not made."""
    model, inputs = _prepared(), batch(size=1, seq=SEQ)
    lean = _peak(model, inputs, {**LEAN, "memory_budget": 1})
    options = {"memory_budget": _asked(model, int(lean * 1.005))}  # parking takes off ~3% here: over twice the room
    plan, planned = knob._plan, []
    monkeypatch.setattr(knob, "_plan", lambda *a: (planned.append(1), plan(*a))[1])
    runs = {}
    for margin in (math.inf, knob.PRUNE_MARGIN):
        monkeypatch.setattr(knob, "PRUNE_MARGIN", margin)
        planned.clear()
        runs[margin] = (_plan(model, inputs, options)[0]["remat"], len(planned))
    (every, every_n), (fewer, fewer_n) = runs[math.inf], runs[knob.PRUNE_MARGIN]
    assert fewer["knob"] == every["knob"] and fewer["predicted_peak_bytes"] == every["predicted_peak_bytes"]
    kept = [n for n in fewer["knob_notes"] if "kept without planning the step without it" in n]
    assert not any("kept without planning" in n for n in every["knob_notes"])
    assert len(kept) == every_n - fewer_n > 0
