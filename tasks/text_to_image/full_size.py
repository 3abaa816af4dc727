"""Random-weight text-to-image pipelines at their published sizes, built from configs: no download.

Why: speed and memory at the scale users post-train at depend only on the layout and sizes of
the networks, not on their trained weights. These builders give the exact layouts of

- ``"unet"``: Stable Diffusion 1.5 (``UNet2DConditionModel`` 859.5 M parameters, the CLIP ViT-L/14
  text encoder 123.1 M, the ``AutoencoderKL`` with 4 latent channels 83.7 M; DDIM with SD 1.5's
  scaled-linear schedule, epsilon prediction);
- ``"sd3"``: Stable Diffusion 3 Medium (``SD3Transformer2DModel``: 24 joint blocks of width 1536,
  patch 2, 16 latent channels; CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders with
  projections; the 16-channel ``AutoencoderKL`` with SD3's scale 1.5305 and shift 0.0609;
  ``FlowMatchEulerDiscreteScheduler`` with shift 3), without T5 (``text_encoder_3=None``: SD3's
  pipeline then uses zeros for the T5 part of the prompt embedding, as when T5 is dropped),

as the diffusers pipeline classes the text-to-image task adapts (``tasks.text_to_image.task``).
The configs are the fields of the released ``config.json`` files that differ from the classes'
defaults. The tokenizer is :func:`~tasks.text_to_image.tiny.tiny_clip_tokenizer`'s character-level
vocabulary padded to CLIP's 77 tokens (ids beyond it are never produced; the embedding tables keep
CLIP's 49,408 rows so the parameter counts are the real ones).

Weights are drawn on ``device`` directly (a 2 B-parameter transformer initialised on a CPU takes
minutes), in float32 from a private RNG seeded by ``seed``, then cast to ``dtype``.
"""

from __future__ import annotations

from typing import Literal

import torch

from tasks.text_to_image.tiny import tiny_clip_tokenizer

Family = Literal["unet", "sd3"]

CLIP_MAX_LENGTH = 77
"""Tokens per prompt of CLIP's text encoders."""
CLIP_VOCAB_SIZE = 49408
"""Rows of CLIP's token embedding."""

UNET_SD15 = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
"""Stable Diffusion 1.5's UNet (859,520,964 parameters)."""
TRANSFORMER_SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                              attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                              caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
"""Stable Diffusion 3 Medium's MMDiT."""
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
"""CLIP ViT-L/14's text tower (SD 1.5's text encoder; SD3's first one, with its projection)."""
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)
"""OpenCLIP ViT-bigG/14's text tower (SD3's second text encoder)."""


def _vae(latent_channels: int, *, scaling_factor: float, shift_factor: float | None, use_quant_conv: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=use_quant_conv,
                         use_post_quant_conv=use_quant_conv)


def _clip_text(config: dict, *, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    # bos/eos/pad ids are the character tokenizer's; the pooled output is read at the eos token.
    return cls(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=0,
                              eos_token_id=1, pad_token_id=1, **config))


def _tokenizer():
    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = CLIP_MAX_LENGTH
    return tokenizer


def full_size_pipeline(family: Family, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       seed: int = 0):
    """A random-weight ``StableDiffusionPipeline`` ("unet") or ``StableDiffusion3Pipeline`` ("sd3") at full size.

    Memory: 4.3 GB ("unet", 1.07 G parameters) or 11.7 GB ("sd3", 2.93 G parameters) of float32 weights on
    ``device`` while they are drawn, half that after a cast to a 16-bit ``dtype``. Raises ValueError for another family.
    """
    from diffusers import (
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    if family not in ("unet", "sd3"):
        raise ValueError(f"family={family!r} is not one of 'unet', 'sd3'")
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        if family == "unet":
            pipeline = StableDiffusionPipeline(
                vae=_vae(4, scaling_factor=0.18215, shift_factor=None, use_quant_conv=True),
                text_encoder=_clip_text({k: v for k, v in CLIP_L.items() if k != "projection_dim"},
                                        with_projection=False),
                tokenizer=_tokenizer(), unet=UNet2DConditionModel(**UNET_SD15),
                scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            pipeline = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel(**TRANSFORMER_SD3_MEDIUM),
                scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False),
                text_encoder=_clip_text(CLIP_L, with_projection=True), tokenizer=_tokenizer(),
                text_encoder_2=_clip_text(CLIP_BIG_G, with_projection=True), tokenizer_2=_tokenizer(),
                text_encoder_3=None, tokenizer_3=None)
    return pipeline.to(dtype=dtype)
