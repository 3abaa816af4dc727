"""Suite-wide fixtures.

The jaxtyping import hook (pyproject addopts: --jaxtyping-packages) checks every annotated call
into diffgrpo/ and tasks/. A test that feeds deliberately wrong shapes or values to exercise the
library's own ValueError messages (what a user sees: the hook is test-only) would hit the
annotation check first, so it is marked ``unchecked_annotations`` and runs with the check off.

The suite also runs on one torch thread (``_one_torch_thread``).
"""

from __future__ import annotations

from collections.abc import Iterator

import jaxtyping
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run the suite on one torch intra-op thread, then restore the count.

    Why: the suite's models are tiny and CI has 2 cores, often shared; two OpenMP threads that wait
    on each other made a perceptual training step ~10x slower and a TTO optimisation 12-58 s
    instead of ~1 s, so one thread is the fast setting for every test here.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _unchecked_annotations(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("unchecked_annotations") is None:
        yield
        return
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)
