"""Selection on a validation probe: the kept checkpoint is the best probe evaluation, and resume keeps it exactly.

Issue 21 item 5 and issue 22 item 3: the checkpoint reported beside the last one is chosen on a probe split,
never on the one the results report; its folder survives a crash and a resume bit-identically.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from diffgrpo.checkpoint_selection import best_in_history, load_selected, read_selected
from diffgrpo.config import GRPOConfig, OptimConfig, ProbeConfig, SelectionConfig
from diffgrpo.trainer import train_grpo
from tests.toy_task import ToyNet, ToyTask

METRIC = "metric/test/mse"


def _cfg(**kw) -> GRPOConfig:
    base = dict(num_iterations=6, conditions_per_iteration=2, group_size=4, micro_batch_size=8,
                rewards=("toy_closeness",), optim=OptimConfig(learning_rate=5e-2), checkpoint_every=1,
                probe=ProbeConfig(splits=("test",), conditions_per_split=4, noises_per_condition=2, eval_every=1),
                selection=SelectionConfig(metric=METRIC, mode="min"))
    base.update(kw)
    return GRPOConfig(**base)


def _model() -> ToyNet:
    torch.manual_seed(0)
    return ToyNet()


def _train(out, cfg=None, keep_model=False, **kw):
    """The toy run; returns its history, or with ``keep_model`` the trained model."""
    model = _model()
    history = train_grpo(ToyTask("ddim"), model, cfg or _cfg(), accelerator=Accelerator(cpu=True), output_dir=out,
                         **kw)
    return model if keep_model else history


def test_the_kept_checkpoint_is_the_best_probe_evaluation_and_holds_its_weights(tmp_path):
    history = _train(tmp_path)
    values, iterations = history[f"probe/{METRIC}"], history["probe/iteration"]
    assert len(values) == 7 and len(set(values)) > 1  # the probe before training and after every iteration
    best_at = min(range(len(values)), key=lambda i: (values[i], i))  # earliest of the lowest
    selected, extra = read_selected(tmp_path)
    assert (selected.iteration, selected.value) == (int(iterations[best_at]), values[best_at])
    assert extra["run_id"] and selected.metric == METRIC and selected.mode == "min"
    # the folder holds the weights of that iteration: those of the same run stopped there
    model, stopped = ToyNet(), tmp_path.parent / (tmp_path.name + "_stopped")
    load_selected(model, tmp_path)
    reference = _train(stopped, stop_after=selected.iteration, keep_model=True) if selected.iteration else _model()
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in model.state_dict().items())
    # a higher-is-better metric on the same evaluations picks the highest one instead
    highest = best_in_history(history, SelectionConfig(metric=METRIC, mode="max"))
    assert highest.value == max(values)


def test_a_resumed_run_keeps_the_same_selected_checkpoint_bit_identically(tmp_path):
    _train(tmp_path / "whole")
    _train(tmp_path / "crashed", stop_after=2)
    _train(tmp_path / "crashed", resume=True, stop_after=2)
    _train(tmp_path / "crashed", resume=True)
    whole, crashed = read_selected(tmp_path / "whole")[0], read_selected(tmp_path / "crashed")[0]
    assert whole == crashed
    assert ((tmp_path / "whole" / "best" / "model.safetensors").read_bytes()
            == (tmp_path / "crashed" / "best" / "model.safetensors").read_bytes())


def test_a_crash_between_the_checkpoint_and_its_selected_folder_is_repaired_on_resume(tmp_path):
    history = _train(tmp_path / "whole")
    selected = read_selected(tmp_path / "whole")[0]
    if selected.iteration < 2:
        pytest.skip("the toy run's best evaluation comes before the simulated crash")
    # the crashed run stopped right after the checkpoint of the best iteration; its best/ holds an older one
    _train(tmp_path / "crashed", stop_after=selected.iteration)
    (tmp_path / "crashed" / "best" / "selection.json").write_text(json.dumps(
        {"iteration": 0, "value": history[f"probe/{METRIC}"][0], "metric": METRIC, "mode": "min", "run_id": "x"}))
    _train(tmp_path / "crashed", resume=True)
    assert read_selected(tmp_path / "crashed")[0] == selected
    assert ((tmp_path / "whole" / "best" / "model.safetensors").read_bytes()
            == (tmp_path / "crashed" / "best" / "model.safetensors").read_bytes())


def test_an_unknown_metric_is_refused_before_training_naming_the_probe_keys(tmp_path):
    with pytest.raises(KeyError, match=r"metric/test/nope.*metric/test/mse"):
        _train(tmp_path, _cfg(selection=SelectionConfig(metric="metric/test/nope")))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(("kw", "named"), [
    (dict(selection=SelectionConfig(metric="metric/validation/mse")), "probe evaluates"),
    (dict(checkpoint_every=3, probe=ProbeConfig(splits=("test",), eval_every=2)), "multiple of"),
])
def test_selection_configs_that_cannot_work_are_refused(kw, named):
    with pytest.raises(ValueError, match=named):
        _cfg(**kw)
    with pytest.raises(ValueError, match="must read reward/<split>/<name>"):
        SelectionConfig(metric="mse")
