"""The reward server's bounds on its peers: the token, strict Content-Length, bodies admitted before
they are read, the connection cap and read time-out, the limits from every entry point, and a
SIGTERM that ends the server cleanly at any instant. Waits poll the server's state with deadlines."""

from __future__ import annotations

import hmac
import http.client
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

import diffgrpo.reward_server as reward_server
from diffgrpo.remote_reward import TOKEN_ENV, RemoteReward, RemoteRewardError, encode_request
from diffgrpo.reward_server import RewardHTTPServer, ServerLimits, read_token, serve, serve_in_background
from diffgrpo.rewards import get_reward
from tasks.text_to_image import rewards as t2i_rewards  # noqa: F401  (registers the JPEG rewards)
from tests.test_remote_reward import Recorder, images

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "0123456789abcdef0123456789abcdef"
FAST = {"backoff_s": 0.01}


def mean_reward(samples, batch):
    return samples["images"].mean(dim=(1, 2, 3))


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


@contextmanager
def running(server: RewardHTTPServer) -> Iterator[RewardHTTPServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def raw_request(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
    """Send exactly these headers (http.client adds no Content-Length of its own) -> (status, JSON answer)."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            connection.putheader(key, value)
        connection.endheaders(body or None)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def test_a_token_is_required_checked_in_constant_time_and_4xx_is_not_retried(monkeypatch):
    compared = []
    real_compare = hmac.compare_digest
    monkeypatch.setattr(reward_server.hmac, "compare_digest", lambda a, b: compared.append(1) or real_compare(a, b))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    recorder = Recorder(mean_reward)
    decoded = {"images": images(3)}
    with serve_in_background(recorder, token=TOKEN) as url:
        assert torch.equal(RemoteReward(url, token=TOKEN)(decoded, {}), mean_reward(decoded, {}))
        assert compared  # the token went through hmac.compare_digest
        for token in (None, TOKEN[:-1] + "0", TOKEN + "0"):
            with pytest.raises(RemoteRewardError, match=f"refused with HTTP 401.*pass the server's token as token= "
                                                        f"or in {TOKEN_ENV}"):
                RemoteReward(url, token=token, max_retries=3, **FAST)  # the health check
        with pytest.raises(RemoteRewardError, match="HTTP 401"):
            RemoteReward(url, use_health_check=False, max_retries=3, **FAST)(decoded, {})
        status, answer = raw_request(url, "GET", "/health", headers={"Authorization": f"Basic {TOKEN}"})
        assert status == 401 and "Bearer" in answer["error"]
        monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the client's fallback when token= is not given
        assert RemoteReward(url).check()["reward"] == "reward"
    assert recorder.sizes == [3]  # only the authorised request reached the reward
    with pytest.raises(ValueError, match="visible ASCII"):
        RewardHTTPServer(mean_reward, port=0, token="two words")


def test_the_server_reads_its_token_from_a_file_or_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_token(None) is None
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    assert read_token(tmp_path / "token") == TOKEN
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert read_token(None) == "from-env"
    with pytest.raises(SystemExit, match=f"both --token-file and {TOKEN_ENV}"):
        read_token(tmp_path / "token")
    monkeypatch.delenv(TOKEN_ENV)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit, match="is empty"):
        read_token(tmp_path / "empty")


def test_binding_beyond_loopback_without_a_token_warns(caplog):
    caplog.set_level(logging.WARNING, logger="diffgrpo.reward_server")
    for host, token, warned in [("127.0.0.1", None, False), ("0.0.0.0", TOKEN, False), ("0.0.0.0", None, True)]:
        caplog.clear()
        RewardHTTPServer(mean_reward, host=host, port=0, token=token).server_close()
        assert any("WITHOUT a token" in r.getMessage() for r in caplog.records) == warned, (host, token)


@pytest.mark.parametrize(("value", "status"), [("\u00b2", 400), ("5" * 5000, 413), ("-1", 400), ("0x10", 400),
                                               ("", 400), ("99999999999999999999", 413)],
                         ids=["superscript_two", "5000_digits", "negative", "hex", "empty", "20_digits"])
def test_a_malformed_content_length_is_answered(value, status):
    recorder = Recorder(mean_reward)
    with serve_in_background(recorder) as url:
        got, answer = raw_request(url, "POST", "/score", b"", {"Content-Length": value})
    assert got == status and ("Content-Length" in answer["error"] or "max_request_bytes" in answer["error"])
    assert recorder.sizes == []


def test_two_content_lengths_and_a_missing_one_are_refused():
    body = encode_request({"images": images(1)}, {}, ())
    with serve_in_background(mean_reward) as url:
        assert raw_request(url, "POST", "/score", body, {"Content-Length": str(len(body))})[0] == 200
        two = [("Content-Length", str(len(body))), ("Content-Length", "1")]
        address = urllib.parse.urlsplit(url)
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            head = "".join(f"{k}: {v}\r\n" for k, v in two)
            sock.sendall(f"POST /score HTTP/1.0\r\n{head}\r\n".encode() + body)
            assert sock.makefile("rb").readline().split()[1] == b"400"
        assert raw_request(url, "POST", "/score", body)[0] == 411


def test_a_mapping_body_without_samples_is_a_400_and_not_retried():
    recorder = Recorder(mean_reward)
    metadata = {"diffgrpo_protocol": "1", "num_samples": "2", "samples_layout": "mapping", "batch_strings": "{}"}
    body = save_safetensors({"batch/t": torch.zeros(2)}, metadata=metadata)
    with serve_in_background(recorder) as url:
        status, answer = raw_request(url, "POST", "/score", body, {"Content-Length": str(len(body))})
        assert status == 400 and "at least one 'samples/<key>' tensor" in answer["error"], answer
        with pytest.raises(ValueError, match="got 0 samples"):
            RemoteReward(url, max_retries=3, **FAST)({"images": images(0)}, {})
    assert recorder.sizes == []


def test_bodies_wait_for_room_before_they_are_read(monkeypatch):
    """8 concurrent requests, room for 2 bodies: 2 are read and decoded, 6 wait unread, all are scored."""
    decoded_count = []
    real_decode = reward_server.decode_request
    monkeypatch.setattr(reward_server, "decode_request", lambda body: decoded_count.append(1) or real_decode(body))
    release = threading.Event()
    recorder = Recorder(mean_reward, before=lambda call: release.wait(10))
    decoded = {"images": images(8)}
    body_bytes = len(encode_request({"images": images(1)}, {}, ()))
    limits = ServerLimits(max_request_bytes=body_bytes, max_bytes_in_flight=2 * body_bytes, queue_timeout_s=20.0)
    with running(RewardHTTPServer(recorder, port=0, limits=limits)) as server:
        remote = RemoteReward(server.url, batch_size=1, max_concurrency=8, max_retries=0)
        result: queue.Queue = queue.Queue()
        caller = threading.Thread(target=lambda: result.put(remote(decoded, {})), daemon=True)
        caller.start()
        wait_until(lambda: server.budget.num_waiting == 6 and len(recorder.sizes) == 1, "6 requests waiting")
        assert len(decoded_count) == 2 and server.budget.used == 2 * body_bytes  # 1 scoring, 1 decoded and waiting
        release.set()
        assert torch.equal(result.get(timeout=20), mean_reward(decoded, {}))
    assert server.budget.peak == 2 * body_bytes and len(decoded_count) == 8 and recorder.sizes == [1] * 8


def test_a_full_budget_answers_503_after_the_queue_timeout_and_the_client_retries():
    release = threading.Event()
    recorder = Recorder(mean_reward, before=lambda call: release.wait(10) if call == 0 else None)
    body_bytes = len(encode_request({"images": images(1)}, {}, ()))
    limits = ServerLimits(max_request_bytes=body_bytes, max_bytes_in_flight=body_bytes, queue_timeout_s=0.2)
    with running(RewardHTTPServer(recorder, port=0, limits=limits)) as server:
        blocked = threading.Thread(target=RemoteReward(server.url, max_retries=0), args=({"images": images(1)}, {}),
                                   daemon=True)
        blocked.start()
        wait_until(lambda: len(recorder.sizes) == 1, "the first request to reach the reward")
        status, answer = raw_request(server.url, "POST", "/score", encode_request({"images": images(1)}, {}, ()),
                                     {"Content-Length": str(body_bytes)})
        assert status == 503 and "max_bytes_in_flight" in answer["error"]
        with pytest.raises(RemoteRewardError, match="HTTP 503.*on all 2 attempt"):
            RemoteReward(server.url, max_retries=1, **FAST)({"images": images(1)}, {})
        release.set()
        blocked.join(10)
    assert recorder.sizes == [1]


def test_stalled_connections_are_capped_dropped_after_the_timeout_and_a_real_client_is_served():
    limits = ServerLimits(max_connections=4, read_timeout_s=0.5)
    decoded = {"images": images(2)}
    with running(RewardHTTPServer(mean_reward, port=0, limits=limits)) as server:
        address = urllib.parse.urlsplit(server.url)
        opened = time.monotonic()
        stalled = [socket.create_connection((address.hostname, address.port), timeout=10) for _ in range(4)]
        wait_until(lambda: server.open_connections == 4, "4 stalled connections to take every slot")
        refused = [socket.create_connection((address.hostname, address.port), timeout=10) for _ in range(6)]
        for sock in refused:  # answered at once, without a thread
            assert sock.makefile("rb").readline().split()[1] == b"503"
        remote = RemoteReward(server.url, max_retries=8, backoff_s=0.05)  # served once the stalled ones are dropped
        assert torch.equal(remote(decoded, {}), mean_reward(decoded, {}))
        for sock in stalled:
            assert sock.recv(1) == b""  # closed by the server
        assert time.monotonic() - opened >= 0.45  # not before read_timeout_s
        wait_until(lambda: server.open_connections == 0, "every connection to be closed")
        for sock in stalled + refused:
            sock.close()


def test_a_client_stalled_mid_body_is_dropped_and_its_bytes_released():
    recorder = Recorder(mean_reward)
    limits = ServerLimits(read_timeout_s=0.3)
    with running(RewardHTTPServer(recorder, port=0, limits=limits)) as server:
        address = urllib.parse.urlsplit(server.url)
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            wait_until(lambda: server.budget.used == 1000, "the body to be admitted")
            assert sock.recv(1) == b""  # dropped after read_timeout_s, with no answer
        wait_until(lambda: server.budget.used == 0 and server.open_connections == 0, "the bytes to be released")
    assert recorder.sizes == []


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_connections"):
        ServerLimits(max_connections=0)
    with pytest.raises(ValueError, match="read_timeout_s"):
        ServerLimits(read_timeout_s=float("inf"))
    with pytest.raises(ValueError, match="could never be admitted"):
        ServerLimits(max_request_bytes=2**20, max_bytes_in_flight=2**19)


def test_sigterm_at_the_first_instant_stops_serve_cleanly(caplog):
    """The signal lands while the start-up line is being logged, the instant that escaped as a
    KeyboardInterrupt traceback before."""

    class SignalOnStartup(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("serving reward"):
                signal.raise_signal(signal.SIGTERM)

    handler = SignalOnStartup()
    logging.getLogger("diffgrpo.reward_server").addHandler(handler)
    caplog.set_level(logging.INFO, logger="diffgrpo.reward_server")
    before = signal.getsignal(signal.SIGTERM)
    try:
        serve(mean_reward, port=0)
    except KeyboardInterrupt:
        pytest.fail("SIGTERM escaped serve() as KeyboardInterrupt")
    finally:
        logging.getLogger("diffgrpo.reward_server").removeHandler(handler)
    assert any(r.getMessage().startswith("stopping the reward server") for r in caplog.records)
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_while_the_command_line_loads_the_reward_exits_with_status_0(monkeypatch):
    def loading(*args):
        signal.raise_signal(signal.SIGTERM)  # arrives while the reward model loads
        raise AssertionError("the signal did not stop the start-up")

    monkeypatch.setattr(reward_server, "reward_from_args", loading)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        reward_server.main(["--reward", "jpeg_compressibility", "--port", "0"])
    assert stopped.value.code == 0 and signal.getsignal(signal.SIGTERM) is before


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc")
def test_the_command_line_server_under_a_descriptor_limit(tmp_path):
    """66 stalled sockets under a 64-descriptor limit: no busy loop, a real client is served, the
    limits and the token come from the command line, and SIGTERM ends it with status 0."""
    (tmp_path / "token").write_text(TOKEN)
    limit_then_serve = ("import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
                        "runpy.run_module('diffgrpo.reward_server', run_name='__main__', alter_sys=True)")
    command = [sys.executable, "-c", limit_then_serve, "--import", "tasks.text_to_image.rewards",
               "--reward", "jpeg_compressibility", "--port", "0", "--read-timeout-s", "1",
               "--max-request-bytes", "100000", "--token-file", str(tmp_path / "token")]
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV} | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []
    threading.Thread(target=lambda: [(lines.put(line), log.append(line)) for line in process.stderr],
                     daemon=True).start()
    stalled = []
    try:
        line = ""
        while "serving reward" not in line:
            line = lines.get(timeout=60)
        url = re.search(r"at (http://\S+) ", line).group(1)
        address = urllib.parse.urlsplit(url)
        for _ in range(66):
            stalled.append(socket.create_connection((address.hostname, address.port), timeout=10))
        cpu_before, wall_before = cpu_seconds(process.pid), time.monotonic()
        decoded = {"images": images(2)}
        remote = RemoteReward(url, token=TOKEN, max_retries=10, backoff_s=0.05)
        assert torch.equal(remote(decoded, {}), get_reward("jpeg_compressibility")(decoded, {}))
        busy = (cpu_seconds(process.pid) - cpu_before) / (time.monotonic() - wall_before)
        assert busy < 0.5, f"the server used {busy:.0%} of a core while waiting for descriptors"
        with pytest.raises(RemoteRewardError, match="HTTP 413.*max_request_bytes=100000"):
            RemoteReward(url, token=TOKEN, batch_size=100)({"images": images(100)}, {})
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        for sock in stalled:
            sock.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    text = "".join(log)
    assert "Traceback" not in text and "can exceed this process's limit of 64 open files" in text, text[-3000:]
    assert "cannot accept a connection" in text  # the descriptor limit was reached: the no-spin path ran
