"""A small reference server that serves any reward callable to ``diffgrpo.remote_reward``.

Why: a reward model that needs its own process, GPU, machine or Python environment runs behind
this server; the training run names it as reward ``remote`` with the server's URL. It is the
standard library's ``ThreadingHTTPServer``: enough for one training run, not a production
inference server (no TLS, no authentication: bind it to localhost or a private network).

Run it with a registered reward (``--import`` the module that registers it):

    python -m diffgrpo.reward_server --import tasks.text_to_image.rewards \\
        --reward jpeg_compressibility --param quality=90 --port 8000

or from Python, in a background thread (tests, notebooks):

    with serve_in_background(my_reward, name="aesthetic") as url:   # a free port on 127.0.0.1
        scores = get_reward("remote", url=url)(decoded, batch)

Protocol (version 1; ``diffgrpo.remote_reward`` holds its one implementation):

``GET /health`` -> 200, JSON ``{"status": "ok", "protocol": 1, "reward": "<name>"}``.

``POST /score`` with ``Content-Length`` and a body that is one safetensors file:
  - tensors ``samples`` (the samples are one tensor (N, ...)) or ``samples/<key>`` (a mapping,
    e.g. ``samples/images`` float (N, 3, H, W) in [0, 1]), and ``batch/<key>`` for batch tensors;
    every tensor has N on its first axis, dtype as sent (float32 unless the client casts);
  - string metadata ``diffgrpo_protocol`` = "1", ``num_samples`` = "N", ``samples_layout`` =
    "tensor" or "mapping", ``batch_strings`` = JSON ``{"<key>": [N strings]}`` (e.g. prompts).
  The server calls ``reward(samples, batch)`` under ``torch.no_grad()``, ``batch`` holding the
  batch tensors and string lists by key, exactly as a local reward is called, and answers:
  - 200, JSON ``{"scores": [N numbers]}`` when the reward returns a tensor (N,), or
    ``{"scores": {"<name>": [N numbers], ...}}`` when it returns a mapping of them;
  - 400 ``{"error": ...}``: the body is not a protocol-1 request, or the reward raised ValueError
    or KeyError (it rejects the input: wrong shape, range, missing key); clients do not retry;
  - 404 unknown route, 411 no Content-Length, 413 body over ``max_request_bytes``;
  - 500 ``{"error": ...}``: the reward raised anything else or returned something that is not a
    tensor (N,) or a mapping of them (the traceback goes to this server's log); clients retry.
  Scores are sent as computed, NaN included: the client validates length and finiteness.

Concurrency: requests are handled in threads; at most ``max_concurrent_calls`` reward calls run
at once (default 1, safe for a model on one GPU), further requests wait for their turn.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from diffgrpo.remote_reward import PROTOCOL_VERSION, decode_request, encode_response
from diffgrpo.rewards import available_rewards, get_reward

logger = logging.getLogger(__name__)

RewardFn = Callable[[Any, Any], Any]


class RewardHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` bound to one reward; ``port=0`` picks a free port (see ``url``)."""

    daemon_threads = True  # a request still running at shutdown does not block the process's exit

    def __init__(self, reward: RewardFn, *, name: str = "reward", host: str = "127.0.0.1", port: int = 8000,
                 max_concurrent_calls: int = 1, max_request_bytes: int = 2**30) -> None:
        if max_concurrent_calls < 1 or max_request_bytes < 1:
            raise ValueError(f"max_concurrent_calls={max_concurrent_calls} and max_request_bytes="
                             f"{max_request_bytes} must be >= 1")
        self.reward = reward
        self.name = name
        self.max_request_bytes = max_request_bytes
        self.calls = threading.BoundedSemaphore(max_concurrent_calls)
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer

    def do_GET(self) -> None:
        if self.path != "/health":
            self._answer(404, {"error": f"unknown route {self.path!r}; routes: GET /health, POST /score"})
            return
        self._answer(200, {"status": "ok", "protocol": PROTOCOL_VERSION, "reward": self.server.name})

    def do_POST(self) -> None:
        if self.path != "/score":
            self._answer(404, {"error": f"unknown route {self.path!r}; routes: GET /health, POST /score"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._answer(411, {"error": f"POST /score needs a Content-Length header with a byte count, got {length!r}"})
            return
        if int(length) > self.server.max_request_bytes:
            self._answer(413, {"error": f"request of {length} bytes exceeds max_request_bytes="
                                        f"{self.server.max_request_bytes}; lower the client's batch_size"})
            return
        try:
            samples, batch = decode_request(self.rfile.read(int(length)))
        except ValueError as err:
            self._answer(400, {"error": f"bad request: {err}"})
            return
        try:
            with self.server.calls, torch.no_grad():
                scores = self.server.reward(samples, batch)
            body = encode_response(scores)
        except (ValueError, KeyError) as err:
            self._answer(400, {"error": f"reward {self.server.name!r} rejected the input: {err}"})
            return
        except Exception as err:  # the reward's own failure: 500, which clients retry
            logger.exception("reward %r failed", self.server.name)
            self._answer(500, {"error": f"reward {self.server.name!r} failed: {type(err).__name__}: {err}"})
            return
        self._send(200, body)

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode())

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its time-out)
            logger.info("client %s left before the answer (HTTP %d)", self.client_address[0], status)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the standard library's name)
        logger.debug("%s %s", self.client_address[0], format % args)


@contextmanager
def serve_in_background(reward: RewardFn, *, name: str = "reward", host: str = "127.0.0.1", port: int = 0,
                        max_concurrent_calls: int = 1) -> Iterator[str]:
    """Serve ``reward`` from a background thread; yields the base URL, shuts down and closes on exit.

    ``port=0`` binds a free port. Requests still running at exit are not waited for.
    """
    server = RewardHTTPServer(reward, name=name, host=host, port=port, max_concurrent_calls=max_concurrent_calls)
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
          max_concurrent_calls: int = 1) -> None:
    """Serve ``reward`` until Ctrl-C or SIGTERM (from the main thread), then close the socket and return."""
    server = RewardHTTPServer(reward, name=name, host=host, port=port, max_concurrent_calls=max_concurrent_calls)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM ends like Ctrl-C

    previous = signal.signal(signal.SIGTERM, stop)
    logger.info("serving reward %r at %s (GET /health, POST /score); Ctrl-C stops", name, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopping the reward server at %s", server.url)
    finally:
        server.server_close()
        signal.signal(signal.SIGTERM, previous)


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
    parser.add_argument("--max-concurrent-calls", type=int, default=1, help="reward calls allowed to run at once")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG logs every request)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(reward_from_args(args.reward, args.param, args.imports), name=args.reward, host=args.host,
          port=args.port, max_concurrent_calls=args.max_concurrent_calls)


if __name__ == "__main__":
    main()
