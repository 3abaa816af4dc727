"""A small reference server that serves any reward callable to ``diffgrpo.remote_reward``.

Why: a reward model that needs its own process, GPU, machine or Python environment runs behind
this server; the training run names it as reward ``remote`` with the server's URL. It is the
standard library's ``ThreadingHTTPServer``, enough for one training run, with bounds on what its
peers can hold (``ServerLimits``) and an optional shared-secret token; it has no TLS.

Run it with a registered reward (``--import`` the module that registers it):

    DIFFGRPO_REWARD_TOKEN=... python -m diffgrpo.reward_server --import tasks.text_to_image.rewards \\
        --reward jpeg_compressibility --param quality=90 --port 8000

or from Python, in a background thread (tests, notebooks):

    with serve_in_background(my_reward, name="aesthetic") as url:   # a free port on 127.0.0.1
        scores = get_reward("remote", url=url)(decoded, batch)

Protocol (version 1; ``diffgrpo.remote_reward`` holds its one implementation):

``GET /health`` -> 200, JSON ``{"status": "ok", "protocol": 1, "reward": "<name>"}``.

``POST /score`` with ``Content-Length`` and a body that is one safetensors file:
  - tensors ``samples`` (the samples are one tensor (N, ...)) or ``samples/<key>`` (a mapping,
    e.g. ``samples/images`` float (N, 3, H, W) in [0, 1]), and ``batch/<key>`` for batch tensors;
    every tensor has N >= 1 on its first axis, dtype as sent (float32 unless the client casts);
  - string metadata ``diffgrpo_protocol`` = "1", ``num_samples`` = "N", ``samples_layout`` =
    "tensor" or "mapping", ``batch_strings`` = JSON ``{"<key>": [N strings]}`` (e.g. prompts).
  The server calls ``reward(samples, batch)`` under ``torch.no_grad()``, ``batch`` holding the
  batch tensors and string lists by key, exactly as a local reward is called, and answers:
  - 200, JSON ``{"scores": [N numbers]}`` when the reward returns a tensor (N,), or
    ``{"scores": {"<name>": [N numbers], ...}}`` when it returns a mapping of them;
  - 400 ``{"error": ...}``: the body is not a protocol-1 request (no samples, bad metadata), a
    malformed ``Content-Length``, or the reward raised ValueError or KeyError (it rejects the
    input); 401 a missing or wrong token; 404 unknown route; 411 no ``Content-Length``; 413 a
    body over ``max_request_bytes``; clients do not retry any 4xx;
  - 500 ``{"error": ...}``: the reward raised anything else or returned something that is not a
    tensor (N,) or a mapping of them (the traceback goes to this server's log); 503: the server
    is busy (see the limits); clients retry 5xx.
  Scores are sent as computed, NaN included: the client validates length and finiteness.

Token: with ``token`` set, every request must carry ``Authorization: Bearer <token>``, compared in
constant time (``hmac.compare_digest``) before any body byte is read. The token travels in clear
text: it keeps other users of a trusted network out, not an eavesdropper.

Admission, in order, each step before the next reads anything (``ServerLimits``): a connection
slot (``max_connections`` open at once, else 503 at once); the request line and headers, each read
given ``read_timeout_s``; the token; ``Content-Length`` (ASCII digits, at most
``max_request_bytes``); room for the body in ``max_bytes_in_flight`` (bodies of requests being read,
scored or waiting, granted in arrival order; 503 after ``queue_timeout_s``); then the body is read
and decoded, and the request waits for one of ``max_concurrent_calls`` reward calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hmac
import importlib
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from diffgrpo.remote_reward import PROTOCOL_VERSION, TOKEN_ENV, check_token, decode_request, encode_response
from diffgrpo.reward_admission import (
    DEFAULT_LIMITS,
    MALLOC_TRIM,
    TRIM_AFTER_BYTES,
    ByteBudget,
    ServerLimits,
    read_token,
)
from diffgrpo.rewards import available_rewards, get_reward

logger = logging.getLogger(__name__)

RewardFn = Callable[[Any, Any], Any]
ROUTES = "routes: GET /health, POST /score"


class RewardHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` bound to one reward; ``port=0`` picks a free port (see ``url``).

    Raises ValueError for a token that cannot travel in an HTTP header (empty, spaces, non-ASCII).
    """

    daemon_threads = True  # a request still running at shutdown does not block the process's exit
    request_queue_size = 128  # the listen backlog: a burst of clients waits in the kernel, not refused

    def __init__(self, reward: RewardFn, *, name: str = "reward", host: str = "127.0.0.1", port: int = 8000,
                 limits: ServerLimits = DEFAULT_LIMITS, token: str | None = None) -> None:
        if token is not None:
            check_token(token)
        self.reward = reward
        self.name = name
        self.limits = limits
        self.token = token
        self.calls = threading.BoundedSemaphore(limits.max_concurrent_calls)
        self.connections = threading.BoundedSemaphore(limits.max_connections)
        self.budget = ByteBudget(limits.max_bytes_in_flight)
        self.open_connections = 0  # read by tests and logs; changed under _count_lock
        self._count_lock = threading.Lock()
        self._last_refusal_log = -float("inf")
        self._refused_since_log = 0
        self._out_of_descriptors = False
        super().__init__((host, port), _Handler)
        self._warn_about_exposure()
        self._warn_about_descriptors()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def _warn_about_exposure(self) -> None:
        host = self.server_address[0]
        if self.token is None and not ipaddress.ip_address(host).is_loopback:
            logger.warning("the reward server at %s listens on %s, beyond this machine, WITHOUT a token: anyone "
                           "who can reach it can use the reward; set %s (or --token-file) to require one",
                           self.url, host, TOKEN_ENV)

    def _warn_about_descriptors(self) -> None:
        try:
            import resource  # POSIX only
        except ImportError:
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
        if soft != resource.RLIM_INFINITY and self.limits.max_connections + in_use + 8 > soft:
            logger.warning("max_connections=%d with %d descriptors in use can exceed this process's limit of %d "
                           "open files; new connections then wait in the kernel until one closes. Lower "
                           "--max-connections or raise the limit (ulimit -n)", self.limits.max_connections,
                           in_use, soft)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            connection = super().get_request()
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE):  # out of descriptors: back off instead of spinning
                if not self._out_of_descriptors:
                    logger.warning("cannot accept a connection: %s; waiting for one to close", err)
                self._out_of_descriptors = True
                time.sleep(0.05)
            raise
        self._out_of_descriptors = False
        return connection

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Hand the connection to a thread if a slot is free; else answer 503 from this thread and close."""
        if not self.connections.acquire(blocking=False):
            self._refuse(request)
            self.shutdown_request(request)
            return
        with self._count_lock:
            self.open_connections += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_closed()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed()

    def _connection_closed(self) -> None:
        with self._count_lock:
            self.open_connections -= 1
        self.connections.release()

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"the reward server holds max_connections={self.limits.max_connections} "
                                    "connections; retry later"}).encode()
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)  # never wait on this peer: it fits in the socket's send buffer or is lost
            request.send(head + body)
        except OSError:
            pass
        self._refused_since_log += 1
        if time.monotonic() - self._last_refusal_log >= 10.0:
            logger.warning("refused %d connection(s) with 503: max_connections=%d are open",
                           self._refused_since_log, self.limits.max_connections)
            self._last_refusal_log, self._refused_since_log = time.monotonic(), 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("unexpected error while serving %s", client_address[0] if client_address else "?")


MAX_LENGTH_DIGITS = 19
"""A longer Content-Length is refused (413) unread: no int() of thousands of digits."""
DISCARD_BYTES = 2**20
"""A refused request's body up to this size is read and dropped, so that its client reads the answer."""


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.limits.read_timeout_s  # the socket's time-out for every read and write
        super().setup()

    def do_GET(self) -> None:
        if not self._authorised():
            return
        if self.path != "/health":
            self._answer(404, {"error": f"unknown route {self.path!r}; {ROUTES}"})
            return
        self._answer(200, {"status": "ok", "protocol": PROTOCOL_VERSION, "reward": self.server.name})

    def do_POST(self) -> None:
        if not self._authorised():
            self._discard_small_body()
            return
        if self.path != "/score":
            self._answer(404, {"error": f"unknown route {self.path!r}; {ROUTES}"})
            self._discard_small_body()
            return
        length = self._content_length()
        if length is None:
            self._discard_small_body()
            return
        limits = self.server.limits
        if not self.server.budget.acquire(length, limits.queue_timeout_s):
            self._answer(503, {"error": f"the reward server is busy: max_bytes_in_flight={limits.max_bytes_in_flight}"
                                        f" stayed full for queue_timeout_s={limits.queue_timeout_s}; retry later"})
            self._discard_small_body()
            return
        try:
            self._score(length)
        finally:
            self.server.budget.release(length)
            if length >= TRIM_AFTER_BYTES and MALLOC_TRIM is not None:
                MALLOC_TRIM(0)

    def _discard_small_body(self) -> None:
        """After an answer sent before the body was read, read a body of at most DISCARD_BYTES and drop it:
        closing a socket with unread bytes resets it, and the client would see a reset instead of the answer."""
        text = (self.headers.get("Content-Length") or "").strip(" \t")
        if not (text.isascii() and text.isdigit() and len(text) <= 7 and int(text) <= DISCARD_BYTES):
            return
        remaining = int(text)
        self.connection.settimeout(min(self.server.limits.read_timeout_s, 2.0))
        try:
            while remaining > 0 and (chunk := self.rfile.read1(min(remaining, 2**16))):
                remaining -= len(chunk)
        except OSError:
            pass

    def _authorised(self) -> bool:
        """Check ``Authorization: Bearer <token>`` in constant time; answer 401 if it is missing or wrong."""
        token = self.server.token
        if token is None:
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        # Header values arrive as latin-1 text, so every value encodes; compare_digest takes equal-type bytes.
        matches = hmac.compare_digest(given.strip().encode("latin-1"), token.encode("ascii"))
        if matches and scheme.lower() == "bearer":
            return True
        logger.info("%s sent a missing or wrong token (%s %s)", self.client_address[0], self.command, self.path)
        self._answer(401, {"error": "this reward server requires a token: send the header 'Authorization: Bearer "
                                    f"<token>' (the client's token=, or {TOKEN_ENV})"},
                     headers={"WWW-Authenticate": "Bearer"})
        return False

    def _content_length(self) -> int | None:
        """The body's size from a strict ``Content-Length``, or None after answering 400, 411 or 413."""
        limit = self.server.limits.max_request_bytes
        values = self.headers.get_all("Content-Length") or []
        if not values:
            self._answer(411, {"error": "POST /score needs a Content-Length header with the body's byte count"})
            return None
        text = values[0].strip(" \t")
        if len(values) > 1 or not (text.isascii() and text.isdigit()):  # isdigit alone accepts e.g. '²'
            self._answer(400, {"error": f"Content-Length must be one count in ASCII digits, got {len(values)} "
                                        f"value(s), the first {text[:40]!r}"})
            return None
        if len(text) > MAX_LENGTH_DIGITS or int(text) > limit:
            self._answer(413, {"error": f"a request of {text[:30]} bytes exceeds max_request_bytes={limit}; lower "
                                        "the client's batch_size or raise the server's --max-request-bytes"})
            return None
        return int(text)

    def _score(self, length: int) -> None:
        try:
            body = self.rfile.read(length)
        except (TimeoutError, ConnectionError) as err:
            logger.info("dropped %s while reading its body: %s", self.client_address[0], err or type(err).__name__)
            self.close_connection = True
            return
        if len(body) < length:
            logger.info("%s closed its connection %d bytes into a %d-byte body", self.client_address[0], len(body),
                        length)
            return
        try:
            samples, batch = decode_request(body)
        except ValueError as err:
            self._answer(400, {"error": f"bad request: {err}"})
            return
        del body  # the decoded tensors are a copy
        try:
            with self.server.calls, torch.no_grad():
                scores = self.server.reward(samples, batch)
            answer = encode_response(scores)
        except (ValueError, KeyError) as err:
            self._answer(400, {"error": f"reward {self.server.name!r} rejected the input: {err}"})
            return
        except Exception as err:  # the reward's own failure: 500, which clients retry
            logger.exception("reward %r failed", self.server.name)
            self._answer(500, {"error": f"reward {self.server.name!r} failed: {type(err).__name__}: {err}"})
            return
        self._send(200, answer)

    def _answer(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                               **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
        except (TimeoutError, ConnectionError):  # the client gave up (e.g. its time-out) or stopped reading
            logger.info("client %s left before the answer (HTTP %d)", self.client_address[0], status)
            self.close_connection = True

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 (the standard library's name)
        logger.info("%s %s", self.client_address[0], format % args)  # e.g. "Request timed out" (read_timeout_s)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("%s %s", self.client_address[0], format % args)


@contextmanager
def serve_in_background(reward: RewardFn, *, name: str = "reward", host: str = "127.0.0.1", port: int = 0,
                        limits: ServerLimits = DEFAULT_LIMITS, token: str | None = None) -> Iterator[str]:
    """Serve ``reward`` from a background thread; yields the base URL, shuts down and closes on exit.

    ``port=0`` binds a free port. Requests still running at exit are not waited for.
    """
    server = RewardHTTPServer(reward, name=name, host=host, port=port, limits=limits, token=token)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"reward-server-{name}", daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serve(reward: RewardFn, *, name: str = "reward", host: str = "127.0.0.1", port: int = 8000,
          limits: ServerLimits = DEFAULT_LIMITS, token: str | None = None) -> None:
    """Serve ``reward`` until SIGTERM or Ctrl-C (call it from the main thread), then close the socket and return.

    The signal handlers only set a flag, which the accept loop reads every 0.1 s, so a signal at any
    instant (even before the server is up) ends the call cleanly, with no ``KeyboardInterrupt``.
    """
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = RewardHTTPServer(reward, name=name, host=host, port=port, limits=limits, token=token)
        server.timeout = 0.1  # handle_request returns at least this often to read the flag
        try:
            logger.info("serving reward %r at %s (GET /health, POST /score%s); Ctrl-C stops", name, server.url,
                        ", token required" if token is not None else "")
            while not stop.is_set():
                server.handle_request()
            logger.info("stopping the reward server at %s", server.url)
        finally:
            server.server_close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def parse_param(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value), the value read as JSON when it parses (90, 0.5, true, "x"), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param {text!r}: write KEY=VALUE, e.g. --param quality=90")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def reward_from_args(reward: str, params: Sequence[tuple[str, Any]], imports: Sequence[str]) -> RewardFn:
    """Import the modules that register rewards, then build the named reward with its parameters."""
    for module in imports:
        importlib.import_module(module)
    if reward not in available_rewards():
        raise SystemExit(f"unknown reward {reward!r}; known: {', '.join(available_rewards())}. A task's rewards "
                         "are registered when their module is imported: add e.g. "
                         "--import tasks.text_to_image.rewards")
    return get_reward(reward, **dict(params))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffgrpo.reward_server", description=__doc__.split("\n")[0])
    parser.add_argument("--reward", required=True, help="registered reward name, e.g. jpeg_compressibility")
    parser.add_argument("--param", type=parse_param, action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of the reward's factory (repeatable); VALUE is read as JSON if it parses")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="module to import first, registering its rewards (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves other machines")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    parser.add_argument("--token-file", type=Path, help=f"file holding the token clients must send (else {TOKEN_ENV})")
    for limit in dataclasses.fields(ServerLimits):
        parser.add_argument(f"--{limit.name.replace('_', '-')}", type=int if limit.type == "int" else float,
                            default=limit.default, help=f"{limit.metadata['help']} (default {limit.default})")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG logs every request)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        limits = ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})
        token = read_token(args.token_file)
        if token is not None:
            check_token(token)
    except ValueError as err:
        parser.error(str(err))
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)  # while the reward loads; serve() installs its own
    try:
        reward = reward_from_args(args.reward, args.param, args.imports)
    finally:
        signal.signal(signal.SIGTERM, previous)
    serve(reward, name=args.reward, host=args.host, port=args.port, limits=limits, token=token)


def _exit_cleanly(signum: int, frame: Any) -> None:
    """SIGTERM before ``serve`` runs (e.g. while a reward model loads): exit with status 0, no traceback."""
    logger.info("stopped by signal %d before serving", signum)
    raise SystemExit(0)


if __name__ == "__main__":
    main()
