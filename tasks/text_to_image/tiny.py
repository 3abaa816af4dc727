"""Tiny random-weight text-to-image pipelines built from configs: no download, seconds on a CPU.

Why: the text-to-image adapter is tested (and its CPU demonstration run) on real diffusers
pipeline classes of both families without any weights from a hub. Each pipeline has the
component layout of its full-size counterpart, scaled down:

- ``"unet"``: a ``StableDiffusionPipeline`` (``UNet2DConditionModel`` + ``DDIMScheduler`` with
  Stable Diffusion 1.5's schedule, epsilon prediction), one CLIP text encoder.
- ``"sd3"``: a ``StableDiffusion3Pipeline`` (``SD3Transformer2DModel`` +
  ``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3), two CLIP text encoders with
  projection and no T5 (``text_encoder_3=None``: SD3's pipeline then uses zeros for the T5 part).

Images are ``image_size_px`` square; the VAE halves the resolution once (``vae_scale_factor`` 2),
so a 32 px image is a (4, 16, 16) latent. The tokenizer is a character-level CLIP tokenizer whose
vocabulary (lower-case letters, digits, a little punctuation) is written to a folder.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Literal

import torch

Family = Literal["unet", "sd3"]

TOKENIZER_MAX_LENGTH = 16
"""Tokens per prompt (CLIP's 77 scaled down)."""


def tiny_clip_tokenizer(folder: str | Path | None = None):
    """A character-level ``CLIPTokenizer`` (86 tokens) from a vocabulary written to ``folder``.

    Every character outside lower-case letters, digits and ``,.!?-'`` maps to the unknown token.
    ``folder`` defaults to a fresh temporary directory.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder or tempfile.mkdtemp(prefix="tiny_clip_tokenizer_"))
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ",.!?-'")
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=TOKENIZER_MAX_LENGTH)


def _clip_text_config(hidden_size: int, vocab_size: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TOKENIZER_MAX_LENGTH,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1, **extra)


def _tiny_vae(*, scaling_factor: float, shift_factor: float | None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=scaling_factor,
                         shift_factor=shift_factor,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8)


def tiny_pipeline(family: Family, *, image_size_px: int = 32, seed: int = 0):
    """A random-weight pipeline of ``family`` ("unet" or "sd3"), identical for equal arguments.

    The weights are drawn from a private RNG seeded by ``seed`` (the global RNG is left alone).
    """
    from diffusers import (
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if image_size_px % 4:
        raise ValueError(f"image_size_px={image_size_px} must be a multiple of 4 (the VAE halves it, the "
                         "denoiser halves the latent once more)")
    latent_px = image_size_px // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        if family == "unet":
            vae = _tiny_vae(scaling_factor=0.18215, shift_factor=None)  # Stable Diffusion 1.5's latent scale
            unet = UNet2DConditionModel(
                sample_size=latent_px, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                attention_head_dim=4, norm_num_groups=8)
            text_encoder = CLIPTextModel(_clip_text_config(16, len(tokenizer)))
            scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
            return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        if family == "sd3":
            vae = _tiny_vae(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's latent scale and shift
            text_encoder = CLIPTextModelWithProjection(_clip_text_config(16, len(tokenizer), projection_dim=16))
            text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(16, len(tokenizer), projection_dim=16))
            transformer = SD3Transformer2DModel(
                sample_size=latent_px, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                pooled_projection_dim=32, pos_embed_max_size=latent_px)
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
            return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                            text_encoder=text_encoder, tokenizer=tokenizer,
                                            text_encoder_2=text_encoder_2, tokenizer_2=tiny_clip_tokenizer(),
                                            text_encoder_3=None, tokenizer_3=None)
    raise ValueError(f"family={family!r} is not one of 'unet', 'sd3'")


def save_tiny_pipeline(family: Family, output_dir: str | Path, *, image_size_px: int = 32, seed: int = 0) -> Path:
    """Write :func:`tiny_pipeline` with ``save_pretrained`` so that ``DiffusionPipeline.from_pretrained`` loads it
    (the SD3 one with ``text_encoder_3=None, tokenizer_3=None``: it has no T5)."""
    output_dir = Path(output_dir)
    tiny_pipeline(family, image_size_px=image_size_px, seed=seed).save_pretrained(output_dir)
    return output_dir
