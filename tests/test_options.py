"""Options: parsing, validation and the errors a user sees."""

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
