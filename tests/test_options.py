"""Options: parsing, validation and the errors a user sees; the README's table of options and
defaults; what the options promise end to end (report printing, budgets, reference ops)."""

import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lowmem_compile
from lowmem_compile import Options
from lowmem_compile.options import parse_memory_budget


@pytest.mark.parametrize(
    "text, expected",
    [("20GB", 20 * 10**9), ("18GiB", 18 * 2**30), ("512 MB", 512 * 10**6), ("1.5GiB", int(1.5 * 2**30)), ("4096", 4096)],
)
def test_budget_strings(text, expected):
    assert parse_memory_budget(text) == expected


def test_budget_fraction_and_bytes():
    assert Options.from_user({"memory_budget": 0.5}).budget_bytes(1000) == 500
    assert Options.from_user({"memory_budget": 123}).budget_bytes(None) == 123
    with pytest.raises(ValueError, match="fraction of device memory"):
        Options.from_user({"memory_budget": 0.5}).budget_bytes(None)


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"atention": "kv4"}, "unknown lowmem option"),
        ({"attention": "kv3"}, "attention='kv3'"),
        ({"inner": "tvm"}, "inner='tvm'"),
        ({"memory_budget": "lots"}, "memory_budget='lots'"),
        ({"memory_budget": -1}, "must be positive"),
        ({"memory_budget": 1.5}, "fraction"),
        ({"report": "yes"}, "report='yes'"),
        ({"cudagraphs": 1}, "cudagraphs=1"),
        ({"cudagraphs": True, "offload": "layers"}, "offload='layers'"),
        ({"cudagraphs": True, "inner": "eager"}, "inner='inductor'"),
    ],
)
def test_bad_options_name_the_problem(options, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        Options.from_user(options)


def test_bad_option_through_torch_compile():
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="lowmem", options={"remat": "sometimes"})
    with pytest.raises(Exception, match="remat='sometimes'"):
        compiled(torch.randn(2, 4))


def test_kv_bits():
    assert Options(attention="kv4").kv_bits == 4
    assert Options(attention="kv16").kv_bits == 16
    assert Options(attention="off").kv_bits is None
    assert lowmem_compile.Options is Options


def test_cudagraphs_skip_is_reported():
    """On the CPU Inductor refuses CUDA graphs: the report counts the request and says it was refused;
    without the option the section stays empty."""
    import lowmem_compile

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 8, requires_grad=True)
    for cudagraphs in (True, False):
        lowmem_compile.reset()
        torch.compile(model, backend="lowmem", options={"cudagraphs": cudagraphs})(x).sum().backward()
        section = lowmem_compile.last_report().to_dict()["cudagraphs"]
        if cudagraphs:
            assert section["requested"] == 1 and "will not replay 1 graph" in section["skipped"][0]
            assert "[cudagraphs]" in str(lowmem_compile.last_report())
        else:
            assert section == {"requested": 0, "skipped": []}


# --- the README's options table is the contract ----------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_options() -> dict[str, list[str]]:
    """key -> the backticked values of its row in the README's options table (default first)."""
    text = README.read_text()
    table = text[text.index("## Options"):text.index("A large model's compile")]
    rows = {}
    for line in table.splitlines():
        match = re.match(r"^\| `(\w+)` \| (.*?) \|", line)
        if match:
            rows[match.group(1)] = re.findall(r"`([^`]+)`", match.group(2))
    return rows


def test_defaults_are_the_readme_table():
    """`Options()` holds the first value of each row of the README's table, and the table lists
    every option: a default changed in the code, or an option added without its row, fails here."""
    rows = _readme_options()
    fields = {f.name: f for f in dataclasses.fields(Options)}
    assert rows.keys() == fields.keys()
    defaults = Options()
    for name, values in rows.items():
        assert getattr(defaults, name) == ast.literal_eval(values[0]), name
    assert Options.from_user(None) == Options.from_user({}) == defaults


def test_every_readme_value_is_accepted():
    """Each quoted value in a row is accepted as it stands (strings, numbers, booleans, sizes)."""
    for name, values in _readme_options().items():
        for text in values:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                continue  # prose such as `offload` inside the cudagraphs row
            expected = parse_memory_budget(value) if name == "memory_budget" else value
            assert getattr(Options.from_user({name: value}), name) == expected, (name, value)


@pytest.mark.parametrize(
    "name, bad",
    [("nf4", "on"), ("nf4", "nf4"), ("nf4_matmul", "dequant"), ("offload", "host"), ("offload", True),
     ("fused_loss", True), ("fused_loss", "auto"), ("logits", "none"), ("remat", "selective"), ("attention", 8),
     ("inner", None)],
)
def test_bad_choice_names_option_value_and_allowed(name, bad):
    """A bad value raises ValueError naming the option, the value and every allowed value."""
    with pytest.raises(ValueError) as info:
        Options.from_user({name: bad})
    message = str(info.value)
    assert f"{name}={bad!r}" in message
    for allowed in _readme_options()[name]:
        assert allowed in message.replace("'", '"'), (allowed, message)


def test_options_object_passes_through_and_other_types_raise():
    opts = Options(attention="kv4")
    assert Options.from_user(opts) is opts
    with pytest.raises(ValueError, match="must be a dict"):
        Options.from_user([("attention", "kv4")])


# --- report=False prints nothing; report=True prints the report -----------------------------------


def test_report_option_prints_only_when_asked(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 8, requires_grad=True)
    torch.compile(model, backend="lowmem", options={"inner": "eager"})(x).sum().backward()
    assert capsys.readouterr().out == ""
    lowmem_compile.reset()
    torch.compile(model, backend="lowmem", options={"inner": "eager", "report": True})(x).sum().backward()
    out = capsys.readouterr().out
    assert out.strip() and out.strip() == str(lowmem_compile.last_report()).strip()


# --- remat="auto" without a budget; a fractional budget ---------------------------------------------


def _tiny_step(options):
    from .models import batch, tiny_model

    lowmem_compile.reset()
    model = tiny_model("llama")
    torch.compile(model, backend="lowmem", options={"inner": "eager", **options})(**batch()).loss.backward()
    return lowmem_compile.last_report().to_dict()["remat"]


def test_auto_without_budget_on_cpu_keeps_the_stock_plan():
    """On the CPU, `remat="auto"` with no budget keeps the stock plan (`remat="none"`: what
    AOTAutograd's min-cut saves and recomputes) and only reports it."""
    auto, stock = _tiny_step({}), _tiny_step({"remat": "none"})
    assert auto["policy"] == "auto" and auto["budget_bytes"] is None
    assert auto["saved_bytes"] == stock["saved_bytes"] > 0 and auto["added_flops"] == stock["added_flops"] == 0
    for key in ("predicted_peak_bytes", "recomputed", "offloaded_bytes"):
        assert auto[key] == stock[key], key
    assert any("plan none of 1 evaluated" in note for note in auto["notes"])


class _FakeCuda:
    total, free, reserved = 80 * 2**30, 30 * 2**30, 6 * 2**30

    def __init__(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=self.total))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (self.free, self.total))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: self.reserved)


def test_auto_without_budget_fits_free_device_memory_less_10_percent(monkeypatch):
    """On an accelerator the budget is what the process could use (free + its own reserved cache)
    less 10%; a fraction is of the device's total memory; bytes are bytes."""
    from lowmem_compile.passes.remat import RematPartitioner
    from lowmem_compile.report import GraphReport

    cuda = _FakeCuda(monkeypatch)
    device = torch.device("cuda", 0)

    def budget(**options):
        return RematPartitioner(Options(**options), GraphReport(0, 0)).budget(device)[0]

    assert budget() == int(0.9 * (cuda.free + cuda.reserved))
    assert budget(memory_budget=0.25) == cuda.total // 4
    assert budget(memory_budget=parse_memory_budget("18GiB")) == 18 * 2**30


def test_fractional_budget_end_to_end():
    """A fraction of the machine's memory (the host's, on the CPU) is the peak the plan fits: set
    between the stock plan's and full recomputation's predicted peaks, it makes `auto` recompute."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    stock, full = _tiny_step({"remat": "none"}), _tiny_step({"remat": "full"})
    assert full["predicted_peak_bytes"] < stock["predicted_peak_bytes"]
    fraction = (stock["predicted_peak_bytes"] + full["predicted_peak_bytes"]) / 2 / host
    assert 0 < fraction < 1e-3
    # the knob's options set: the budget is the compiled step's own, not the whole step's (knob.py)
    fitted = _tiny_step({"memory_budget": fraction, "offload": "off", "mlp_chunks": "off", "logits": "keep"})
    assert fitted["budget_bytes"] == int(fraction * host)
    assert fitted["predicted_peak_bytes"] <= fitted["budget_bytes"] < stock["predicted_peak_bytes"]
    assert fitted["recomputed"] > 0


# --- LOWMEM_REFERENCE_OPS=1 --------------------------------------------------------------------------


@pytest.mark.parametrize("force", ["0", "1"])
def test_reference_ops_variable_unregisters_the_cuda_kernels(force):
    """With LOWMEM_REFERENCE_OPS=1 no op of ours has a CUDA kernel, so CUDA tensors dispatch to the
    reference implementation; without it every op that has Triton kernels registers them."""
    ops = ("nf4_linear", "nf4_linear_backward", "nf4_dequantize", "attention", "attention_backward",
           "linear_cross_entropy")
    code = ("import torch, lowmem_compile.ops\n"
            f"print([torch._C._dispatch_has_kernel_for_dispatch_key('lowmem::' + n, k) for n in {ops!r} "
            "for k in ('CUDA', 'CompositeExplicitAutograd')])")
    env = {**os.environ, "LOWMEM_REFERENCE_OPS": force}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    has = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert has[1::2] == [True] * len(ops)  # every reference
    assert has[0::2] == [force == "0"] * len(ops)
