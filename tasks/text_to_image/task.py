"""Text-to-image as a diffgrpo task: a thin adapter over a diffusers pipeline object.

Why an adapter and not a pipeline copy: GRPO needs the pipeline's pieces, not its sampling loop
(``diffgrpo.rollout`` runs the chain with exact step densities). The adapter calls the pipeline's
own ``encode_prompt``, its denoiser, its VAE's ``decode`` and reads its scheduler's configuration;
nothing of ``__call__`` is copied.

Two families, chosen from the pipeline's components:
- ``"unet"``: Stable Diffusion 1.x / 2.x (``pipeline.unet``, a ``UNet2DConditionModel``). The
  pipeline's scheduler config (PNDM for SD 1.5) is loaded into a ``DDIMScheduler``, whose tables
  give the DDPM-family densities (``diffgrpo.sde``, method ``ddim``); epsilon or v prediction as
  the scheduler's ``prediction_type`` says; ``clip_sample`` and ``thresholding`` off (latents are
  not images in [-1, 1]; a config that turns them on is refused).
- ``"sd3"``: Stable Diffusion 3 / 3.5 (``pipeline.transformer``, an ``SD3Transformer2DModel``) with
  ``FlowMatchEulerDiscreteScheduler`` (its static ``shift``); the transformer predicts the flow
  velocity v = noise - x0 at t = sigma x 1000 (``diffgrpo.sde``, method ``flow_sde`` or ``cps``).
Flux (packed 2x2 latents, distilled guidance), SDXL (extra time-id conditions) and inpainting
pipelines (mask and masked-image input channels) are not covered; the adapter says so when handed one.

Batch (``load_examples``), B prompts, L tokens, D text features:
- ``prompt``: list of B strings (rewards such as a remote scorer read them);
- ``prompt_embeds`` (B, L, D) and ``negative_prompt_embeds`` (B, L, D): the pipeline's text
  encodings of the prompts and of ``negative_prompt``, encoded once per batch (the G members of a
  group reuse them); SD3 adds ``pooled_prompt_embeds`` (B, P) and ``negative_pooled_prompt_embeds``.
- the raw (perturbable) condition is ``prompt_embeds``: T = L tokens, D channels.

Samples are latents (C, h, w) = (denoiser in_channels, H / f, W / f), f the VAE's scale factor;
``decode`` returns ``images``: float RGB (N, 3, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from diffgrpo.task import Batch

Family = Literal["unet", "sd3"]
CONDITION_KEYS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
"""Batch entries the condition is made of (the pooled ones only for SD3), named as diffusers names them."""


@dataclass(frozen=True)
class TextToImageTaskConfig:
    """Image size, sampling chain and prompt encoding of the text-to-image task."""

    image_size_px: int | None = None
    """Side of the square images in pixels; None: the pipeline's default (its denoiser's sample size times
    the VAE's scale factor, e.g. 512 for SD 1.5, 1024 for SD3)."""
    num_inference_steps: int = 10
    """K: steps of the sampling chain (the scheduler's own spacing of its timesteps)."""
    negative_prompt: str = ""
    """The unconditional prompt of classifier-free guidance (diffusers' default: the empty prompt)."""
    max_sequence_length: int = 256
    """SD3 only: tokens of the T5 encoder's part of the prompt embedding (zeros without T5). The default is
    ``StableDiffusion3Pipeline``'s, so training sees the embeddings ``pipeline(prompt)`` samples from."""
    decode_batch_size: int = 8
    """Latents decoded by the VAE per call (bounds the decoder's activation memory)."""

    def __post_init__(self) -> None:
        if self.image_size_px is not None and self.image_size_px < 8:
            raise ValueError(f"image_size_px={self.image_size_px} must be >= 8 (or None for the pipeline's default)")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps} must be >= 1; fix "
                             "--task.num-inference-steps")
        if self.max_sequence_length < 1 or self.decode_batch_size < 1:
            raise ValueError(f"max_sequence_length={self.max_sequence_length} and decode_batch_size="
                             f"{self.decode_batch_size} must be >= 1")


def pipeline_family(pipeline) -> Family:
    """"unet" or "sd3" from the pipeline's components; raises naming what is not supported."""
    name = type(pipeline).__name__
    if "Flux" in name:
        raise ValueError(f"{name} is not supported yet: Flux packs its latents in 2x2 patches and uses distilled "
                         "guidance; use a Stable Diffusion 1.x/2.x or SD3/SD3.5 pipeline")
    unet = getattr(pipeline, "unet", None)
    if unet is not None:
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise ValueError(f"{name}'s UNet needs added conditions ({unet.config.addition_embed_type!r}, e.g. SDXL's "
                             "time ids), which this adapter does not build; use an SD 1.x/2.x pipeline")
        _check_same_channels(name, unet.config)
        return "unet"
    transformer = getattr(pipeline, "transformer", None)
    if transformer is not None and type(transformer).__name__ == "SD3Transformer2DModel":
        _check_same_channels(name, transformer.config)
        return "sd3"
    raise ValueError(f"{name} has neither a UNet2DConditionModel 'unet' nor an SD3Transformer2DModel 'transformer'; "
                     "pass a StableDiffusionPipeline or StableDiffusion3Pipeline")


def _check_same_channels(name: str, config) -> None:
    """Raise unless the denoiser maps latents (C, h, w) to an output of the same C channels: the chain's sample
    is its input. An inpainting denoiser reads 9 = 4 latent + 1 mask + 4 masked-image channels and outputs 4."""
    in_channels = config.in_channels
    out_channels = getattr(config, "out_channels", None) or in_channels  # SD3: None means in_channels
    if in_channels != out_channels:
        raise ValueError(f"{name}'s denoiser has in_channels={in_channels} but out_channels={out_channels}: it reads "
                         "extra conditioning channels (e.g. an inpainting pipeline's mask and masked image), which "
                         "this adapter does not build; inpainting pipelines are not supported, use a text-to-image "
                         "StableDiffusionPipeline or StableDiffusion3Pipeline")


class TextToImageTask:
    """A diffusers text-to-image pipeline as a :class:`diffgrpo.task.Task` (see the module docstring).

    ``prompts``: the prompts of each split, e.g. ``{"train": [...], "test": [...]}``. The model the
    core trains is :attr:`denoiser` (the pipeline's UNet or transformer, possibly with LoRA adapters);
    text encoders and VAE are only run, under ``torch.no_grad``.
    """

    x0_pred_steps: tuple[int, ...] = ()
    """Rollouts keep no per-step x0 estimate (nothing reads them; N x K latents saved)."""

    def __init__(self, pipeline, prompts: Mapping[str, Sequence[str]],
                 cfg: TextToImageTaskConfig | None = None) -> None:
        self.pipeline = pipeline
        self.cfg = cfg or TextToImageTaskConfig()
        self.family: Family = pipeline_family(pipeline)
        self.prompts = {split: list(values) for split, values in prompts.items()}
        for split, values in self.prompts.items():
            if not values or not all(isinstance(p, str) for p in values):
                raise ValueError(f"split {split!r} needs a non-empty list of prompt strings, got {values[:3]!r}")
        scale = pipeline.vae_scale_factor
        size = self.cfg.image_size_px or self._default_image_size_px()
        if size % (scale * self._latent_multiple()):
            raise ValueError(f"image_size_px={size} must be a multiple of {scale * self._latent_multiple()} (VAE scale "
                             f"factor {scale} x the denoiser's patch size); fix --task.image-size-px")
        self.image_size_px = size
        channels = self.denoiser.config.in_channels
        self.sample_shape: tuple[int, ...] = (channels, size // scale, size // scale)

    @property
    def denoiser(self) -> nn.Module:
        """The trained network: ``pipeline.unet`` or ``pipeline.transformer``."""
        return self.pipeline.unet if self.family == "unet" else self.pipeline.transformer

    def _default_image_size_px(self) -> int:
        return int(self.denoiser.config.sample_size) * self.pipeline.vae_scale_factor

    def _latent_multiple(self) -> int:
        return int(getattr(self.denoiser.config, "patch_size", 1) or 1)

    # -- diffusion ---------------------------------------------------------------------------------
    def make_scheduler(self):
        """DDIM (UNet family) or flow-match Euler (SD3) with the pipeline's schedule and K steps set."""
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        config = self.pipeline.scheduler.config
        if self.family == "unet":
            # Latents are not images in [-1, 1]: never clip or threshold their x0 estimates. DDIMScheduler's own
            # default is clip_sample=True, which a config without the key (SD 1.x ships PNDM's) would silently get.
            for key in ("clip_sample", "thresholding"):
                if config.get(key, False):
                    raise ValueError(f"the pipeline's scheduler config sets {key}=True, which would clip the latents' "
                                     f"x0 estimates as if they were images in [-1, 1]; set {key}: false in the "
                                     "pipeline's scheduler/scheduler_config.json (or assign pipeline.scheduler = "
                                     f"DDIMScheduler.from_config(pipeline.scheduler.config, {key}=False))")
            scheduler = DDIMScheduler.from_config(config, clip_sample=False, thresholding=False)
        else:
            if config.get("use_dynamic_shifting", False):
                raise ValueError("the pipeline's scheduler uses dynamic shifting (resolution-dependent mu), which this "
                                 "adapter does not set; load a scheduler with use_dynamic_shifting=False")
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        scheduler.set_timesteps(self.cfg.num_inference_steps)
        return scheduler

    def sampling_timesteps(self) -> Tensor:
        """(K+1,) the scheduler's K timesteps, then the final state: -1 (DDIM's "clean") or t = 0 (flow)."""
        timesteps = self.make_scheduler().timesteps.detach().cpu()
        if self.family == "unet":
            return torch.cat([timesteps.long(), torch.tensor([-1])])
        return torch.cat([timesteps.float(), torch.zeros(1)])

    # -- data --------------------------------------------------------------------------------------
    def num_examples(self, split: str) -> int:
        return len(self._split(split))

    @torch.no_grad()
    def load_examples(self, split: str, indices: Tensor) -> Batch:
        """The prompts at ``indices`` (B,) and their text encodings (see the module docstring)."""
        prompts = self._split(split)
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(prompts)):
            raise IndexError(f"indices must lie in [0, {len(prompts)}) for split {split!r}")
        chosen = [prompts[i] for i in indices.tolist()]
        return {"prompt": chosen, **self.encode_prompts(chosen)}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """The pipeline's ``encode_prompt`` of ``prompts`` and of the negative prompt, (B, ...) each."""
        negative = [self.cfg.negative_prompt] * len(prompts)
        device = self.denoiser.device
        if self.family == "unet":
            embeds, negative_embeds = self.pipeline.encode_prompt(
                prompts, device, 1, True, negative_prompt=negative)
            return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
        embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negative,
            max_sequence_length=self.cfg.max_sequence_length)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds,
                "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}

    def raw_condition(self, batch: Batch) -> Tensor:
        """(B, L, D) the prompt embeddings: perturbable along tokens L and features D."""
        return batch["prompt_embeds"]

    def with_raw_condition(self, batch: Batch, raw: Tensor) -> Batch:
        if raw.shape != batch["prompt_embeds"].shape:
            raise ValueError(f"raw condition has shape {tuple(raw.shape)}, expected "
                             f"{tuple(batch['prompt_embeds'].shape)} (B, L, D); perturbers must keep the shape")
        return {**batch, "prompt_embeds": raw}

    def encode_condition(self, batch: Batch) -> dict[str, Tensor]:
        """The embeddings the denoiser reads, with their unconditional (``negative_*``) counterparts."""
        return {key: batch[key] for key in CONDITION_KEYS if key in batch}

    # -- network -----------------------------------------------------------------------------------
    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The denoiser's output (N, C, h, w) for latents x_t (N, C, h, w) at timesteps t (N,): epsilon (or v)
        for the UNet family, the flow velocity for SD3. Inputs are cast to the text embeddings' dtype."""
        embeds = cond["prompt_embeds"]
        if x_t.shape[1:] != self.sample_shape or embeds.shape[0] != x_t.shape[0] or t.shape != x_t.shape[:1]:
            raise ValueError(f"predict got x_t {tuple(x_t.shape)}, t {tuple(t.shape)}, prompt_embeds "
                             f"{tuple(embeds.shape)}; expected (N, *{self.sample_shape}), (N,), (N, L, D)")
        latents = x_t.to(embeds.dtype)
        if self.family == "unet":
            return model(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]
        return model(hidden_states=latents, timestep=t, encoder_hidden_states=embeds,
                     pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]

    # -- outputs -----------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, x0: Tensor, batch: Batch) -> dict[str, Tensor]:
        """``images``: float32 RGB (N, 3, H, W) in [0, 1] from latents x0 (N, C, h, w), through the VAE.

        latents / scaling_factor (+ shift_factor, SD3) -> ``vae.decode`` -> [-1, 1] -> (x + 1) / 2, clamped.
        """
        vae = self.pipeline.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        images = []
        for part in x0.split(self.cfg.decode_batch_size):
            latents = part.to(vae.dtype) / vae.config.scaling_factor + shift
            image = vae.decode(latents, return_dict=False)[0]  # (n, 3, H, W) in about [-1, 1]
            images.append((image.float() / 2 + 0.5).clamp(0.0, 1.0))
        return {"images": torch.cat(images)}

    def evaluate(self, decoded: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """``pixel_std``: each image's standard deviation over its pixels and channels, in [0, 0.5] (a plain
        image scores 0; JPEG compressibility training lowers it)."""
        images = decoded["images"]
        return {"pixel_std": images.reshape(images.shape[0], -1).std(dim=1)}

    def _split(self, split: str) -> list[str]:
        if split not in self.prompts:
            raise KeyError(f"unknown split {split!r}; this task has prompt splits {sorted(self.prompts)}")
        return self.prompts[split]


def save_lora_weights(pipeline, output_dir: str | Path, *, adapter_name: str = "default") -> Path:
    """Write the denoiser's LoRA adapters where ``pipeline.load_lora_weights(output_dir)`` reads them.

    Uses the pipeline class's own ``save_lora_weights`` (``unet_lora_layers`` or ``transformer_lora_layers``)
    with peft's adapter state dict, converted to diffusers' key names.

    Why each ``lora_B`` is multiplied by the layer's scale (lora_alpha / r): a layer computes
    base(x) + B A x * alpha / r, but the file holds no alpha, and diffusers then loads the adapters at
    alpha = r (scale 1). Folding the scale into B makes the reloaded model compute exactly what the
    trained one did, on every diffusers version (no ``*_lora_adapter_metadata`` argument needed).
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from diffgrpo.lora import lora_layers

    family = pipeline_family(pipeline)
    denoiser = pipeline.unet if family == "unet" else pipeline.transformer
    state = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)  # keys "<module>.lora_B.weight", ...
    adapted = {id(module) for module in lora_layers(denoiser)}
    scales = {name: module.scaling[adapter_name] for name, module in denoiser.named_modules() if id(module) in adapted}
    for name, scale in scales.items():
        key = f"{name}.lora_B.weight"
        if key not in state:
            raise ValueError(f"peft's state dict lacks {key!r} of the adapted layer {name!r}; this peft version names "
                             "adapter weights differently, so the export cannot fold in the scale lora_alpha / r")
        state[key] = state[key] * scale
    layers = convert_state_dict_to_diffusers(state)
    key = "unet_lora_layers" if family == "unet" else "transformer_lora_layers"
    type(pipeline).save_lora_weights(str(output_dir), **{key: layers})
    return Path(output_dir)
