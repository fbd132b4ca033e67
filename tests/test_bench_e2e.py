"""The side-by-side benchmark harness on the CPU: workers run, agree on the loss, fail into error rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowmem_compile
from bench import e2e

ROOT = Path(__file__).resolve().parents[1]


def _run_args(*argv: str):
    return e2e.parse_args(["--device", "cpu", "--model", "small", "--layers", "1", "--warmup", "1", "--steps", "1", *argv])


def test_the_triton_compile_timer_names_slow_compiles_and_sums_all(monkeypatch):
    """Compiles of 0.1 s and more are listed by kernel name; every compile counts in the sum."""
    import time
    import types

    import triton.compiler

    def fake_compile(src, target=None, options=None):
        time.sleep(src.seconds)
        return src.name

    monkeypatch.setattr(triton.compiler, "compile", fake_compile)
    counters = e2e._time_triton()
    slow, quick = types.SimpleNamespace(name="slow_kernel", seconds=0.15), types.SimpleNamespace(name="quick", seconds=0.01)
    assert triton.compiler.compile(slow) == "slow_kernel" and triton.compiler.compile(quick) == "quick"
    assert [name for name, _ in counters["jit_kernels"]] == ["slow_kernel"]
    assert 0.16 <= counters["triton_jit"] < 1.0
    assert e2e._time_triton()["triton_jit"] == 0.0  # reset for the next run, the wrapper kept


def test_cpu_harness_runs_two_configs_side_by_side(tmp_path):
    """Two workers train 2 steps from the same weights and data; checkpointing changes memory, not numbers."""
    cmd = [
        sys.executable, str(ROOT / "bench" / "e2e.py"), "--device", "cpu", "--model", "small", "--layers", "1",
        "--configs", "eager,eager_gc", "--seqs", "32", "--warmup", "1", "--steps", "1", "--gpus", "2",
        "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    assert [r["config"] for r in rows] == ["eager", "eager_gc"]
    eager, eager_gc = rows
    for row in rows:
        assert "error" not in row, row
        assert len(row["losses"]) == 2 and row["tokens_per_s"] > 0 and row["first_step_s"] > 0
        assert row["first_step_parts_s"]["triton_autotune"] >= 0  # eager: no Dynamo metric, Triton's timers only
        assert row["first_step_parts_s"]["triton_jit"] >= 0 and row["first_step_jit_kernels"] == []
        assert row["trainable_params"] == eager["trainable_params"] > 0
        assert row["losses"][1] < row["losses"][0], "one AdamW step on a repeated batch must lower the loss"
        assert torch.__version__.startswith(row["versions"]["torch"]) and row["date"] and row["seq"] == 32
    # Recomputation replays the same CPU ops: the losses agree to float rounding.
    assert eager_gc["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    table = (tmp_path / "e2e.md").read_text()
    assert "| eager | 32 |" in table and "| eager_gc | 32 |" in table
    assert {"e2e.jsonl", "e2e.md", "e2e.log"} <= {p.name for p in tmp_path.iterdir()}


def test_lowmem_worker_matches_eager():
    """The lowmem config (passes run, graphs executed as FX) starts from the eager loss and reports."""
    eager = e2e.run_worker(_run_args("--config", "eager", "--seqs", "32"))
    lowmem = e2e.run_worker(_run_args("--config", "lowmem", "--seqs", "32", "--lowmem-options", '{"inner": "eager"}'))
    assert "error" not in eager and "error" not in lowmem, (eager, lowmem)
    # Same weights and tokens; bf16 autocast in both, so the losses agree to ~1e-3 relative.
    assert lowmem["first_loss"] == pytest.approx(eager["first_loss"], rel=2e-3)
    assert lowmem["lowmem_options"] == {"inner": "eager"} and lowmem["lowmem_report"]["graphs"] >= 1


def test_no_head_trains_the_decoder_alone():
    """--no-head: the loss is the mean of the decoder's last hidden states (no LM head, no cross
    entropy), the same for eager and lowmem (bf16 autocast in both: 2e-2 relative), and the lowmem
    graph fuses no loss."""
    eager = e2e.run_worker(_run_args("--config", "eager", "--seqs", "32", "--no-head"))
    exact = '{"inner": "eager", "nf4": "off", "attention": "kv16"}'  # no quantization: the same function
    lowmem = e2e.run_worker(_run_args("--config", "lowmem", "--seqs", "32", "--no-head", "--lowmem-options", exact))
    assert "error" not in eager and "error" not in lowmem, (eager, lowmem)
    assert eager["no_head"] and abs(eager["first_loss"]) < 1.0  # a hidden-state mean, not a ~ln(vocab) loss
    assert lowmem["first_loss"] == pytest.approx(eager["first_loss"], rel=2e-2, abs=2e-3)
    assert lowmem["lowmem_report"]["loss"]["fused"] == 0


@pytest.mark.parametrize("config", ["bnb_qlora", "bnb_qlora_gc", "bnb_qlora_gc_liger", "unsloth", "lowmem_bnb"])
def test_peers_fail_cleanly_into_an_error_row_on_cpu(config):
    row = e2e.run_worker(_run_args("--config", config, "--seqs", "32"))
    assert row["config"] == config and "needs CUDA" in row["error"] and not row["oom"]


def test_builtin_lowmem_variants_are_valid_options():
    for options in e2e.LOWMEM_VARIANTS.values():
        lowmem_compile.Options.from_user(options)


def test_saved_folder_holds_the_same_model(tmp_path):
    """bnb and Unsloth load the folder; it must hold exactly the weights the in-memory configs build."""
    import transformers

    args = e2e.parse_args(["--model", "small", "--layers", "1", "--seqs", "64", "--device", "cpu", "--seed", "3"])
    e2e.save_model_folder(args, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    built = e2e.build_model(e2e.llama_config("small", 1, 64), "cpu", seed=3)
    built_state = built.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, built_state[name]), name
    assert loaded.config.rope_parameters["rope_theta"] == 10000.0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2


def test_llama3_8b_shape():
    config = e2e.llama_config("llama3-8b", None, 8192)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 128256)
    assert config.rope_parameters["rope_theta"] == 500000.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lowmem-options", '{"attention": "kv3"}'], "attention"),
        (["--lowmem", 'lowmem_x={"bogus": 1}'], "bogus"),
        (["--lowmem", "lowmem_x={not json"], "not JSON"),
        (["--lowmem", 'fast={"inner": "eager"}'], "starting with 'lowmem'"),
        (["--configs", "lowmem_y"], "has no options"),
    ],
)
def test_bad_lowmem_variants_are_rejected(argv, message):
    with pytest.raises(SystemExit, match=message):
        e2e.run_parent(e2e.parse_args(argv))


def test_unknown_config_is_rejected():
    with pytest.raises(ValueError, match="unknown configuration 'eagre'"):
        e2e.recipe_for("eagre")


def test_a_dead_worker_becomes_an_error_row():
    row = e2e.parse_result(-9, "noise\n", "loading\nKilled\n", timeout=60)
    assert "exited with code -9" in row["error"] and "Killed" in row["error"]
    assert "timed out after 60 s" in e2e.parse_result(None, "", "", timeout=60)["error"]
    good = e2e.parse_result(0, "banner\n" + e2e.RESULT_MARKER + '{"config": "eager", "seq": 8}\nbye\n', "", 60)
    assert good == {"config": "eager", "seq": 8}


def test_time_limit_turns_the_rest_into_error_rows(tmp_path):
    """A run that must end inside a fixed window kills the worker in flight and still writes every row."""
    cmd = [
        sys.executable, str(ROOT / "bench" / "e2e.py"), "--device", "cpu", "--model", "small",
        "--configs", "eager,eager_gc", "--seqs", "32", "--time-limit", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    assert [r["config"] for r in rows] == ["eager", "eager_gc"]
    assert "timed out" in rows[0]["error"] and rows[1]["error"] == "not run: --time-limit reached"


def _fake_rows():
    gib = 2**30
    return [
        {"config": "eager", "seq": 8, "peak_steps_bytes": 10 * gib, "tokens_per_s": 100.0, "last_loss": 11.5},
        {
            "config": "lowmem", "seq": 8, "peak_steps_bytes": 4 * gib, "tokens_per_s": 150.0, "last_loss": 11.5,
            "optimizer_state_bytes": int(0.6 * gib),
            "lowmem_report": {"remat": {"predicted_peak_bytes": 5 * gib, "predicted_peak_outputs_freed_bytes": 3 * gib}},
        },  # fmt: skip
        {"config": "unsloth", "seq": 8, "error": "ImportError: no module named unsloth"},
    ]


def test_table_compares_with_eager_at_the_same_length():
    args = e2e.parse_args(["--model", "small"])
    env = {"gpu": "GPU X", "python": "3.12", "versions": {"torch": "2.11"}, "date": "2026-01-01"}
    table = e2e.render_table(_fake_rows(), env, args)
    assert "| lowmem | 8 | 4.00 | 0.40x |  |  | 150.0 | 1.50x | 0.900 |" in table  # (3 + 0.6) / 4
    assert "ImportError: no module named unsloth" in table and "GPU X" in table and "torch 2.11" in table


def test_peak_memory_plot_is_a_png(tmp_path):
    """matplotlib is a test dependency (pyproject's `test` extra): no skip where it is missing."""
    import matplotlib  # noqa: F401

    from bench._common import grouped_bar_plot

    rows = _fake_rows()
    series = {"seq 8": {r["config"]: e2e._peak_or_error(r) for r in rows}}
    path = tmp_path / "plot.png"
    assert grouped_bar_plot([r["config"] for r in rows], series, path, "title", "GiB") is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cold_workers_compile_into_fresh_cache_folders(tmp_path):
    """`--cold`: each worker's Inductor and Triton caches are folders of its own, not the machine's."""
    args = _run_args("--cold")
    assert args.cold
    env = e2e.worker_env(args, 0, "eager", tmp_path / "caches_1")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "caches_1" / "inductor")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "caches_1" / "triton")
    shared = e2e.worker_env(args, 0, "eager")
    assert shared.get("TORCHINDUCTOR_CACHE_DIR") == os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def test_prepared_rows_train_the_model_prepare_moved(tmp_path):
    """`lowmem_prep*` rows load the saved folder onto the CPU and hand the model to `prepare_` (the
    user's journey, with `--cap-gib` on a GPU): the folder holds the built-in row's weights, so the
    losses agree, and the frozen linears arrive in NF4."""
    cmd = [
        sys.executable, str(ROOT / "bench" / "e2e.py"), "--device", "cpu", "--model", "small", "--layers", "1",
        "--configs", "lowmem_prep_eager,lowmem", "--lowmem", 'lowmem_prep_eager={"inner": "eager"}',
        "--lowmem-options", '{"inner": "eager"}', "--seqs", "32", "--warmup", "1", "--steps", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    prepared, built = [json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    assert "error" not in prepared and "error" not in built, (prepared.get("error"), built.get("error"))
    assert prepared["losses"] == pytest.approx(built["losses"], rel=1e-5)
    assert prepared["lowmem_report"]["nf4"]["lowered"] == built["lowmem_report"]["nf4"]["lowered"] > 0
