"""Batches holding prompt strings, dict conditions, kept x0 steps, and configs of older checkpoints."""

from __future__ import annotations

import pytest
import torch

from diffgrpo.rng import make_generator
from diffgrpo.rollout import group_ids_for, rollout
from diffgrpo.run_state import check_resumable, with_added_fields
from diffgrpo.task import batch_size, batch_to, concat_rows, cond_rows, repeat_batch, select_rows
from tests.toy_task import ToyNet, ToyTask, toy_chain


def test_batch_helpers_treat_prompt_lists_like_tensor_rows():
    batch = {"prompt": ["a cat", "a dog"], "x": torch.tensor([[1.0], [2.0]])}
    assert batch_size(batch) == 2
    grouped = repeat_batch(batch, 3)
    assert grouped["prompt"] == ["a cat"] * 3 + ["a dog"] * 3
    assert grouped["x"].flatten().tolist() == [1.0] * 3 + [2.0] * 3
    moved = batch_to(grouped, "cpu")
    assert moved["prompt"] is grouped["prompt"] or moved["prompt"] == grouped["prompt"]
    rows = select_rows(grouped, torch.tensor([0, 4]))
    assert rows["prompt"] == ["a cat", "a dog"] and rows["x"].flatten().tolist() == [1.0, 2.0]
    parts = [select_rows(grouped, slice(0, 2)), select_rows(grouped, slice(2, 6))]
    joined = concat_rows(parts)
    assert joined["prompt"] == grouped["prompt"] and torch.equal(joined["x"], grouped["x"])


@pytest.mark.unchecked_annotations
def test_batch_helpers_reject_ragged_or_foreign_entries():
    with pytest.raises(ValueError, match="disagree"):
        batch_size({"prompt": ["a"], "x": torch.zeros(2)})
    with pytest.raises(TypeError, match="tensors and lists of strings"):
        repeat_batch({"meta": {"a": 1}}, 2)
    with pytest.raises(ValueError, match="disagree"):
        cond_rows({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)})


def test_dict_conditions_and_kept_x0_steps_in_rollout():
    task, model = ToyTask("ddim"), ToyNet()
    cond = task.encode_condition(task.load_examples("train", torch.arange(2))).repeat_interleave(2, 0)
    ids = group_ids_for(2, 2)

    def run(c, fn, steps):
        return rollout(fn, toy_chain(task), c, ids,
                       generator=make_generator(0, "x"), micro_batch_size=3,
                       x0_pred_steps=steps)

    full = run(cond, lambda x, t, c: model(x, t, c), None)
    named = run({"c": cond}, lambda x, t, c: model(x, t, c["c"]), (-1, 0))
    assert torch.equal(full.states, named.states)  # a dict condition is sliced into the same micro-batches
    assert named.x0_pred_steps == (0, task.num_steps - 1)
    assert torch.equal(named.x0_preds, full.x0_preds[:, [0, -1]])
    assert run(cond, lambda x, t, c: model(x, t, c), ()).x0_preds.shape == (4, 0, *task.sample_shape)
    with pytest.raises(ValueError, match="x0_pred_steps"):
        run(cond, lambda x, t, c: model(x, t, c), (task.num_steps,))


def test_checkpoints_of_older_configs_resume_when_new_fields_keep_their_old_behaviour():
    saved = {"seed": 0, "sampler": {"eta": 1.0}}  # written before guidance_scale, ema and rollout_chunks existed
    current = with_added_fields(saved)
    assert current["sampler"]["guidance_scale"] == 1.0 and current["rollout_chunks"] == 1
    check_resumable(saved, current, "old")
    changed = {**current, "sampler": {**current["sampler"], "guidance_scale": 4.5}}
    with pytest.raises(ValueError, match="guidance_scale"):
        check_resumable(saved, changed, "old")
