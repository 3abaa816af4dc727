import pytest
from torch import nn

from diffgrpo.modes import evaluation_mode


@pytest.mark.parametrize("training", [True, False])
def test_evaluation_mode_sets_eval_inside_and_restores_the_entry_mode(training):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(training)
    with evaluation_mode(model) as inside:
        assert inside is model and not model.training and not model[1].training
    assert model.training == training and model[1].training == training


def test_evaluation_mode_restores_the_mode_when_the_block_raises():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError, match="inside"), evaluation_mode(model):
        raise RuntimeError("inside")
    assert model.training and model[1].training
