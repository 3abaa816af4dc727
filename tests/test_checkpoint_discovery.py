"""Which checkpoint a resume finds, what retention deletes, and what a damaged or non-finite checkpoint does.

Each example of issue 24 item 1 is one test here: a missing or dangling ``latest``, a pointer out of the
run, steps past 999,999, another run's checkpoints beside this one, truncated and empty files, and
non-finite weights or optimiser moments on the way into or out of a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from diffgrpo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def _model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).square().sum().backward()
    optimizer.step()  # Adam moments exist
    return model, optimizer


def _save(out: Path, *steps: int, keep_last: int = 0, **kw) -> Path:
    model, optimizer = _model_and_optimizer()
    accelerator = Accelerator(cpu=True)
    for step in steps:
        path = save_checkpoint(accelerator, out, step, model=model, optimizer=optimizer, keep_last=keep_last, **kw)
    return path


def _folders(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_missing_latest_resumes_from_the_newest_intact_checkpoint(tmp_path, caplog):
    """Issue 24: with ``latest`` gone, ``--resume`` started from iteration 0 beside intact checkpoints."""
    _save(tmp_path, 2, 3)
    (tmp_path / "checkpoints" / "latest").unlink()
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000003"
    assert "latest is missing" in caplog.text and "step_000002, step_000003" in caplog.text


def test_latest_naming_a_folder_without_its_shared_file_falls_back_with_a_warning(tmp_path, caplog):
    _save(tmp_path, 2, 3)
    (tmp_path / "checkpoints" / "step_000003" / "shared.safetensors").unlink()
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000002"
    assert "step_000003/shared.safetensors is missing" in caplog.text


def test_retention_orders_steps_by_number_past_step_999999(tmp_path):
    """Issue 24: by string order ``step_1000000`` sorted first, and retention deleted the newest checkpoint."""
    _save(tmp_path, 999_998, 999_999, 1_000_000, keep_last=2)
    assert _folders(tmp_path) == ["step_1000000", "step_999999"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_1000000"


def test_a_run_beside_newer_steps_of_another_run_keeps_its_own_checkpoint(tmp_path):
    """Issue 24: "keep the last 2 folder names" deleted each new checkpoint right after writing it."""
    _save(tmp_path, 3, 4)
    _save(tmp_path, 1, keep_last=2)
    assert _folders(tmp_path) == ["step_000001", "step_000003", "step_000004"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000001"


def test_retention_deletes_only_its_own_runs_older_steps(tmp_path):
    _save(tmp_path, 1, run_id="other")
    _save(tmp_path, 5, 6, 7, keep_last=2, run_id="this")
    assert _folders(tmp_path) == ["step_000001", "step_000006", "step_000007"]


@pytest.mark.parametrize("pointer", ["../../elsewhere/checkpoints/step_000007", "/tmp/step_000007", "step_7/..",
                                     "latest"])
def test_latest_is_followed_only_as_a_step_name_inside_the_run(tmp_path, pointer, caplog):
    """Issue 24: ``latest`` holding ``../../elsewhere/step_x`` was followed into another run."""
    _save(tmp_path / "elsewhere", 7)
    mine = tmp_path / "mine"
    _save(mine, 2)
    (mine / "checkpoints" / "latest").write_text(pointer)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(mine) == mine / "checkpoints" / "step_000002"
    assert "it is not followed" in caplog.text
    (mine / "checkpoints" / "step_000002" / "shared.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no intact checkpoint to resume"):
        latest_checkpoint(mine)


def _truncate(file: Path, how: str) -> None:
    data = file.read_bytes()
    file.write_bytes(b"" if how == "empty" else data[: len(data) // 2])


@pytest.mark.parametrize("how", ["empty", "truncated"])
@pytest.mark.parametrize("file", ["shared.safetensors", "rank_0.safetensors"])
def test_a_damaged_file_names_itself_and_the_previous_intact_checkpoint(tmp_path, how, file, caplog):
    """Issue 24: a truncated or empty file gave the raw safetensors error, no path, no word of step 2."""
    _save(tmp_path, 2, 3)
    damaged = tmp_path / "checkpoints" / "step_000003" / file
    _truncate(damaged, how)
    model, optimizer = _model_and_optimizer(seed=1)
    before = _weights(model)
    with pytest.raises(ValueError, match=rf"{damaged} is damaged.*previous intact checkpoint is .*step_000002"):
        load_checkpoint(Accelerator(cpu=True), damaged.parent, model=model, optimizer=optimizer)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing restored
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000002"
    assert str(damaged) in caplog.text


@pytest.mark.parametrize(("where", "named"), [("weight", "weight 0.weight"),
                                              ("moment", "optimiser state exp_avg_sq of 2.bias")])
def test_a_checkpoint_with_non_finite_weights_or_moments_is_never_written(tmp_path, where, named):
    """Issue 24: a NaN weight and NaN Adam moments were saved as ``latest``."""
    model, optimizer = _model_and_optimizer()
    accelerator = Accelerator(cpu=True)
    save_checkpoint(accelerator, tmp_path, 1, model=model, optimizer=optimizer)
    with torch.no_grad():
        if where == "weight":
            model[0].weight[1, 2] = float("nan")
        else:
            optimizer.state[model[2].bias]["exp_avg_sq"][0] = float("inf")
    with pytest.raises(ValueError, match=rf"not writing .*step_000002: non-finite {named} \(1 of"):
        save_checkpoint(accelerator, tmp_path, 2, model=model, optimizer=optimizer)
    assert _folders(tmp_path) == ["step_000001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000001"


def test_non_finite_weights_in_a_checkpoint_are_refused_on_load_before_anything_is_restored(tmp_path):
    _save(tmp_path, 2, 3)
    shared = tmp_path / "checkpoints" / "step_000003" / "shared.safetensors"
    with safe_open(str(shared), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(shared))
    tensors["model.0.weight"][0, 0] = float("inf")
    save_file(tensors, str(shared), metadata=metadata)
    model, optimizer = _model_and_optimizer(seed=1)
    before = _weights(model)
    with pytest.raises(ValueError, match=r"non-finite weight 0\.weight \(1 of 12 values\).*step_000002"):
        load_checkpoint(Accelerator(cpu=True), shared.parent, model=model, optimizer=optimizer)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _Crash(BaseException):
    """Stands for kill -9: nothing after it runs (BaseException: no ``except Exception`` catches it)."""


@pytest.mark.parametrize("crash_at", range(7))
def test_a_crash_at_any_file_operation_of_a_save_leaves_a_resumable_checkpoint(tmp_path, monkeypatch, crash_at):
    """Interrupt the n-th rename or removal of a save (6 of them, with retention's; 6 = no crash): the resume
    then finds an intact checkpoint, the old one or the new one, that restores the saved weights exactly;
    the next save cleans up after the crash."""
    from diffgrpo.checkpoint_discovery import checkpoint_problem, checkpoint_steps

    model, optimizer = _model_and_optimizer()
    accelerator = Accelerator(cpu=True)
    saved = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        saved[step] = _weights(model)
        if step < 3:
            save_checkpoint(accelerator, tmp_path, step, model=model, optimizer=optimizer, keep_last=2)

    calls = {"n": 0}

    def interrupting(real):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == crash_at + 1:
                raise _Crash
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(os, "replace", interrupting(os.replace))
    monkeypatch.setattr(shutil, "rmtree", interrupting(shutil.rmtree))
    with contextlib.suppress(_Crash):
        save_checkpoint(accelerator, tmp_path, 3, model=model, optimizer=optimizer, keep_last=2)
    monkeypatch.undo()
    assert calls["n"] == min(crash_at + 1, 6)
    fresh, fresh_optimizer = _model_and_optimizer(seed=5)
    step = load_checkpoint(accelerator, latest_checkpoint(tmp_path), model=fresh, optimizer=fresh_optimizer).step
    assert step == (3 if crash_at >= 4 else 2)  # the pointer moves at the 4th operation (crash_at 3)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in saved[step].items())
    newest_intact = [p.name for p in checkpoint_steps(tmp_path) if checkpoint_problem(p) is None][-1]
    save_checkpoint(accelerator, tmp_path, 4, model=model, optimizer=optimizer, keep_last=2)
    assert [p.name for p in checkpoint_steps(tmp_path)] == [newest_intact, "step_000004"]
    assert not list((tmp_path / "checkpoints").glob("*.deleting"))
