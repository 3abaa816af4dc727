"""Admission control of ``diffgrpo.reward_server``: its limits, the byte budget, the token, memory.

Why: a server that reads whatever its peers send can be made to hold any amount of memory, any
number of sockets and threads. ``ServerLimits`` bounds each (connections, read time, body size,
bytes in flight, reward calls); ``ByteBudget`` admits a body before it is read; ``read_token``
loads the shared secret; ``MALLOC_TRIM`` keeps the freed bodies from staying resident.
See ``docs/remote_rewards.md`` for what each limit does and its default.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffgrpo.remote_reward import TOKEN_ENV


@dataclass(frozen=True)
class ServerLimits:
    """What the server's peers may hold at once; each field is also a CLI flag (``--max-connections``, ...)."""

    max_concurrent_calls: int = field(default=1, metadata={"help": "reward calls running at once (1: safe for "
                                                                   "a model on one GPU)"})
    max_connections: int = field(default=64, metadata={"help": "connections open at once; one more is "
                                                               "answered 503 and closed"})
    max_request_bytes: int = field(default=2**30, metadata={"help": "largest request body in bytes (413 above)"})
    max_bytes_in_flight: int = field(default=2**30, metadata={
        "help": "request bodies held at once (being read, scored or waiting), in bytes; the server's memory "
                "for them is about twice this"})
    read_timeout_s: float = field(default=30.0, metadata={"help": "seconds a client may send nothing before "
                                                                  "it is dropped"})
    queue_timeout_s: float = field(default=60.0, metadata={
        "help": "seconds a request waits for room in max_bytes_in_flight before a 503"})

    def __post_init__(self) -> None:
        counts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.type == "int"}
        bad = {k: v for k, v in counts.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"server limits {bad} must be integers >= 1")
        for name in ("read_timeout_s", "queue_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ValueError(f"{name}={value!r} must be a finite number of seconds > 0")
        if self.max_request_bytes > self.max_bytes_in_flight:
            raise ValueError(f"max_request_bytes={self.max_request_bytes} exceeds max_bytes_in_flight="
                             f"{self.max_bytes_in_flight}: such a request could never be admitted; raise "
                             "max_bytes_in_flight or lower max_request_bytes")


DEFAULT_LIMITS = ServerLimits()
"""The limits ``serve``, ``serve_in_background`` and the command line use unless told otherwise."""


class ByteBudget:
    """Bytes of request bodies admitted at once, granted in arrival order (a large body is not starved)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0  # the most bytes ever admitted at once (the load test reads it)
        self._waiting: deque[object] = deque()
        self._changed = threading.Condition()

    def acquire(self, size: int, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for ``size`` bytes after every earlier request; False if they never came."""
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            try:
                admitted = self._changed.wait_for(
                    lambda: self._waiting[0] is ticket and self.used + size <= self.capacity, timeout_s)
                if admitted:
                    self.used += size
                    self.peak = max(self.peak, self.used)
                return admitted
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()

    def release(self, size: int) -> None:
        with self._changed:
            self.used -= size
            self._changed.notify_all()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)


TRIM_AFTER_BYTES = 2**20
"""After a body of at least this size, freed heap pages go back to the operating system (MALLOC_TRIM)."""


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on other C libraries.

    Why: glibc raises its mmap threshold to the size of the first large block freed, so later
    bodies come from the heap of the handler thread's arena, which keeps them resident once freed;
    the server's memory then grows with the number of arenas that ever held a body, not with the
    bodies in flight. Trimming after each large body keeps it flat (docs/remote_rewards.md).
    """
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


MALLOC_TRIM = _malloc_trim()


def read_token(token_file: Path | None) -> str | None:
    """The server's token: from ``token_file`` (surrounding whitespace stripped), else from the
    environment variable ``DIFFGRPO_REWARD_TOKEN``, else None (no token). Never from a flag's value,
    which other users of the machine can read in the process list."""
    from_env = os.environ.get(TOKEN_ENV)
    if token_file is None:
        return from_env or None
    if from_env:
        raise SystemExit(f"both --token-file and {TOKEN_ENV} are set; keep one")
    token = Path(token_file).read_text().strip()
    if not token:
        raise SystemExit(f"--token-file {token_file} is empty; write the token into it, e.g. "
                         "python -c 'import secrets; print(secrets.token_hex(32))'")
    return token
