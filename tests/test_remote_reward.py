"""The remote reward client against the reference server on localhost: same scores as locally,
batching, retries, time-outs, errors, futures, the CLI, and a failed iteration that leaves the
last checkpoint intact. Every server is shut down by the ``serve`` fixture."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from diffgrpo.config import GRPOConfig, OptimConfig
from diffgrpo.remote_reward import RemoteReward, RemoteRewardError, decode_request, encode_request
from diffgrpo.reward_server import ServerLimits, parse_param, reward_from_args, serve_in_background
from diffgrpo.rewards import RewardSet, get_reward
from diffgrpo.trainer import train_grpo
from tasks.text_to_image import rewards as t2i_rewards  # noqa: F401  (registers the JPEG rewards)
from tests.toy_task import ToyNet, ToyTask

ROOT = Path(__file__).resolve().parents[1]
FAST = {"backoff_s": 0.01}  # retries without the default half-second waits


@pytest.fixture
def serve():
    """serve(reward, **kw) -> base URL of a reference server, shut down when the test ends."""
    with ExitStack() as stack:
        yield lambda reward, **kw: stack.enter_context(serve_in_background(reward, **kw))


class Recorder:
    """Wraps a reward; records the batch sizes (and anything else) each server call received."""

    def __init__(self, reward, before=None):
        self.reward, self.before = reward, before
        self.sizes: list[int] = []
        self.received: list = []
        self.lock = threading.Lock()

    def __call__(self, samples, batch):
        with self.lock:
            call = len(self.sizes)
            self.sizes.append(len(next(iter(samples.values()))) if isinstance(samples, dict) else len(samples))
            self.received.append((samples, batch))
        if self.before is not None:
            self.before(call)
        return self.reward(samples, batch)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))  # (N, 3, H, W) in [0, 1]


def prompt_reward(samples, batch):
    """Two named sub-rewards that read a tensor sample, a batch tensor and the prompts."""
    lengths = torch.tensor([float(len(p)) for p in batch["prompts"]])
    return {"mean": samples["images"].mean(dim=(1, 2, 3)), "length_plus_t": lengths + batch["t"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_client_returns_exactly_what_the_reward_returns_locally(serve):
    jpeg = get_reward("jpeg_compressibility")
    decoded = {"images": images(5)}
    batch = {"prompts": ["a cat", "two dogs", "", "night sky", "é ü ✓"], "t": torch.arange(5.0), "unused": 3}
    url = serve(jpeg, name="jpeg")
    assert torch.equal(RemoteReward(url)(decoded, batch), jpeg(decoded, batch))
    url = serve(prompt_reward, name="prompts")
    remote = get_reward("remote", url=url, batch_keys=("prompts", "t"), names=("mean", "length_plus_t"))
    got, local = remote(decoded, batch), prompt_reward(decoded, batch)
    assert got.keys() == local.keys()
    for key in local:
        assert torch.equal(got[key], local[key]), key
    # A bare sample tensor travels as one tensor; the layout survives the round trip.
    samples, batch_back = decode_request(encode_request(images(2), {"p": ["x", "y"]}, ("p",)))
    assert torch.equal(samples, images(2)) and batch_back == {"p": ["x", "y"]}


def test_batches_are_split_sent_concurrently_and_reassembled_in_order(serve):
    both_in_flight = threading.Barrier(2, timeout=5)  # broken (-> 500) if the first two requests were sequential

    def wait_for_partner(call):
        if call < 2:
            both_in_flight.wait()

    recorder = Recorder(lambda s, b: s["images"].mean(dim=(1, 2, 3)) + b["t"], before=wait_for_partner)
    url = serve(recorder, limits=ServerLimits(max_concurrent_calls=2))
    decoded, batch = {"images": images(10)}, {"t": torch.arange(10.0)}
    remote = RemoteReward(url, batch_keys=("t",), batch_size=4, max_concurrency=2, max_retries=0)
    assert torch.equal(remote(decoded, batch), decoded["images"].mean(dim=(1, 2, 3)) + batch["t"])
    assert sorted(recorder.sizes) == [2, 4, 4]
    assert sorted(int(b["t"][0]) for _, b in recorder.received) == [0, 4, 8]  # each request got its own rows


def test_wire_dtype_casts_floating_tensors(serve):
    recorder = Recorder(lambda s, b: s["images"].float().mean(dim=(1, 2, 3)))
    decoded = {"images": images(3)}
    got = RemoteReward(serve(recorder), wire_dtype="float16")(decoded, {})
    assert recorder.received[0][0]["images"].dtype == torch.float16
    assert torch.equal(got, decoded["images"].half().float().mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="wire_dtype='int8'"):
        RemoteReward("http://127.0.0.1:1", wire_dtype="int8", use_health_check=False)


def test_a_server_past_the_timeout_fails_after_the_configured_retries(serve):
    release = threading.Event()
    recorder = Recorder(lambda s, b: torch.zeros(len(s["images"])), before=lambda call: release.wait(10))
    try:
        url = serve(recorder, limits=ServerLimits(max_concurrent_calls=4))
        remote = RemoteReward(url, timeout_s=0.3, max_retries=2, **FAST)
        with pytest.raises(RemoteRewardError, match=rf"{url}.*no answer within timeout_s=0.3.*all 3 attempt"
                                                    r".*raise timeout_s, lower batch_size"):
            remote({"images": images(2)}, {})
    finally:
        release.set()
    assert len(recorder.sizes) == 3  # the first try and two retries reached the server


def test_a_500_is_retried_and_the_retry_succeeds(serve):
    def fail_first(call):
        if call == 0:
            raise RuntimeError("CUDA out of memory (simulated)")

    recorder = Recorder(get_reward("jpeg_compressibility"), before=fail_first)
    decoded = {"images": images(4)}
    got = RemoteReward(serve(recorder), max_retries=1, **FAST)(decoded, {})
    assert torch.equal(got, get_reward("jpeg_compressibility")(decoded, {}))
    assert recorder.sizes == [4, 4]


def test_a_400_fails_at_once_without_retry(serve):
    recorder = Recorder(get_reward("jpeg_compressibility"))
    url = serve(recorder)
    remote = RemoteReward(url, max_retries=3, **FAST)
    with pytest.raises(RemoteRewardError, match=rf"{url} was rejected with HTTP 400: reward 'reward' rejected the "
                                                r"input: decoded\['images'\] spans .*not retried"):
        remote({"images": 2 * images(2) - 1}, {})  # [-1, 1]: the JPEG reward's ValueError
    assert recorder.sizes == [2]
    with pytest.raises(RemoteRewardError, match="HTTP 404: unknown route '/v1/health'"):
        RemoteReward(f"{url}/v1", max_retries=3, **FAST)


@pytest.mark.parametrize(("returned", "names", "match"), [
    (lambda n: torch.zeros(n - 1), None, r"bad scores: 3 scores for 'scores', expected 4 \(one per sample"),
    (lambda n: torch.tensor([0.0, float("nan"), 1.0, 2.0]), None,
     r"'scores' hold NaN or inf \(in float32\) at sample\(s\) \[1\]"),
    # 1e39 is finite in float64 (JSON) but overflows the float32 scores.
    (lambda n: {"a": torch.zeros(n), "b": torch.full((n,), 1e39, dtype=torch.float64)}, None, r"'b' hold NaN or inf"),
    (lambda n: {"a": torch.zeros(n)}, ("a", "b"), r"returned sub-rewards \('a',\).*expected names=\('a', 'b'\)"),
], ids=["wrong_length", "nan", "float32_overflow", "missing_name"])
def test_bad_scores_are_clear_errors(serve, returned, names, match):
    recorder = Recorder(lambda s, b: returned(len(s["images"])))
    remote = RemoteReward(serve(recorder), names=names, max_retries=2, **FAST)
    with pytest.raises(RemoteRewardError, match=match):
        remote({"images": images(4)}, {})
    assert len(recorder.sizes) == 1  # a bad answer is not retried


def test_health_check_fails_before_any_rollout_on_a_wrong_url(serve):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RemoteRewardError, match=rf"GET /health to the reward server at {url} failed: connection "
                                                r"failed.*all 2 attempt.*python -m diffgrpo.reward_server"):
        get_reward("remote", url=url, max_retries=1, **FAST)
    assert RemoteReward(serve(prompt_reward, name="prompts")).check() == {"status": "ok", "protocol": 1,
                                                                          "reward": "prompts"}
    with pytest.raises(ValueError, match="pass the server's base URL"):
        RemoteReward(f"{url}/score", use_health_check=False)


def test_bad_batch_keys_fail_before_any_request(serve):
    recorder = Recorder(prompt_reward)
    url = serve(recorder)
    decoded = {"images": images(3)}
    with pytest.raises(ValueError, match=r"batch_keys names 'prompts', but the batch has only \['t'\]"):
        RemoteReward(url, batch_keys=("prompts",))(decoded, {"t": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"batch\['t'\] is \(1,\).*N=3 samples"):
        RemoteReward(url, batch_keys=("t",))(decoded, {"t": torch.zeros(1)})
    assert recorder.sizes == []


def test_submit_overlaps_the_remote_call_with_other_work(serve):
    go = threading.Event()

    def wait_for_main_thread(call):
        if not go.wait(10):
            raise RuntimeError("the main thread never got to run while the reward was pending")

    jpeg = get_reward("jpeg_compressibility")
    url = serve(Recorder(jpeg, before=wait_for_main_thread))
    decoded = {"images": images(6)}
    with RewardSet({"remote": RemoteReward(url, batch_size=2, max_retries=0)}) as rewards:
        future = rewards.submit(decoded, {})
        other_work = torch.linalg.matrix_norm(torch.ones(64, 64) @ torch.ones(64, 64))  # e.g. the next rollout
        assert not future.done()  # the server is still waiting for this thread
        go.set()
        out = future.result(timeout=30)
    assert float(other_work) == pytest.approx(64 * 64)
    assert torch.equal(out.components["remote"], jpeg(decoded, {}))


def checkpoint_files(output_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output_dir)): p.read_bytes() for p in sorted(output_dir.rglob("*")) if p.is_file()}


def test_a_failed_remote_reward_leaves_the_last_checkpoint_intact(serve, tmp_path):
    failing = threading.Event()
    toy = get_reward("toy_closeness")

    def reward(decoded, batch):
        if failing.is_set():
            raise RuntimeError("reward model crashed")
        return toy(decoded, batch)

    url = serve(reward, name="toy")
    cfg = GRPOConfig(num_iterations=2, conditions_per_iteration=2, group_size=4, micro_batch_size=8,
                     rewards=("toy_closeness",), optim=OptimConfig(learning_rate=1e-3), checkpoint_every=1)

    def run(**kw):
        rewards = RewardSet({"remote": RemoteReward(url, batch_keys=("target",), max_retries=1, **FAST)})
        return train_grpo(ToyTask("ddim"), ToyNet(), cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path,
                          rewards=rewards, **kw)

    torch.manual_seed(0)
    first = run(stop_after=1)
    assert len(first["reward/remote/all"]) == 1
    before = checkpoint_files(tmp_path / "checkpoints")
    assert any(name.endswith(".safetensors") for name in before)
    failing.set()
    with pytest.raises(RemoteRewardError, match=rf"{url} failed: HTTP 500: reward 'toy' failed: RuntimeError: "
                                                "reward model crashed, on all 2 attempt"):
        run(resume=True)
    assert checkpoint_files(tmp_path / "checkpoints") == before  # same files, same bytes
    failing.clear()  # the server is back: the run resumes from that checkpoint and finishes
    history = run(resume=True)
    assert len(history["reward/remote/all"]) == 2 and history["reward/remote/all"][0] == first["reward/remote/all"][0]


def test_docs_example_server_serves_its_reward(serve):
    text = (ROOT / "docs" / "remote_rewards.md").read_text()
    block = re.search(r"```python\n(# my_reward_server.py.*?)```", text, re.S).group(1)
    namespace = {"__name__": "my_reward_server"}
    exec(compile(block, "remote_rewards.md", "exec"), namespace)
    reward = namespace["make_reward"]()
    decoded = {"images": images(2)}
    batch = {"prompt": ["a bright day", "a night street"]}  # the text-to-image task's key
    remote = get_reward("remote", url=serve(reward, name="luma"), batch_keys=("prompt",),
                        names=("brightness", "matches_prompt"))
    got, local = remote(decoded, batch), reward(decoded, batch)
    for key in ("brightness", "matches_prompt"):
        assert torch.equal(got[key], local[key]), key
    assert torch.allclose(got["matches_prompt"], torch.stack([got["brightness"][0], 1 - got["brightness"][1]]))


def test_cli_arguments_build_the_registered_reward():
    assert parse_param("quality=90") == ("quality", 90) and parse_param("name=abc") == ("name", "abc")
    reward = reward_from_args("jpeg_compressibility", [("quality", 50)], ["tasks.text_to_image.rewards"])
    decoded = {"images": images(2)}
    assert torch.equal(reward(decoded, {}), get_reward("jpeg_compressibility", quality=50)(decoded, {}))
    with pytest.raises(SystemExit, match="unknown reward 'jpeg_compresibility'.*--import"):
        reward_from_args("jpeg_compresibility", [], [])


def test_the_command_line_server_serves_and_stops_cleanly_on_sigterm():
    command = [sys.executable, "-m", "diffgrpo.reward_server", "--import", "tasks.text_to_image.rewards",
               "--reward", "jpeg_compressibility", "--param", "quality=80", "--port", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        line = ""
        while "serving reward" not in line:
            line = lines.get(timeout=60)
        url = re.search(r"at (http://\S+) ", line).group(1)
        decoded = {"images": images(3)}
        got = RemoteReward(url)(decoded, {})
        assert torch.equal(got, get_reward("jpeg_compressibility", quality=80)(decoded, {}))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("metadata", [None, {"diffgrpo_protocol": "1"},
                                      {"diffgrpo_protocol": "1", "num_samples": "two"},
                                      {"diffgrpo_protocol": "1", "num_samples": "2", "batch_strings": "[1]"}],
                         ids=["no_metadata", "no_num_samples", "bad_num_samples", "bad_batch_strings"])
def test_a_body_with_bad_metadata_is_answered_400(serve, metadata):
    import http.client
    import json
    import urllib.parse

    from safetensors.torch import save as save_safetensors

    recorder = Recorder(get_reward("jpeg_compressibility"))
    address = urllib.parse.urlsplit(serve(recorder))
    body = save_safetensors({"samples": images(2)}, metadata=metadata)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    try:
        connection.request("POST", "/score", body=body, headers={"Content-Length": str(len(body))})
        answer = connection.getresponse()
        status, error = answer.status, json.loads(answer.read())["error"]
    finally:
        connection.close()
    assert status == 400 and error.startswith("bad request:"), error
    assert recorder.sizes == []  # the reward never ran


@contextmanager
def fixed_answer_server(status: int, body: bytes, headers: dict[str, str] | None = None):
    """A plain HTTP server that answers every request with this status, headers and body; yields
    (base URL, list of the paths it was asked for)."""
    requested: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            requested.append(self.path)
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_client_refuses_redirects_and_never_quotes_the_target():
    secret = b"target body: internal-only data " * 100
    with fixed_answer_server(200, secret) as (target, target_requests):
        with fixed_answer_server(302, b"moved", {"Location": f"{target}/score"}) as (url, requests):
            with pytest.raises(RemoteRewardError, match=rf"GET /health to {url} was answered HTTP 302, a redirect to "
                                                        rf"'{target}/score': not followed"):
                RemoteReward(url, max_retries=3, **FAST)
            remote = RemoteReward(url, max_retries=3, use_health_check=False, **FAST)
            with pytest.raises(RemoteRewardError, match="HTTP 302") as caught:
                remote({"images": images(2)}, {})
            with pytest.raises(RemoteRewardError, match="HTTP 302"):  # the token never leaves for the target
                RemoteReward(url, max_retries=3, token="0123456789abcdef", **FAST)
    assert requests == ["/health", "/score", "/health"]  # one request each: a redirect is not retried
    assert target_requests == [] and "internal-only" not in str(caught.value)


@pytest.mark.parametrize("status", [400, 500])
@pytest.mark.parametrize("as_json", [True, False], ids=["json_error", "raw_body"])
def test_errors_quote_a_short_sanitised_excerpt_of_the_answer(status, as_json):
    text = "\x1b[31mred\x1b[0m\nline two\r\u202eevil " + "x" * 5000
    body = json.dumps({"error": text}).encode() if as_json else text.encode()
    with fixed_answer_server(status, body) as (url, _):
        with pytest.raises(RemoteRewardError) as caught:
            RemoteReward(url, max_retries=1, **FAST)
    message = str(caught.value)
    assert f"HTTP {status}" in message and "red?[0m?line two??evil xxx" in message and "x... (cut)" in message
    assert len(message) < 1000 and all(c.isprintable() for c in message), message
