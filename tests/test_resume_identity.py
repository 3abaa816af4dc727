"""Who may write into a run's folder and continue it: the start-over rule, the run fingerprint, the iteration count.

Issue 24 items 1-2: a new run in a folder holding another run's checkpoints, another data set, another
chain or another job setting on resume, and ``--iterations`` below the checkpoint's step were all accepted.
"""

from __future__ import annotations

import pytest
from accelerate import Accelerator

from diffgrpo.config import GRPOConfig, OptimConfig
from diffgrpo.trainer import train_grpo
from tests.toy_task import ToyNet, ToyTask


def _cfg(**kw) -> GRPOConfig:
    base = dict(num_iterations=2, conditions_per_iteration=2, group_size=2, micro_batch_size=4,
                rewards=("toy_closeness",), optim=OptimConfig(learning_rate=1e-3), checkpoint_every=1)
    base.update(kw)
    return GRPOConfig(**base)


def _train(out, cfg=None, task=None, **kw):
    return train_grpo(task or ToyTask("ddim"), ToyNet(), cfg or _cfg(), accelerator=Accelerator(cpu=True),
                      output_dir=out, **kw)


def test_a_run_that_does_not_resume_refuses_a_folder_holding_checkpoints(tmp_path):
    """Issue 24: a new run beside another run's checkpoints was not refused, and destroyed them."""
    _train(tmp_path, stop_after=1)
    before = (tmp_path / "checkpoints" / "step_000001" / "shared.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"already holds checkpoints \(step_000001\).*--resume.*overwrite-output-dir"):
        _train(tmp_path)
    assert (tmp_path / "checkpoints" / "step_000001" / "shared.safetensors").read_bytes() == before
    history = _train(tmp_path, _cfg(overwrite_output_dir=True), stop_after=1)  # told to start over
    assert len(history["reward/toy_closeness/all"]) == 1  # from iteration 0, the old checkpoints gone


@pytest.mark.parametrize(("first", "then", "named"), [
    ({}, dict(task=ToyTask("ddim", seed=1)), "examples_sha256"),                         # another data set
    ({}, dict(task=ToyTask("ddim", num_steps=4)), "timesteps"),                         # another chain (K)
    ({"fingerprint": {"omega_vis": 1.0}}, {"fingerprint": {"omega_vis": 2.0}}, "omega_vis"),  # a reward's setting
])
def test_resume_under_another_fingerprint_is_refused_naming_it(tmp_path, first, then, named):
    """Issue 24: another data set, --omega-vis and --rollout-sampling-steps were accepted silently on resume."""
    _train(tmp_path, stop_after=1, **first)
    with pytest.raises(ValueError, match=rf"different configuration.*{named}"):
        _train(tmp_path, resume=True, **then)
    history = _train(tmp_path, resume=True, **first)  # the same fingerprint resumes
    assert len(history["reward/toy_closeness/all"]) == 2


def test_fewer_iterations_than_the_checkpoint_holds_are_refused(tmp_path):
    """Issue 24: --iterations 3 on a step-4 checkpoint finished at once and reported a 3-iteration run."""
    _train(tmp_path, _cfg(num_iterations=3))
    with pytest.raises(ValueError, match=r"num-iterations 2 is below the 3 iterations"):
        _train(tmp_path, _cfg(num_iterations=2), resume=True)


def test_the_fingerprint_holds_task_data_chain_and_job(tmp_path):
    from diffgrpo.chain import SamplingChain
    from diffgrpo.config import SamplerConfig
    from diffgrpo.run_state import run_record

    task = ToyTask("ddim")
    record = run_record(_cfg(), SamplingChain.of(task, SamplerConfig()), task, job={"omega_vis": 1.0})
    assert record["task"] == "tests.toy_task.ToyTask" and record["job"] == {"omega_vis": 1.0}
    assert record["data"]["num_examples"] == 64 and len(record["data"]["examples_sha256"]) == 64
    assert record["chain"]["timesteps"] == task.sampling_timesteps().tolist()
    # the data identity reads the examples: changing one value of one sampled example changes it
    other = ToyTask("ddim")
    other._c["train"] = other._c["train"].clone()
    other._c["train"][0] += 1e-3
    assert run_record(_cfg(), SamplingChain.of(other, SamplerConfig()), other)["data"] != record["data"]


def test_the_ego_jobs_fingerprint_holds_what_feeds_rewards_chain_and_data():
    """Issue 24: --omega-vis, --rollout-sampling-steps and --no-use-visual-reward (now --perceptual-omega and
    --no-use-perceptual-reward) were not compared on resume."""
    import dataclasses

    from tasks.ego_motion.grpo import Config

    cfg = Config()
    base = cfg.fingerprint()
    assert {"perceptual_omega", "rollout_sampling_steps", "use_perceptual_reward", "task", "prior"} <= set(base)
    assert not {"output_dir", "resume", "threads", "grpo"} & set(base) and "cache_dir" not in base["task"]
    for change in (dict(perceptual_omega=2.0), dict(rollout_sampling_steps=12), dict(use_perceptual_reward=False)):
        other = dataclasses.replace(cfg, **change).fingerprint()
        assert [k for k in base if base[k] != other[k]] == list(change), change
    assert dataclasses.replace(cfg, resume=True, threads=2).fingerprint() == base  # run control may change
