"""The text-to-image adapter on tiny random pipelines of both families (no download): classifier-free
guidance inside the policy, LoRA with the adapter-disabled reference, adapter-only checkpoints with an
exact resume, EMA, batches of prompts, chunked rollouts whose rewards overlap sampling."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open

import recipes.text_to_image as text_to_image_recipe
from diffgrpo.chain import SamplingChain
from diffgrpo.config import EMAConfig, GRPOConfig, OptimConfig, PerturbConfig, ProbeConfig, SamplerConfig
from diffgrpo.guidance import guided_model_fn
from diffgrpo.lora import AdapterDisabledReference, LoRAConfig, add_lora, has_lora, lora_parameters
from diffgrpo.loss import LossConfig
from diffgrpo.rewards import RewardSet, available_rewards, register_reward
from diffgrpo.rng import make_generator
from diffgrpo.run_state import make_optimizer
from diffgrpo.task import Task
from diffgrpo.train_step import collect, make_perturber, policy_update
from diffgrpo.trainer import train_grpo
from tasks.text_to_image.task import TextToImageTask, TextToImageTaskConfig, pipeline_family
from tasks.text_to_image.tiny import tiny_pipeline

PROMPTS = {"train": ["a red cat", "a blue dog", "a green tree", "a small house"], "test": ["a car", "a boat"]}
FAMILIES = ["unet", "sd3"]

if "t2i_test_brightness" not in available_rewards():

    @register_reward("t2i_test_brightness")
    def _brightness():
        """Test-only reward: mean pixel value, and the thread that computed it (for the overlap test)."""

        def reward(decoded, batch):
            _brightness.threads.add(threading.current_thread().name)
            return decoded["images"].mean(dim=(1, 2, 3))

        return reward

    _brightness.threads = set()


def make_task(family: str, *, lora: bool = True, seed: int = 0) -> TextToImageTask:
    """A 16 px tiny pipeline (8x8 latents), 4 sampling steps, with LoRA adapters seeded by ``seed``."""
    task = TextToImageTask(tiny_pipeline(family, image_size_px=16), PROMPTS,
                           TextToImageTaskConfig(num_inference_steps=4, max_sequence_length=4))
    if lora:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            add_lora(task.denoiser, LoRAConfig(use_lora=True, r=4, lora_alpha=4.0))
    return task


def sampling_chain(task: TextToImageTask) -> SamplingChain:
    """The tests' chain: DDIM eta 1 (UNet) or the flow SDE at 0.7 (SD3), guidance 4.5."""
    return SamplingChain.of(task, SamplerConfig(eta=1.0 if task.family == "unet" else 0.7, guidance_scale=4.5))


def grpo_cfg(family: str, **kw) -> GRPOConfig:
    base = dict(num_iterations=2, conditions_per_iteration=2, group_size=4, micro_batch_size=4,
                optim=OptimConfig(learning_rate=1e-2), rewards=("t2i_test_brightness",), checkpoint_every=1)
    base.update(kw)
    return GRPOConfig(**base)


def test_task_protocol_batch_and_decode():
    task = make_task("sd3", lora=False)
    assert isinstance(task, Task) and task.family == "sd3" and task.sample_shape == (4, 8, 8)
    batch = task.load_examples("train", torch.tensor([2, 0]))
    assert batch["prompt"] == ["a green tree", "a red cat"]
    assert set(task.encode_condition(batch)) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                                 "negative_pooled_prompt_embeds"}
    # Encoding is per prompt: the negative prompt's embedding is the same row for every prompt.
    assert torch.equal(batch["negative_prompt_embeds"][0], batch["negative_prompt_embeds"][1])
    images = task.decode(torch.randn(3, *task.sample_shape), batch)["images"]
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    timesteps = task.sampling_timesteps()
    assert timesteps.shape == (5,) and float(timesteps[-1]) == 0.0
    assert make_task("unet", lora=False).sampling_timesteps()[-1].item() == -1


def test_unsupported_pipelines_are_named():
    class FluxPipeline:
        pass

    with pytest.raises(ValueError, match="Flux"):
        pipeline_family(FluxPipeline())
    with pytest.raises(ValueError, match="StableDiffusionPipeline or StableDiffusion3Pipeline"):
        pipeline_family(object())


@pytest.mark.parametrize("family", FAMILIES)
def test_guided_prediction_is_uncond_plus_w_times_difference(family):
    task = make_task(family, lora=False)
    batch = task.load_examples("train", torch.arange(2))
    cond = task.encode_condition(batch)
    x_t, t = torch.randn(2, *task.sample_shape), task.sampling_timesteps()[1].expand(2)
    with torch.no_grad():
        guided = guided_model_fn(task.predict, task.denoiser, 3.0)(x_t, t, cond)
        plain = guided_model_fn(task.predict, task.denoiser, 1.0)(x_t, t, cond)
        uncond = task.predict(task.denoiser, x_t, t, {k[len("negative_"):]: v for k, v in cond.items()
                                                       if k.startswith("negative_")})
    assert torch.allclose(guided, uncond + 3.0 * (plain - uncond), atol=1e-5)
    assert not torch.allclose(guided, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_on_policy_ratio_is_exactly_one(family):
    task = make_task(family)
    cfg = grpo_cfg(family, inner_epochs=2, loss=LossConfig(clip_range=0.2, kl_coef=0.1),
                   perturb=PerturbConfig("gaussian", scale=0.05))  # each member sees its own perturbed embedding
    model = task.denoiser
    optimizer, _ = make_optimizer(model, cfg)
    data = collect(task, model, sampling_chain(task), task.load_examples("train", torch.arange(2)), cfg=cfg,
                   rewards=RewardSet.from_specs({"t2i_test_brightness": 1.0}), perturber=make_perturber(cfg),
                   generator=make_generator(0, "rollout"), group_id_offset=0)
    assert data.trajectory.x0_preds.shape[1] == 0  # the task keeps no per-step x0 estimate
    embeds = data.trajectory.cond["prompt_embeds"]
    assert not torch.equal(embeds[0], embeds[1])  # perturbed per member ...
    negative = data.trajectory.cond["negative_prompt_embeds"]
    assert torch.equal(negative[0], negative[1])
    assert data.batch["prompt"] == ["a red cat"] * 4 + ["a blue dog"] * 4  # ... while the prompts stay strings
    stats = policy_update(task, model, sampling_chain(task), data, optimizer, cfg=cfg,
                          generator=make_generator(0, "select"), accelerator=Accelerator(cpu=True),
                          reference=AdapterDisabledReference(model))
    assert stats["loss/on_policy_ratio_max_dev"] == 0.0
    assert stats["loss/ratio_max_dev"] > 0.0  # the second epoch follows an optimiser step


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_disabled_reference_equals_the_base_model(family):
    task = make_task(family, lora=False)
    batch = task.load_examples("train", torch.arange(2))
    cond = task.encode_condition(batch)
    x_t, t = torch.randn(2, *task.sample_shape), task.sampling_timesteps()[1].expand(2)
    model = task.denoiser
    with torch.no_grad():
        base = task.predict(model, x_t, t, cond)
    add_lora(model, LoRAConfig(use_lora=True, r=4))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(0.1)  # B = 0 at initialisation: move it so the adapted model differs
        adapted = task.predict(model, x_t, t, cond)
        reference = task.predict(AdapterDisabledReference(model), x_t, t, cond)
    assert torch.equal(reference, base)
    assert not torch.allclose(adapted, base)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert len(list(AdapterDisabledReference(model).parameters())) == 0  # no second copy of the weights


def test_lora_checkpoint_holds_adapters_only_and_resume_is_bit_exact(tmp_path):
    cfg = grpo_cfg("sd3", num_iterations=3, checkpoint_every=1, ema=EMAConfig(use_ema=True, decay=0.5),
                   loss=LossConfig(kl_coef=0.1))

    def run(output_dir, **kw):
        task = make_task("sd3")
        history = train_grpo(task, task.denoiser, cfg, accelerator=Accelerator(cpu=True), output_dir=output_dir,
                             chain=sampling_chain(task), **kw)
        return task.denoiser, history

    straight, hist_a = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=1)
    resumed, hist_b = run(tmp_path / "b", resume=True)  # a fresh pipeline, adapters restored from the checkpoint
    assert has_lora(resumed)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert hist_a["reward/t2i_test_brightness"] == hist_b["reward/t2i_test_brightness"]
    assert max(abs(v) for v in hist_a["loss/kl"]) > 0  # the adapter-disabled reference entered the loss

    path = tmp_path / "b" / "checkpoints" / "step_000003" / "shared.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    model_keys = [k for k in keys if k.startswith("model.")]
    trainable = [n for n, p in resumed.named_parameters() if p.requires_grad]
    assert meta["model_state"] == "trainable" and len(model_keys) == len(trainable)
    assert all("lora_" in k for k in model_keys)
    ema_keys = sorted(k for k in keys if k.startswith("task.ema."))
    assert ema_keys == sorted(f"task.ema.{n}" for n in trainable)


def test_ema_state_is_restored_on_resume_and_used_for_the_probe(tmp_path):
    probe = ProbeConfig(splits=("test",), conditions_per_split=2, noises_per_condition=1, eval_every=1)
    cfg = grpo_cfg("sd3", num_iterations=2, ema=EMAConfig(use_ema=True, decay=0.5, use_for_eval=True), probe=probe)
    task = make_task("sd3")
    history = train_grpo(task, task.denoiser, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "a",
                         chain=sampling_chain(task))
    from diffgrpo.probe import evaluate_probe
    from diffgrpo.run_state import start_run

    def restored(output_dir):
        fresh = make_task("sd3")
        run, _ = start_run(fresh, fresh.denoiser, cfg, accelerator=Accelerator(cpu=True), output_dir=output_dir,
                           resume=True)
        return run

    run = restored(tmp_path / "a")
    assert run.ema.num_updates == 2
    for name, value in run.ema.shadow.items():
        assert not torch.equal(value, dict(run.model.named_parameters())[name].float()), name  # an average, not theta
    # The last probe evaluation ran with the averaged weights swapped in; they swap in and out exactly.
    fresh_task = make_task("sd3")

    def probe_mean():
        values = evaluate_probe(fresh_task, run.model, sampling_chain(fresh_task), probe,
                                rewards=RewardSet.from_specs({"t2i_test_brightness": 1.0}), micro_batch_size=4)
        return float(values["reward/test/t2i_test_brightness"].double().mean())

    before = {n: p.clone() for n, p in run.model.named_parameters()}
    with run.ema.swapped_in(run.model):
        assert all(torch.equal(p.float(), run.ema.shadow[n]) for n, p in run.model.named_parameters()
                   if n in run.ema.shadow)
        assert probe_mean() == history["probe/reward/test/t2i_test_brightness"][-1]
    assert all(torch.equal(p, before[n]) for n, p in run.model.named_parameters())
    assert probe_mean() != history["probe/reward/test/t2i_test_brightness"][-1]


def test_overlapped_rewards_are_bit_identical_to_scoring_in_line():
    task = make_task("unet", lora=False)
    cfg = grpo_cfg("unet", conditions_per_iteration=4, rollout_chunks=2, micro_batch_size=4)
    batch = task.load_examples("train", torch.arange(4))
    rewards = RewardSet.from_specs({"t2i_test_brightness": 1.0})
    outs = {}
    for overlap in (True, False):
        reward_fn = __import__("diffgrpo.rewards", fromlist=["_REWARDS"])._REWARDS["t2i_test_brightness"]
        reward_fn.threads.clear()
        outs[overlap] = collect(task, task.denoiser, sampling_chain(task), batch, cfg=cfg, rewards=rewards,
                                perturber=make_perturber(cfg), generator=make_generator(0, "rollout"),
                                group_id_offset=0, overlap_rewards=overlap)
        threads = set(reward_fn.threads)
        assert any(name.startswith("reward") for name in threads) == overlap
    rewards.close()
    a, b = outs[True], outs[False]
    assert torch.equal(a.trajectory.states, b.trajectory.states)
    assert torch.equal(a.trajectory.log_probs, b.trajectory.log_probs)
    assert torch.equal(a.rewards["t2i_test_brightness"], b.rewards["t2i_test_brightness"])
    assert torch.equal(a.advantages.advantages, b.advantages.advantages)
    assert a.trajectory.states.shape[0] == 16 and a.batch["prompt"][4] == "a blue dog"
    assert torch.equal(a.trajectory.group_ids, torch.arange(4).repeat_interleave(4))


@pytest.mark.unchecked_annotations
def test_guidance_and_chunk_settings_are_checked_at_start_up():
    with pytest.raises(ValueError, match="guidance-scale"):
        SamplerConfig(guidance_scale=0.5)
    with pytest.raises(ValueError, match="micro-batch-size"):
        GRPOConfig(conditions_per_iteration=4, group_size=4, rollout_chunks=2, micro_batch_size=16, rewards=("x",))
    with pytest.raises(ValueError, match="rollout-chunks"):
        GRPOConfig(conditions_per_iteration=4, rollout_chunks=3, rewards=("x",))
    with pytest.raises(ValueError, match="use-ema"):
        EMAConfig(use_for_eval=True)
    with pytest.raises(ValueError, match="use-lora"):
        LoRAConfig(r=4)


def recipe_config(recipe, tmp_path, *, lora: LoRAConfig, task: TextToImageTaskConfig | None = None, **grpo):
    """The recipe on the tiny 16 px UNet pipeline: 2 prompts x 4 samples, a 2 x 1 probe set."""
    base = dict(num_iterations=2, conditions_per_iteration=2, group_size=4, micro_batch_size=4,
                optim=OptimConfig(learning_rate=1e-2),
                rewards=("jpeg_compressibility",), checkpoint_every=0,
                probe=ProbeConfig(conditions_per_split=2, noises_per_condition=1, eval_every=2))
    base.update(grpo)
    return recipe.Config(pipeline=str(tmp_path / "tiny_sd"), tiny_pipeline="unet", tiny_image_size_px=16,
                         output_dir=tmp_path / "run", task=task or TextToImageTaskConfig(num_inference_steps=3),
                         lora=lora, grpo=GRPOConfig(**base), table_output=tmp_path / "table.md",
                         sampler=SamplerConfig(eta=1.0, guidance_scale=3.0))


def unet_output(pipeline) -> torch.Tensor:
    """The UNet's output on fixed latents (2, 4, 8, 8), timesteps and text features (2, 5, 16)."""
    gen = torch.Generator().manual_seed(0)
    x_t, embeds = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 16, generator=gen)
    with torch.no_grad():
        return pipeline.unet(x_t, torch.tensor([999, 500]), encoder_hidden_states=embeds, return_dict=False)[0]


def test_recipe_runs_and_its_lora_weights_load_into_the_pipeline(tmp_path):

    recipe = text_to_image_recipe
    # lora_alpha != r: the adapters' scale alpha / r = 4 must survive the export (diffusers reloads at alpha = r).
    cfg = recipe_config(recipe, tmp_path, lora=LoRAConfig(use_lora=True, r=4, lora_alpha=16.0),
                        ema=EMAConfig(use_ema=True, decay=0.5, use_for_eval=True))
    results = recipe.main(cfg)
    assert results["family"] == "unet" and results["trainable_parameters"] > 0
    assert set(results["probe"]) >= {"reward/train/jpeg_compressibility", "reward/test/jpeg_compressibility"}
    assert (tmp_path / "table.md").read_text() == (tmp_path / "run" / "results.md").read_text()
    assert "| reward/test/jpeg_compressibility |" in (tmp_path / "table.md").read_text()

    # The trained model (and its EMA) rebuilt from the final checkpoint: base pipeline + adapters + saved weights.
    with safe_open(str(tmp_path / "run" / "checkpoints" / "step_000002" / "shared.safetensors"), framework="pt") as f:
        saved = {k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
        averaged = {k[len("task.ema."):]: f.get_tensor(k) for k in f.keys() if k.startswith("task.ema.")}
    assert any(bool(v.abs().sum() > 0) for n, v in saved.items() if "lora_B" in n)  # trained, not B = 0
    expected = {}
    for name, weights in (("lora", saved), ("lora_ema", averaged)):
        trained = recipe.load_pipeline(cfg)
        add_lora(trained.unet, cfg.lora)
        assert set(weights) == {n for n, p in trained.unet.named_parameters() if p.requires_grad}
        trained.unet.load_state_dict(weights, strict=False)
        expected[name] = unet_output(trained)
    assert not torch.allclose(expected["lora"], expected["lora_ema"])
    base = unet_output(recipe.load_pipeline(cfg))
    # Each exported folder loads into a fresh pipeline as the model it was written from: the same outputs.
    for name in ("lora", "lora_ema"):
        loaded = recipe.load_pipeline(cfg)
        loaded.load_lora_weights(str(tmp_path / "run" / name))
        out = unet_output(loaded)
        assert float((out - base).abs().max()) > 1e-4, name  # the adapters act
        assert float((out - expected[name]).abs().max()) < 1e-5, name

    with pytest.raises(ValueError, match="--pipeline"):
        recipe.Config()


def test_exported_sd3_lora_reloads_with_its_scale(tmp_path):
    from tasks.text_to_image.task import save_lora_weights

    task = make_task("sd3", lora=False)
    add_lora(task.denoiser, LoRAConfig(use_lora=True, r=2, lora_alpha=8.0))  # scale 4, diffusers reloads at 1
    with torch.no_grad():
        for p in lora_parameters(task.denoiser):
            p.add_(0.05)  # B = 0 at initialisation: move it so the adapters act
    save_lora_weights(task.pipeline, tmp_path / "lora")
    loaded = tiny_pipeline("sd3", image_size_px=16)
    loaded.load_lora_weights(str(tmp_path / "lora"))
    batch = task.load_examples("train", torch.arange(2))
    cond = task.encode_condition(batch)
    x_t = torch.randn(2, *task.sample_shape, generator=torch.Generator().manual_seed(0))
    t = task.sampling_timesteps()[1].expand(2)
    with torch.no_grad():
        trained, reloaded = task.predict(task.denoiser, x_t, t, cond), task.predict(loaded.transformer, x_t, t, cond)
        base = task.predict(tiny_pipeline("sd3", image_size_px=16).transformer, x_t, t, cond)
    assert float((trained - base).abs().max()) > 1e-3
    assert float((reloaded - trained).abs().max()) < 1e-5


def test_recipe_resume_refuses_other_lora_or_task_settings(tmp_path):

    recipe = text_to_image_recipe
    lora = LoRAConfig(use_lora=True, r=4, lora_alpha=8.0)
    one = dict(num_iterations=1, probe=ProbeConfig(conditions_per_split=2, noises_per_condition=1, eval_every=1))
    recipe.main(recipe_config(recipe, tmp_path, lora=lora, **one))
    resumed = dataclasses.replace(recipe_config(recipe, tmp_path, lora=lora, **one), resume=True)
    with pytest.raises(ValueError, match=r"--lora\.lora-alpha"):
        recipe.main(dataclasses.replace(resumed, lora=dataclasses.replace(lora, lora_alpha=16.0)))
    with pytest.raises(ValueError, match=r"'chain': \{'timesteps'"):  # the run fingerprint's chain: its K
        recipe.main(dataclasses.replace(resumed, task=TextToImageTaskConfig(num_inference_steps=4)))
    with pytest.raises(ValueError, match=r"--lora\.r.*--lora\.target-modules"):
        recipe.main(dataclasses.replace(resumed, lora=dataclasses.replace(lora, r=2)))
    with pytest.raises(ValueError, match=r"--lora\.r.*--lora\.target-modules"):
        recipe.main(dataclasses.replace(resumed, lora=dataclasses.replace(lora, target_modules=("to_q", "to_v"))))
    recipe.main(dataclasses.replace(resumed, grpo=dataclasses.replace(resumed.grpo, num_iterations=2)))  # same: resumes


def test_default_max_sequence_length_is_the_sd3_pipelines():
    import inspect

    from diffusers import StableDiffusion3Pipeline

    default = inspect.signature(StableDiffusion3Pipeline.__call__).parameters["max_sequence_length"].default
    assert TextToImageTaskConfig().max_sequence_length == default == 256


def test_a_scheduler_config_without_clip_sample_does_not_clip_latents():
    from diffusers import DDIMScheduler, PNDMScheduler

    task = make_task("unet", lora=False)
    # SD 1.x ships a PNDM config; PNDM has no clip_sample, and DDIMScheduler's own default is True.
    task.pipeline.scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    assert "clip_sample" not in task.pipeline.scheduler.config
    scheduler = task.make_scheduler()
    assert scheduler.config.clip_sample is False and scheduler.config.thresholding is False
    assert int(scheduler.timesteps[0]) == 751  # the pipeline's spacing (steps_offset 1) is kept
    task.pipeline.scheduler = DDIMScheduler.from_config(task.pipeline.scheduler.config, clip_sample=True)
    with pytest.raises(ValueError, match="clip_sample=True"):  # a config asking to clip latents is refused
        task.make_scheduler()


def test_inpainting_pipelines_are_refused():
    from types import SimpleNamespace

    class StableDiffusionInpaintPipeline:
        unet = SimpleNamespace(config=SimpleNamespace(in_channels=9, out_channels=4, addition_embed_type=None))

    with pytest.raises(ValueError, match="StableDiffusionInpaintPipeline.*in_channels=9.*out_channels=4.*inpainting"):
        pipeline_family(StableDiffusionInpaintPipeline())
