"""Bad configurations and inputs fail early with a message that names the problem and the fix."""

import pytest
import torch
from accelerate import Accelerator

from diffgrpo.config import GRPOConfig, PerturbConfig, SamplerConfig
from diffgrpo.rewards import RewardSet
from diffgrpo.rollout import group_ids_for, make_generator, rollout
from diffgrpo.train_step import collect, make_perturber
from diffgrpo.trainer import train_grpo
from tests.toy_task import ToyNet, ToyTask


def test_unknown_reward_lists_the_known_ones(tmp_path):
    cfg = GRPOConfig(rewards=("toy_closness",), num_iterations=1)
    with pytest.raises(KeyError, match=r"toy_closness.*toy_closeness"):
        train_grpo(ToyTask(), ToyNet(), cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"rewards": ()}, "no rewards configured"),
])
def test_invalid_config_values(kwargs, message):
    base = {"rewards": ("toy_closeness",)}
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**{**base, **kwargs})


def test_negative_eta():
    with pytest.raises(ValueError, match="eta must be >= 0"):
        SamplerConfig(eta=-1.0)


def test_negative_perturbation_scale():
    with pytest.raises(ValueError, match="perturb.scale"):
        PerturbConfig(name="perlin", scale=-0.1)


def test_nan_condition_names_the_rows():
    task, cfg = ToyTask(), GRPOConfig(rewards=("toy_closeness",), group_size=2)
    batch = task.load_examples("train", torch.arange(3))
    batch["condition"][1] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\] holds NaN"):
        collect(task, ToyNet(), task.make_scheduler(), batch, cfg=cfg,
                rewards=RewardSet.from_specs({"toy_closeness": 1.0}), perturber=make_perturber(cfg),
                generator=make_generator(0), group_id_offset=0)


def test_wrong_condition_rows_for_rollout():
    task = ToyTask()
    cond = torch.zeros(5, 1)
    with pytest.raises(ValueError, match="expand the conditions"):
        rollout(lambda x, t, c: x, task.make_scheduler(), cond, group_ids_for(2, 2), task.sampling_timesteps(),
                task.sample_shape, generator=make_generator(0), sampler=SamplerConfig())


def test_bad_reward_weight_spec():
    from diffgrpo.trainer import parse_reward_specs

    with pytest.raises(ValueError, match="must be a number"):
        parse_reward_specs(("toy_closeness:heavy",))
