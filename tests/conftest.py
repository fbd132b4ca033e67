"""Test setup: Triton's interpreter on machines without CUDA (set before anything imports Triton),
deterministic seeds, the `gpu` marker's skip, custom-op aliasing as an error everywhere (torch
makes it one only where the CI variable is set), and hypothesis' profiles.

Hypothesis: the `ci` profile (the default) is derandomized, so every run draws the same examples
and a failure in CI fails again on any machine with the same command; it prints the failing
example (unshrunk) and its `@reproduce_failure` blob. `HYPOTHESIS_PROFILE=explore` draws new examples each run
and keeps failures in `.hypothesis/` (replayed first by the next run) for hunting bugs locally."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

import lowmem_compile  # noqa: E402,F401

torch._functorch.config.error_on_custom_op_aliasing = True

#: Tests that set their own `max_examples` keep it; the rest draw this many. No shrinking in CI: a
#: failing example is reported as drawn (the same every run), instead of up to 5 minutes a test of
#: kernels in Triton's interpreter spent shrinking it; `explore` shrinks.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=20,
    deadline=None,
    print_blob=True,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", max_examples=100, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    """Each test starts with empty Dynamo caches, an empty report and a fixed seed, and compiles
    without AOTAutograd's on-disk cache (a test that inspects the partitioner must see it run even
    where an earlier test compiled the same graph; tests/test_compile_cache.py turns it back on)."""
    lowmem_compile.reset()
    torch.manual_seed(0)
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield
