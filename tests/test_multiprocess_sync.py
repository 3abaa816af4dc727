"""Two real processes (gloo on CPU): every rank runs the same collectives, and replicas stay identical.

Each test launches a script under ``accelerate launch --multi_gpu --num_processes 2`` in its own
process group with a timeout, so a rank stuck in a collective fails the test instead of blocking it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")]


def launch_two_ranks(script: Path, *args: str, log: Path, timeout: float = 90.0) -> None:
    """Run ``script`` on 2 CPU ranks; fail on a non-zero exit, or after ``timeout`` s with every rank ended.

    The ranks run in sessions of their own (torch elastic starts them so), out of reach of a
    process-group kill: on timeout the launcher gets SIGTERM, which it passes on to the ranks.
    Output goes to ``log``, not a pipe, so a rank that outlives its launcher cannot block the test.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"{script.name} did not finish within {timeout:.0f} s (a rank stuck in a collective?):\n"
                        f"{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{key}: replicas differ by {float((value - b[key]).abs().max()):.3g}"


def test_rank_dependent_dropped_groups_finish_with_identical_replicas(tmp_path):
    """zero_std_policy='drop' empties whole micro-batches on some ranks only (see the script's docstring)."""
    launch_two_ranks(SCRIPTS / "two_rank_dropped_groups.py", str(tmp_path), log=tmp_path / "log.txt")
    half = 8  # rows of the first micro-batch
    for scenario, dropped in {"one_rank": (True, False), "both_ranks": (True, True),
                              "whole_rank": (False, None)}.items():
        r0, r1 = (torch.load(tmp_path / f"{scenario}_rank{r}.pt") for r in (0, 1))
        assert r0["world"] == r1["world"] == 2
        for r, last_dropped in zip((r0, r1), dropped, strict=True):  # the scenario really happened
            if last_dropped is None:
                assert not r["mask"].any()
            else:
                assert r["mask"][:half].all() and r["mask"][half:].all() == (not last_dropped)
        assert_same_tensors(r0["weights"], r1["weights"])
        assert r0["history"] == r1["history"]


def test_perceptual_model_stays_identical_across_ranks(tmp_path):
    """Each rank trains the perceptual model on its own batch; averaged gradients keep the replicas bit-identical."""
    launch_two_ranks(SCRIPTS / "two_rank_perceptual.py", str(tmp_path), log=tmp_path / "log.txt")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert_same_tensors(r0["initial"], r1["initial"])  # the seed gives one initialisation
    assert r0["losses"] != r1["losses"]  # the ranks really trained on different batches
    assert_same_tensors(r0["state"], r1["state"])  # weights and AdamW moments
    for r in (r0, r1):  # a replica knocked out of step is caught on every rank
        assert "differ across processes" in r["drift_error"]


def test_checkpoint_of_a_sharded_model_is_full_and_resumes_exactly(tmp_path):
    """Under FSDP every rank must take part in state_dict(): saving from rank 0 alone hangs or saves shards."""
    launch_two_ranks(SCRIPTS / "two_rank_fsdp_checkpoint.py", str(tmp_path), log=tmp_path / "log.txt")
    result = torch.load(tmp_path / "result.pt")
    assert result["world"] == 2 and result["step"] == 3
    assert_same_tensors(result["saved"], result["at_save"])  # full tensors, not rank 0's shards
    assert_same_tensors(result["after_resume"], result["straight"])  # weights and AdamW moments restored
