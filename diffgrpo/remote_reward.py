"""A reward computed by another process over HTTP: the client, registered as reward ``remote``.

Why: large reward models (an aesthetic scorer, a VLM judge) often live in another process, on
another GPU or machine, or in another Python environment. ``remote`` sends each batch of decoded
samples to such a server and returns its scores like any local reward, so ``RewardSet`` weights,
validates and logs them as usual. ``diffgrpo.reward_server`` serves any reward callable over the
same protocol; its module docstring and ``docs/remote_rewards.md`` describe the wire format:

    GET  <url>/health  -> 200 {"status": "ok", "protocol": 1, "reward": <name>}
    POST <url>/score   body: safetensors bytes (samples, batch tensors; strings in its metadata)
                       -> 200 {"scores": [N floats]} or {"scores": {name: [N floats], ...}}
                       -> 4xx/5xx {"error": <message>}

Retries: connection errors, time-outs and 5xx answers (503: the server is busy) are retried
``max_retries`` times, waiting ``backoff_s * 2**k`` seconds before retry k + 1; 4xx answers (a
request the server rejects, 401 a missing or wrong token) and malformed scores are never retried.
Scoring is a pure function of the request, so a retried POST is safe. Redirects (3xx) are refused,
not followed: they could carry the samples and the token to another address. An error quotes at
most ``EXCERPT_CHARS`` characters of what the server sent, control characters replaced.

Token: ``token=`` (else the environment variable ``DIFFGRPO_REWARD_TOKEN``, which keeps it out of
configs that are saved with checkpoints) is sent as ``Authorization: Bearer <token>``.

Threads: a ``RemoteReward`` holds no mutable state after construction, so one instance may be
called from several threads at once (``RewardSet.submit`` calls it in a worker thread, which lets
the HTTP round trip overlap with the next rollout). One call splits its N samples into requests
of at most ``batch_size`` samples and sends up to ``max_concurrency`` of them at a time.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from diffgrpo.rewards import register_reward

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change of the wire format; ``/health`` reports the server's."""
CONTENT_TYPE = "application/vnd.diffgrpo.safetensors"
"""Content-Type of a ``/score`` request body."""
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Names accepted by ``wire_dtype``: floating tensors are cast to it before sending."""
TOKEN_ENV = "DIFFGRPO_REWARD_TOKEN"
"""Environment variable holding the shared-secret token, read by the server and (without token=) the client."""
EXCERPT_CHARS = 200
"""The most characters of a server's answer that an error message quotes."""
MAX_ANSWER_BYTES = 64 * 2**20
"""The largest ``/score`` or ``/health`` answer the client reads (scores are ~25 bytes each)."""

Samples = Tensor | Mapping[str, Tensor]
Scores = Tensor | dict[str, Tensor]


class RemoteRewardError(RuntimeError):
    """A remote reward call failed; the message names the URL, what went wrong and the fix."""


# --- wire format (one home for both the client and diffgrpo.reward_server) ---------------------------------


def check_token(token: str) -> str:
    """Raise ValueError unless ``token`` can travel in an ``Authorization`` header: visible ASCII, no spaces."""
    if not (isinstance(token, str) and token and token.isascii() and token.isprintable() and " " not in token):
        raise ValueError("the reward server's token must be a non-empty string of visible ASCII characters "
                         "without spaces, e.g. python -c 'import secrets; print(secrets.token_hex(32))'")
    return token


def excerpt(text: str | bytes, limit: int = EXCERPT_CHARS) -> str:
    """At most ``limit`` characters of a peer's text for an error message, non-printable ones
    (newlines, terminal escapes, bidi controls) replaced by '?'."""
    if isinstance(text, bytes):
        text = text[: 4 * limit].decode("utf-8", errors="replace")
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clean + ("... (cut)" if len(text) > limit else "")


def num_samples(samples: Samples) -> int:
    """N, the first axis shared by the sample tensor or by every tensor of the sample mapping."""
    tensors = {"samples": samples} if isinstance(samples, Tensor) else dict(samples)
    if not tensors or not all(isinstance(t, Tensor) and t.ndim >= 1 for t in tensors.values()):
        raise ValueError("remote rewards send a tensor (N, ...) or a non-empty mapping of such tensors; got "
                         f"{ {k: type(v).__name__ for k, v in tensors.items()} }")
    sizes = {key: t.shape[0] for key, t in tensors.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"sample tensors disagree on N (first axis): {sizes}")
    return next(iter(sizes.values()))


def select_batch(batch: Mapping[str, Any], batch_keys: Sequence[str], n: int) -> dict[str, Tensor | list[str]]:
    """The batch entries named in ``batch_keys``, checked to be tensors (N, ...) or lists of N strings."""
    selected: dict[str, Tensor | list[str]] = {}
    for key in batch_keys:
        if key not in batch:
            raise ValueError(f"batch_keys names {key!r}, but the batch has only {sorted(batch)}; fix batch_keys")
        value = batch[key]
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == n:
            selected[key] = value
        elif isinstance(value, list | tuple) and len(value) == n and all(isinstance(s, str) for s in value):
            selected[key] = list(value)
        else:
            got = tuple(value.shape) if isinstance(value, Tensor) else (
                f"a {type(value).__name__} of length {len(value)}" if isinstance(value, list | tuple)
                else type(value).__name__)
            raise ValueError(f"batch[{key!r}] is {got}; a remote reward sends tensors (N, ...) or lists of N strings "
                             f"with N={n} samples: drop {key!r} from batch_keys or expand it per sample")
    return selected


def encode_request(samples: Samples, batch: Mapping[str, Any], batch_keys: Sequence[str],
                   wire_dtype: torch.dtype | None = None) -> bytes:
    """The ``/score`` body: one safetensors file holding N samples and the requested batch entries.

    Tensors are named ``samples`` (a bare sample tensor) or ``samples/<key>``, and ``batch/<key>``;
    batch entries that are lists of N strings (prompts) go into the metadata as JSON under
    ``batch_strings``. Every tensor keeps its dtype unless ``wire_dtype`` casts the floating ones.
    """
    n = num_samples(samples)
    tensors = {"samples": samples} if isinstance(samples, Tensor) else {f"samples/{k}": v for k, v in samples.items()}
    strings: dict[str, list[str]] = {}
    for key, value in select_batch(batch, batch_keys, n).items():
        if isinstance(value, Tensor):
            tensors[f"batch/{key}"] = value
        else:
            strings[key] = value
    wire: dict[str, Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if wire_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(wire_dtype)
        tensor = tensor.contiguous()
        if tensor.untyped_storage().data_ptr() in seen_storage:  # safetensors refuses tensors sharing memory
            tensor = tensor.clone()
        seen_storage.add(tensor.untyped_storage().data_ptr())
        wire[name] = tensor
    metadata = {"diffgrpo_protocol": str(PROTOCOL_VERSION), "num_samples": str(n),
                "samples_layout": "tensor" if isinstance(samples, Tensor) else "mapping",
                "batch_strings": json.dumps(strings)}
    return save_safetensors(wire, metadata=metadata)


def decode_request(body: bytes) -> tuple[Samples, dict[str, Any]]:
    """Inverse of ``encode_request``: (samples, batch) as the reward callable receives them.

    Raises ValueError for a body that is not a protocol-1 request (a server answers it with 400).
    """
    try:
        (header_size,) = struct.unpack("<Q", body[:8])
        metadata = json.loads(body[8 : 8 + header_size]).get("__metadata__") or {}
        tensors = load_safetensors(body)
    except Exception as err:  # struct, JSON and safetensors errors all mean "not our format"
        raise ValueError(f"the request body is not a safetensors file ({err}); send encode_request's bytes") from None
    if metadata.get("diffgrpo_protocol") != str(PROTOCOL_VERSION):
        raise ValueError(f"request speaks protocol {metadata.get('diffgrpo_protocol')!r}, this server "
                         f"{PROTOCOL_VERSION}; update the client or the server")
    try:  # a body that decodes but lacks (or garbles) metadata is still a bad request, not a server failure
        n = int(metadata["num_samples"])
        strings = json.loads(metadata.get("batch_strings", "{}"))
        if not isinstance(strings, dict) or not all(
                isinstance(v, list) and all(isinstance(s, str) for s in v) for v in strings.values()):
            raise TypeError(f"batch_strings must map names to lists of strings, got {str(strings)[:100]}")
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"the request's metadata is incomplete or malformed ({type(err).__name__}: {err}); it "
                         "needs num_samples and batch_strings as encode_request writes them") from None
    for name, tensor in tensors.items():
        if tensor.ndim < 1 or tensor.shape[0] != n:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected N={n} on its first axis")
    for key, values in strings.items():
        if len(values) != n:
            raise ValueError(f"batch strings {key!r} hold {len(values)} entries, expected N={n}")
    batch: dict[str, Any] = {k[len("batch/"):]: v for k, v in tensors.items() if k.startswith("batch/")}
    batch.update(strings)
    if n < 1:
        raise ValueError(f"the request holds num_samples={n}; send at least one sample")
    layout = metadata.get("samples_layout")
    if layout == "tensor":
        if "samples" not in tensors:
            raise ValueError("the request declares a sample tensor but holds no tensor named 'samples'")
        return tensors["samples"], batch
    samples = {k[len("samples/"):]: v for k, v in tensors.items() if k.startswith("samples/")}
    if layout != "mapping" or not samples:
        raise ValueError(f"the request declares samples_layout={excerpt(str(layout), 40)!r} with tensors "
                         f"{excerpt(str(sorted(tensors)), 100)}; it needs 'tensor' with a tensor 'samples', or "
                         "'mapping' with at least one 'samples/<key>' tensor")
    return samples, batch


def encode_response(scores: Any) -> bytes:
    """The ``/score`` answer: JSON ``{"scores": [...]}`` for a tensor (N,), ``{"scores": {name: [...]}}``
    for a mapping of them. Values are sent as they are (NaN included): the client validates them."""

    def as_list(name: str, value: Any) -> list[float]:
        if not isinstance(value, Tensor) or value.ndim != 1:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"the reward returned {got} for {name!r}; return a tensor (N,) or a mapping of them")
        return value.detach().to("cpu", torch.float64).tolist()

    if isinstance(scores, Mapping):
        payload: Any = {str(k): as_list(str(k), v) for k, v in scores.items()}
    else:
        payload = as_list("scores", scores)
    return json.dumps({"scores": payload}).encode()


def decode_response(body: bytes, n: int) -> Scores:
    """Parse and validate a ``/score`` answer for N samples: float32 tensors (N,), all finite.

    Raises ValueError naming the sub-reward and the problem.
    """
    try:
        scores = json.loads(body)["scores"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"the answer is not JSON with a 'scores' field ({type(err).__name__}): "
                         f"{excerpt(body)!r}") from None

    def as_tensor(name: str, values: Any) -> Tensor:
        numbers = isinstance(values, list) and all(type(v) in (int, float) for v in values)  # not bool
        if not numbers:
            raise ValueError(f"scores {excerpt(name, 40)!r} must be a list of numbers, got {excerpt(str(values), 100)}")
        if len(values) != n:
            raise ValueError(f"{len(values)} scores for {name!r}, expected {n} (one per sample sent)")
        scores_f32 = torch.tensor(values, dtype=torch.float64).to(torch.float32)  # (n,)
        bad = (~torch.isfinite(scores_f32)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"scores {name!r} hold NaN or inf (in float32) at sample(s) {bad[:10]}")
        return scores_f32

    if isinstance(scores, Mapping):
        if not scores:
            raise ValueError("'scores' is an empty mapping; the server must return >= 1 sub-reward")
        return {str(k): as_tensor(str(k), v) for k, v in scores.items()}
    return as_tensor("scores", scores)


# --- the client ---------------------------------------------------------------------------------------------


class RemoteReward:
    """Reward callable ``(samples, batch) -> scores`` evaluated by a server speaking the protocol above.

    Returns a float32 tensor (N,), or a mapping ``{name: (N,)}`` when the server returns named
    sub-rewards, on the device of the samples. See ``remote`` for the parameters.
    """

    def __init__(self, url: str, *, batch_keys: Sequence[str] = (), names: Sequence[str] | None = None,
                 batch_size: int = 32, timeout_s: float = 60.0, max_retries: int = 2, backoff_s: float = 0.5,
                 max_concurrency: int = 4, wire_dtype: str | None = None, use_health_check: bool = True,
                 token: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"url={url!r} must be an http(s) URL such as http://localhost:8000")
        if parsed.path.rstrip("/").endswith(("/score", "/health")):
            raise ValueError(f"url={url!r} names a route; pass the server's base URL (the client adds /score)")
        if batch_size < 1 or max_concurrency < 1 or max_retries < 0:
            raise ValueError(f"batch_size={batch_size} and max_concurrency={max_concurrency} must be >= 1, "
                             f"max_retries={max_retries} >= 0")
        if not (timeout_s > 0 and math.isfinite(timeout_s) and backoff_s >= 0 and math.isfinite(backoff_s)):
            raise ValueError(f"timeout_s={timeout_s} must be finite and > 0, backoff_s={backoff_s} finite and >= 0")
        if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype={wire_dtype!r}; choose one of {sorted(WIRE_DTYPES)} or None (send as is)")
        if names is not None and (isinstance(names, str) or not names):
            raise ValueError(f"names={names!r} must be a non-empty list of sub-reward names, or None")
        self.url = url.rstrip("/")
        self.batch_keys = tuple(batch_keys)
        self.names = None if names is None else tuple(names)
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self.wire_dtype = None if wire_dtype is None else WIRE_DTYPES[wire_dtype]
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._headers = {} if token is None else {"Authorization": f"Bearer {check_token(token)}"}
        if use_health_check:
            self.check()

    def check(self) -> dict[str, Any]:
        """GET ``<url>/health`` (with the usual retries) and check the protocol version; returns the answer."""
        body = self._send(urllib.request.Request(f"{self.url}/health", headers=self._headers), "GET /health")
        try:
            health = json.loads(body)
            protocol = health.get("protocol")
        except (ValueError, AttributeError):
            raise RemoteRewardError(f"{self.url}/health did not answer a JSON object ({excerpt(body)!r}); is url the "
                                    "address of a diffgrpo reward server?") from None
        if protocol != PROTOCOL_VERSION:
            raise RemoteRewardError(f"the reward server at {self.url} speaks protocol {excerpt(repr(protocol), 40)}, "
                                    f"this client {PROTOCOL_VERSION}; install matching diffgrpo versions")
        return health

    def __call__(self, samples: Samples, batch: Mapping[str, Any]) -> Scores:
        """Scores of N samples: float32 (N,) or {name: (N,)}, in the samples' order, on their device."""
        n = num_samples(samples)
        if n == 0:
            raise ValueError("the remote reward got 0 samples (N = 0 on the first axis); score at least one sample")
        selected = select_batch(batch, self.batch_keys, n)  # checked once, for every request
        bounds = [(start, min(start + self.batch_size, n)) for start in range(0, n, self.batch_size)]
        if len(bounds) == 1:
            parts = [self._score(samples, selected, 0, n)]
        else:
            with ThreadPoolExecutor(min(self.max_concurrency, len(bounds)), thread_name_prefix="remote-reward") as pool:
                futures = [pool.submit(self._score, samples, selected, start, stop) for start, stop in bounds]
                try:
                    parts = [future.result() for future in futures]
                finally:
                    for future in futures:  # after a failure, send no further requests
                        future.cancel()
        layouts = {None if isinstance(part, Tensor) else tuple(sorted(part)) for part in parts}
        if len(layouts) > 1:
            raise RemoteRewardError(f"the reward server at {self.url} returned different sub-rewards for the requests "
                                    f"of one call: {sorted(layouts, key=str)}; fix the server (or pass names to check)")
        device = samples.device if isinstance(samples, Tensor) else next(iter(samples.values())).device
        if isinstance(parts[0], Tensor):
            return torch.cat(parts).to(device)
        return {key: torch.cat([part[key] for part in parts]).to(device) for key in parts[0]}

    def _score(self, samples: Samples, selected: Mapping[str, Any], start: int, stop: int) -> Scores:
        """POST samples[start:stop] with their batch entries and validate the answer."""
        chunk = samples[start:stop] if isinstance(samples, Tensor) else {k: v[start:stop] for k, v in samples.items()}
        sliced = {key: value[start:stop] for key, value in selected.items()}
        body = encode_request(chunk, sliced, self.batch_keys, self.wire_dtype)
        request = urllib.request.Request(f"{self.url}/score", data=body, method="POST",
                                         headers={"Content-Type": CONTENT_TYPE, **self._headers})
        answer = self._send(request, f"POST /score ({stop - start} samples)")
        try:
            scores = decode_response(answer, stop - start)
        except ValueError as err:
            raise RemoteRewardError(f"the reward server at {self.url} returned bad scores: {err}; fix the server's "
                                    "reward to return one finite score per sample") from None
        got = None if isinstance(scores, Tensor) else tuple(scores)
        if self.names is not None and (got is None or set(got) != set(self.names)):
            raise RemoteRewardError(f"the reward server at {self.url} returned sub-rewards {got} (None: one unnamed "
                                    f"score), expected names={self.names}; fix names or the server")
        return scores

    def _send(self, request: urllib.request.Request, what: str) -> bytes:
        """Send with retries (connection errors, time-outs, 5xx); 3xx and 4xx raise at once."""
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                with _OPENER.open(request, timeout=self.timeout_s) as response:
                    answer = response.read(MAX_ANSWER_BYTES + 1)
                if len(answer) > MAX_ANSWER_BYTES:
                    raise RemoteRewardError(f"{what} to the reward server at {self.url}: the answer exceeds "
                                            f"{MAX_ANSWER_BYTES} bytes; is url the address of a diffgrpo reward "
                                            "server?")
                return answer
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if 300 <= err.code < 400:
                    raise RemoteRewardError(
                        f"{what} to {self.url} was answered HTTP {err.code}, a redirect to "
                        f"{excerpt(err.headers.get('Location') or '(no Location)', 100)!r}: not followed (it could "
                        "carry the samples and the token elsewhere); pass the reward server's own address as url"
                    ) from None
                if err.code == 401:
                    raise RemoteRewardError(
                        f"{what} to the reward server at {self.url} was refused with HTTP 401: {message}; pass the "
                        f"server's token as token= or in {TOKEN_ENV}") from None
                if err.code < 500:
                    raise RemoteRewardError(
                        f"{what} to the reward server at {self.url} was rejected with HTTP {err.code}: {message}; "
                        "not retried (the same request would fail again): fix the request (url, batch_keys, the "
                        "decoded outputs) or the server's reward") from None
                failure, fix = f"HTTP {err.code}: {message}", "the server failed while scoring: see its log"
            except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException) as err:
                reason = err.reason if isinstance(err, urllib.error.URLError) else err
                if isinstance(reason, TimeoutError):
                    failure = f"no answer within timeout_s={self.timeout_s}"
                    fix = (f"raise timeout_s, lower batch_size={self.batch_size} (each request then takes less "
                           "time), or check that the server is not overloaded")
                else:
                    failure = f"connection failed ({reason})"
                    fix = ("check that the server is running and reachable at this url, e.g. start it with "
                           "`python -m diffgrpo.reward_server --reward NAME --port PORT`")
            if attempt + 1 < attempts:
                delay = self.backoff_s * 2**attempt
                logger.warning("%s to %s failed (%s); retry %d/%d in %.2f s", what, self.url, failure, attempt + 1,
                               self.max_retries, delay)
                time.sleep(delay)
        raise RemoteRewardError(f"{what} to the reward server at {self.url} failed: {failure}, on all {attempts} "
                                f"attempt(s) (max_retries={self.max_retries}); {fix}")


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx becomes an HTTPError for the caller instead of a request to the ``Location``."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def _error_message(err: urllib.error.HTTPError) -> str:
    """A short, sanitised excerpt of the server's ``{"error": ...}`` message, or of its body."""
    try:
        body = err.read(64 * EXCERPT_CHARS)  # enough for the excerpt: a huge error body is never read whole
    except (OSError, http.client.HTTPException):
        return excerpt(str(err.reason or ""))
    try:
        return excerpt(str(json.loads(body)["error"]))
    except (ValueError, KeyError, TypeError):
        return excerpt(body) or excerpt(str(err.reason or ""))


@register_reward("remote")
def remote(url: str, *, batch_keys: Sequence[str] = (), names: Sequence[str] | None = None, batch_size: int = 32,
           timeout_s: float = 60.0, max_retries: int = 2, backoff_s: float = 0.5, max_concurrency: int = 4,
           wire_dtype: str | None = None, use_health_check: bool = True, token: str | None = None) -> RemoteReward:
    """Scores from a reward server at ``url`` (its base URL, e.g. ``http://localhost:8000``).

    batch_keys: batch entries sent with the samples (tensors (N, ...) or lists of N strings, e.g.
        the prompts); the samples are always sent.
    names: sub-reward names the server must return (checked on every answer); None accepts the
        server's (one unnamed score gives the sub-reward ``remote``, names give ``remote/<name>``).
    batch_size: samples per HTTP request; a call with N samples sends ceil(N / batch_size) requests,
        up to ``max_concurrency`` at a time.
    timeout_s: seconds allowed for connecting and for each wait on the answer (not the whole call).
    max_retries, backoff_s: retries of connection errors, time-outs and 5xx, after waiting
        ``backoff_s * 2**k`` seconds before retry k + 1.
    wire_dtype: "float32", "float16" or "bfloat16" casts floating tensors before sending (float16
        halves the bytes of float32 images); None sends every tensor as it is.
    use_health_check: GET ``<url>/health`` on construction, so a wrong url fails before any rollout.
    token: the server's shared secret, sent as ``Authorization: Bearer <token>``; None reads the
        environment variable ``DIFFGRPO_REWARD_TOKEN`` (unset: no token). Raises ValueError for a
        token that cannot travel in a header.
    """
    return RemoteReward(url, batch_keys=batch_keys, names=names, batch_size=batch_size, timeout_s=timeout_s,
                        max_retries=max_retries, backoff_s=backoff_s, max_concurrency=max_concurrency,
                        wire_dtype=wire_dtype, use_health_check=use_health_check, token=token)
