"""Command-line parsing of a recipe's frozen config, with deprecated flag spellings still accepted.

Why: config fields are public CLI API (``tyro`` turns them into flags). When a field moves, the old
spelling keeps working for a while: it is rewritten to the new one with a warning naming both. And an
error names the flag to change as the running recipe spells it: the core's checks say ``--grpo.X``,
which a recipe nesting the GRPO config under ``base`` spells ``--base.grpo.X`` (:func:`flags_spelled`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator, Mapping, Sequence

import tyro

logger = logging.getLogger(__name__)


def renamed_flags(args: Sequence[str], renamed: Mapping[str, str]) -> list[str]:
    """``args`` with every flag starting with an old prefix of ``renamed`` ({old: new}) spelled the new way.

    A flag is rewritten only at its start (``--grpo.sampler.eta`` -> ``--sampler.eta``), ``=VALUE``
    included; values and other flags are left as they are. Each rewrite is logged as a deprecation.
    """
    out = []
    for arg in args:
        for old, new in renamed.items():
            if arg.startswith(old):
                logger.warning("%s is deprecated; use %s", arg.split("=")[0], new + arg[len(old):].split("=")[0])
                arg = new + arg[len(old):]
                break
        out.append(arg)
    return out


def parse(config_type, *, renamed: Mapping[str, str] | None = None, args: Sequence[str] | None = None):
    """``tyro.cli(config_type)`` on ``args`` (default ``sys.argv[1:]``) after :func:`renamed_flags`."""
    args = list(sys.argv[1:] if args is None else args)
    return tyro.cli(config_type, args=renamed_flags(args, renamed or {}))


@contextlib.contextmanager
def flags_spelled(nesting: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a ValueError or KeyError from inside with its flags spelled as this recipe spells them.

    ``nesting`` maps a flag prefix as a component's own messages write it to the recipe's spelling, e.g.
    ``{"--grpo.": "--base.grpo.", "--task.": "--base.task."}`` for a recipe whose config nests the main
    job's as ``base``. The error keeps its type, and chains the original.
    """
    try:
        yield
    except (ValueError, KeyError) as error:
        message = str(error.args[0]) if len(error.args) == 1 else ""
        spelled = message
        for prefix, nested in nesting.items():
            spelled = re.sub(rf"(?<![\w.-]){re.escape(prefix)}", nested, spelled)
        if spelled == message:
            raise
        raise type(error)(spelled) from error
