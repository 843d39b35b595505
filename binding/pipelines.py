"""What every Stable Diffusion pipeline of the project shares: the scheduler configurations, the device and
dtype rules, the model family of a pipeline, and the assembly of a ``StableDiffusionPipeline`` or a
``StableDiffusionXLPipeline`` from components.

Below ``binding.models`` (presets and loading) and ``binding.shapes.model`` (the teaching model), so both
build pipelines the same way without importing each other.
"""

from __future__ import annotations

import torch

__all__ = ["SDXL_SCHEDULER", "SD_SCHEDULER", "assemble_pipeline", "assemble_xl_pipeline", "default_dtype", "family",
           "pick_device"]

# Stable Diffusion's PNDM configuration (the checkpoints' scheduler_config.json).
SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)

# SDXL's Euler configuration (stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json, the keys Euler reads).
SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    interpolation_type="linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    use_karras_sigmas=False,
)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 halves memory and time on CUDA; CPUs have no fast fp16 path, and the losses need fp32 anyway."""
    return torch.float16 if device.type == "cuda" else torch.float32


def assemble_pipeline(vae, unet, text_encoder):
    """A ``StableDiffusionPipeline`` of these components with SD's PNDM and a fresh shipped CLIP tokenizer
    (its own instance: calls with padding change a fast tokenizer's state)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from binding.tokenizer import load_tokenizer

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer.__wrapped__(),
        unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def family(pipe) -> str:
    """``"sdxl"`` for a pipeline with SDXL's added time/text conditioning (two text encoders), else ``"sd"``."""
    return "sdxl" if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time" else "sd"


def assemble_xl_pipeline(vae, unet, text_encoder, text_encoder_2):
    """A ``StableDiffusionXLPipeline`` of these components with SDXL's Euler and two fresh shipped CLIP
    tokenizers, the second padding with "!" (id 0) as SDXL's ``tokenizer_2`` does. No watermark: it would make
    decoded pictures depend on an optional package."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from binding.tokenizer import SDXL_PAD_TOKEN, load_tokenizer

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=load_tokenizer.__wrapped__(),
        tokenizer_2=load_tokenizer.__wrapped__(pad_token=SDXL_PAD_TOKEN),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        add_watermarker=False,
    )
