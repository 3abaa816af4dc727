"""A module in evaluation mode for one block, its training flag restored after.

Why: sampling, scoring, probing and evaluating all need the network in ``eval()`` (no dropout noise) and
must hand it back in the mode they found it (the training loop may be mid-update); one context manager
keeps that rule, exceptions included, instead of a hand-written save-and-restore at each site.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside the block; afterwards (also on an exception) ``module.train(previous)``, which
    sets the flag of ``module`` and all its submodules back to the one ``module`` had on entry."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
