"""Suite-wide fixtures.

The jaxtyping import hook (pyproject addopts: --jaxtyping-packages) checks every annotated call
into diffgrpo/ and tasks/. A test that feeds deliberately wrong shapes or values to exercise the
library's own ValueError messages (what a user sees: the hook is test-only) would hit the
annotation check first, so it is marked ``unchecked_annotations`` and runs with the check off.
"""

from __future__ import annotations

from collections.abc import Iterator

import jaxtyping
import pytest


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
