"""Load test of the reward server on loopback: memory against the number of clients, stalled clients.

Why: ``diffgrpo.reward_server`` admits a request body only when it fits in ``max_bytes_in_flight``,
before reading it, caps open connections and drops a client that sends nothing for
``read_timeout_s``. This checks the three claims of ``docs/remote_rewards.md`` on a real server
process (Linux: it reads /proc):

1. memory: k clients (k = 1 ... 32) each POST one body of ``body_mib`` MiB at once to a reward that
   sleeps ``reward_sleep_s``; the server's peak RSS (VmHWM, reset before each k) above its idle RSS
   should stay flat once k bodies exceed ``max_bytes_in_flight`` (2 bodies here). It is measured
   twice: with glibc's malloc defaults (the server calls ``malloc_trim`` after each large body), and
   with ``MALLOC_MMAP_THRESHOLD_=1048576`` in the server's environment, which makes every body an
   mmap of its own that goes back to the operating system when freed;
2. stalled clients: ``num_stalled`` sockets that connect and send nothing, more than
   ``max_connections``: each must be closed by the server (after ``read_timeout_s`` for those holding
   a slot, at once with a 503 for the others);
3. meanwhile a real client (``RemoteReward``, default retries) scores small batches back to back for
   ``real_client_s`` seconds: every call must succeed.

    python recipes/benchmarks/load_reward_server.py                   # prints a markdown report
    python recipes/benchmarks/load_reward_server.py --output load.md  # also writes it to load.md
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

from diffgrpo.remote_reward import RemoteReward, encode_request
from diffgrpo.reward_server import ServerLimits, serve

MiB = 2**20


@dataclass(frozen=True)
class Config:
    """Load-test settings; the server's limits are set from them (see the module docstring)."""

    body_mib: int = 24
    """Size of each client's request body (float32 images), MiB."""
    client_counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Numbers of concurrent clients of the memory test."""
    reward_sleep_s: float = 0.05
    """Time the reward takes per call."""
    max_connections: int = 16
    read_timeout_s: float = 1.0
    num_stalled: int = 40
    """Sockets that connect and send nothing (more than max_connections)."""
    real_client_s: float = 4.0
    """How long the real client scores while the stalled sockets are open."""
    output: Path | None = None
    """Also write the markdown report here."""
    role: Literal["bench", "server"] = "bench"
    """Internal: 'server' runs the server process that the benchmark starts."""
    port: int = 0


def sleepy_mean(sleep_s: float):
    """A reward that takes ``sleep_s`` seconds and little memory: the mean of each image."""

    def reward(samples, batch):
        time.sleep(sleep_s)
        return samples["images"].float().mean(dim=(1, 2, 3))

    return reward


def server_limits(cfg: Config) -> ServerLimits:
    body = cfg.body_mib * MiB + MiB  # the safetensors header and metadata
    return ServerLimits(max_connections=cfg.max_connections, read_timeout_s=cfg.read_timeout_s,
                        max_request_bytes=body, max_bytes_in_flight=2 * body)


def images_of(mib: int) -> dict[str, torch.Tensor]:
    side = 512
    n = max(1, mib * MiB // (3 * side * side * 4))
    return {"images": torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0))}


def rss_kib(pid: int, field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))


def post_until_scored(url: str, body: bytes) -> int:
    """POST one body, retrying 503 and dropped connections; returns the number of 503s seen."""
    address = urllib.parse.urlsplit(url)
    refusals = 0
    while True:
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
        try:
            connection.request("POST", "/score", body=body, headers={"Content-Length": str(len(body))})
            status = connection.getresponse().status
        except (ConnectionError, http.client.HTTPException):
            status = 503
        finally:
            connection.close()
        if status == 200:
            return refusals
        if status != 503:
            raise RuntimeError(f"the server answered HTTP {status}")
        refusals += 1
        time.sleep(0.02)


def memory_test(cfg: Config, url: str, pid: int) -> list[dict]:
    body = encode_request(images_of(cfg.body_mib), {}, ())
    idle_kib = rss_kib(pid, "VmRSS")
    rows = []
    for k in cfg.client_counts:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        refusals: list[int] = []
        start = time.perf_counter()
        threads = [threading.Thread(target=lambda found=refusals: found.append(post_until_scored(url, body)))
                   for _ in range(k)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rows.append({"clients": k, "body_mib": round(len(body) / MiB, 1), "seconds": time.perf_counter() - start,
                     "peak_rss_above_idle_mib": (rss_kib(pid, "VmHWM") - idle_kib) / 1024,
                     "http_503_retried": sum(refusals)})
    return rows


def stalled_test(cfg: Config, url: str) -> dict:
    address = urllib.parse.urlsplit(url)
    opened = time.monotonic()
    stalled = [socket.create_connection((address.hostname, address.port), timeout=30) for _ in range(cfg.num_stalled)]
    closed_after: list[float] = []
    answered_503 = []

    def watch(sock: socket.socket) -> None:
        first = sock.recv(64)  # b"" when closed without an answer
        answered_503.append(first.startswith(b"HTTP/1.0 503"))
        while sock.recv(4096):
            pass
        closed_after.append(time.monotonic() - opened)

    watchers = [threading.Thread(target=watch, args=(sock,), daemon=True) for sock in stalled]
    for watcher in watchers:
        watcher.start()
    remote = RemoteReward(url, use_health_check=False)  # default timeout_s and retries
    decoded = images_of(1)
    latencies, failures = [], []
    while time.monotonic() - opened < cfg.real_client_s:
        start = time.perf_counter()
        try:
            remote(decoded, {})
            latencies.append(time.perf_counter() - start)
        except Exception as err:  # counted and reported, never hidden
            failures.append(repr(err)[:200])
    for watcher in watchers:
        watcher.join(timeout=2 * cfg.read_timeout_s + 5)
    for sock in stalled:
        sock.close()
    held = [t for t, refused in zip(closed_after, answered_503, strict=True) if not refused]
    return {"stalled": cfg.num_stalled, "answered_503_at_once": sum(answered_503),
            "closed_by_server": len(closed_after), "held_closed_after_s": [round(min(held, default=0), 2),
                                                                          round(max(held, default=0), 2)],
            "real_calls_ok": len(latencies), "real_calls_failed": len(failures), "failures": failures[:3],
            "real_call_max_s": round(max(latencies, default=0.0), 3)}


def report(cfg: Config, runs: dict[str, list[dict]], stalled: dict) -> str:
    limits = server_limits(cfg)
    lines = [f"Server limits: max_connections={limits.max_connections}, read_timeout_s={limits.read_timeout_s}, "
             f"max_bytes_in_flight={limits.max_bytes_in_flight / MiB:.0f} MiB (2 bodies), max_concurrent_calls=1; "
             f"reward sleeps {cfg.reward_sleep_s} s per call; body {runs['defaults'][0]['body_mib']} MiB.", "",
             "| concurrent clients | peak RSS above idle, malloc defaults (MiB) | same, MALLOC_MMAP_THRESHOLD_=1 MiB "
             "(MiB) | wall time (s) | 503s retried |", "|---|---|---|---|---|"]
    for default, fixed in zip(runs["defaults"], runs["mmap_threshold_1MiB"], strict=True):
        lines.append(f"| {default['clients']} | {default['peak_rss_above_idle_mib']:.0f} | "
                     f"{fixed['peak_rss_above_idle_mib']:.0f} | {default['seconds']:.2f} / {fixed['seconds']:.2f} | "
                     f"{default['http_503_retried']} / {fixed['http_503_retried']} |")
    lines += ["", f"Stalled clients (malloc defaults): {stalled['stalled']} sockets that send nothing; "
              f"{stalled['answered_503_at_once']} answered 503 at once, {stalled['closed_by_server']} closed by the "
              f"server in all, those holding a slot after {stalled['held_closed_after_s'][0]}-"
              f"{stalled['held_closed_after_s'][1]} s. Real client meanwhile: {stalled['real_calls_ok']} calls "
              f"succeeded, {stalled['real_calls_failed']} failed, slowest {stalled['real_call_max_s']} s."]
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> None:
    torch.set_num_threads(1)
    if cfg.role == "server":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        serve(sleepy_mean(cfg.reward_sleep_s), name="sleepy_mean", port=cfg.port, limits=server_limits(cfg))
        return
    command = [sys.executable, __file__, "--role", "server", "--body-mib", str(cfg.body_mib), "--reward-sleep-s",
               str(cfg.reward_sleep_s), "--max-connections", str(cfg.max_connections), "--read-timeout-s",
               str(cfg.read_timeout_s)]
    runs: dict[str, list[dict]] = {}
    for setting, malloc_env in (("defaults", {}), ("mmap_threshold_1MiB", {"MALLOC_MMAP_THRESHOLD_": str(MiB)})):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | malloc_env
        server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env | {"OMP_NUM_THREADS": "1"})
        try:
            line = ""
            while "serving reward" not in line:
                line = server.stderr.readline()
                if not line:
                    raise RuntimeError("the server process ended before serving")
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep its pipe drained
            url = re.search(r"at (http://\S+) ", line).group(1)
            runs[setting] = memory_test(cfg, url, server.pid)
            if setting == "defaults":
                stalled = stalled_test(cfg, url)
        finally:
            server.terminate()
            if server.wait(timeout=30) != 0:
                raise RuntimeError(f"the server exited with status {server.returncode} on SIGTERM")
    text = report(cfg, runs, stalled)
    print(text)
    print(json.dumps({"memory": runs, "stalled": stalled}))
    if cfg.output is not None:
        cfg.output.write_text(text)


if __name__ == "__main__":
    main(tyro.cli(Config))
