"""Two real processes (gloo on CPU) through `accelerate launch`: distinct groups, synced weights."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "two_rank_grpo.py"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_two_processes_draw_distinct_groups_and_stay_in_sync(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2  # really two ranks, not one silently
    assert set(r0["group_ids"].tolist()).isdisjoint(r1["group_ids"].tolist())
    assert set(r0["conditions"].tolist()).isdisjoint(r1["conditions"].tolist())
    for r in (r0, r1):  # shared within each group of 4
        x = r["x_T"].reshape(3, 4, -1)
        assert torch.equal(x, x[:, :1].expand_as(x))
    assert not torch.allclose(r0["x_T"], r1["x_T"])
    for key, value in r0["weights"].items():  # DDP kept the replicas identical
        assert torch.equal(value, r1["weights"][key]), key
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_000002"
    assert {p.name for p in (ckpt / "step_000002").iterdir()} == {"shared.safetensors", "rank_0.safetensors",
                                                                  "rank_1.safetensors"}
