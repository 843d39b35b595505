"""Stable Diffusion's real architectures with random weights, built offline: real-scale figures without weights.

Timing and memory depend on the shapes of the networks and not on the values of their weights, so a UNet,
VAE and text encoder built from the published configurations and filled with seeded random numbers cost what
the real checkpoints cost: the 512 px benchmark and the GPU check run on them with no download. Their
pictures are noise and their attention maps carry no meaning, so a refinement that waits for a threshold
runs to its cap (every one did in our runs); the benchmark's floor counts the passes actually made, so its
ratios stay honest. For benchmarks and tests only; the app never offers them
(``binding.models.Preset.in_app``).

The configurations are the ``config.json`` files of the checkpoints' ``unet/``, ``vae/``, ``text_encoder/`` (and
``text_encoder_2/``) folders as published on the Hugging Face hub (stable-diffusion-v1-5/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1-base and stabilityai/stable-diffusion-xl-base-1.0), written out here key by key,
as far as they differ from the libraries' defaults; the tokenizers are the shipped CLIP one (``binding.tokenizer``;
SDXL's second pads with "!"), the schedulers SD's PNDM and SDXL's Euler (``binding.pipelines``).

Construction is on the ``meta`` device (no memory, no initialisation), then the tensors are allocated on the
target device in the target dtype and filled once from a seeded CPU generator, the same values on every machine
for a given torch version. The whole SD 1.5 pipeline (1.07B parameters) takes about 14 s on the project's
2-core machine, half of it drawing the numbers and half touching 4.3 GB of fresh memory.

SDXL (``arch:sdxl``) adds a second text encoder (OpenCLIP ViT-bigG's text tower with its projection: the pooled
embedding) and is assembled into a ``StableDiffusionXLPipeline``: 3.5B parameters, 14 GB in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from binding.pipelines import assemble_pipeline

__all__ = ["ARCHITECTURES", "ARCH_SEED", "Architecture", "build_arch_pipeline", "fill_random"]

ARCH_SEED = 0

# --- Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5) ------------------------------------

SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,  # diffusers' name: 8 heads at every level
    block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    upcast_attention=False,
    use_linear_projection=False,
)

# The same VAE (kl-f8) for SD 1.x and 2.x; SD 2.1-base's config says sample_size 768, which changes nothing here.
SD_VAE = dict(
    act_fn="silu",
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=512,
    scaling_factor=0.18215,
    up_block_types=("UpDecoderBlock2D",) * 4,
)

# CLIP ViT-L/14's text tower (OpenAI). The token ids are the published config's (transformers' legacy
# values); SD uses the last hidden state, never the pooled output they would select.
CLIP_VIT_L14_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

# --- Stable Diffusion 2.1-base (stabilityai/stable-diffusion-2-1-base) -------------------------------------

SD21_BASE_UNET = {
    **SD15_UNET,
    "attention_head_dim": (5, 10, 20, 20),  # heads per level (64 channels each)
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}

# OpenCLIP ViT-H/14's text tower as SD 2.x uses it: 23 of its 24 layers (SD takes the penultimate layer).
OPENCLIP_VIT_H14_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


# --- Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0) -------------------------------

SDXL_UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20),  # heads per level (64 channels each)
    block_out_channels=(320, 640, 1280),
    center_input_sample=False,
    cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG), concatenated
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the pooled 1280
    sample_size=128,
    transformer_layers_per_block=(1, 2, 10),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
)

# The kl-f8 VAE retrained for SDXL: same layout, its own scaling; it overflows in fp16, hence force_upcast.
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's text_encoder_2).
OPENCLIP_VIT_BIGG14_TEXT = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=1280,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


@dataclass(frozen=True)
class Architecture:
    """One published model's component configurations."""

    unet: Mapping
    vae: Mapping
    text_encoder: Mapping
    source: str  # the hub repository whose config.json files these are
    pipeline: str = "sd"  # "sd": StableDiffusionPipeline; "sdxl": StableDiffusionXLPipeline (needs text_encoder_2)
    text_encoder_2: Mapping | None = None  # SDXL's second text encoder, with projection


ARCHITECTURES: dict[str, Architecture] = {
    "sd-1.5": Architecture(SD15_UNET, SD_VAE, CLIP_VIT_L14_TEXT, "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sd-2.1-base": Architecture(SD21_BASE_UNET, SD_VAE, OPENCLIP_VIT_H14_TEXT, "stabilityai/stable-diffusion-2-1-base"),
    "sdxl": Architecture(SDXL_UNET, SDXL_VAE, CLIP_VIT_L14_TEXT, "stabilityai/stable-diffusion-xl-base-1.0",
                         pipeline="sdxl", text_encoder_2=OPENCLIP_VIT_BIGG14_TEXT),
}


def fill_random(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded weights at the scale PyTorch's default initialisation gives (variance 1 / (3 fan_in)), drawn on
    the CPU parameter by parameter (the values do not depend on the target device) and copied in place.

    Matrices and kernels: normal noise; norm scales 1; biases 0. Every buffer must be one this module knows
    how to set, so a library change cannot leave uninitialised memory in a model.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                std = (3.0 * p[0].numel()) ** -0.5
                p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=generator))
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                raise ValueError(f"fill_random: no rule for parameter {name} of shape {tuple(p.shape)}")
        for name, b in model.named_buffers():
            if name.endswith("position_ids"):  # CLIP's text embeddings: 0..76
                b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
            else:
                raise ValueError(f"fill_random: no rule for buffer {name} of shape {tuple(b.shape)}")


def _materialise(build, device, dtype, generator) -> torch.nn.Module:
    with torch.device("meta"):
        model = build().to(dtype=dtype)
    model = model.to_empty(device=device)
    fill_random(model, generator)
    return model.eval()


def build_arch_pipeline(name: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = ARCH_SEED):
    """A ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL) of architecture ``name`` (a key of
    ``ARCHITECTURES``) with random weights, allocated directly on ``device`` in ``dtype`` (an fp16 SD 1.5 on
    CUDA never holds fp32 copies)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from binding.pipelines import assemble_xl_pipeline

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    unet = _materialise(lambda: UNet2DConditionModel(**arch.unet), device, dtype, generator)
    vae = _materialise(lambda: AutoencoderKL(**arch.vae), device, dtype, generator)
    text_encoder = _materialise(lambda: CLIPTextModel(CLIPTextConfig(**arch.text_encoder)), device, dtype, generator)
    if arch.pipeline == "sdxl":
        text_encoder_2 = _materialise(
            lambda: CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_encoder_2)), device, dtype, generator
        )
        return assemble_xl_pipeline(vae, unet, text_encoder, text_encoder_2)
    return assemble_pipeline(vae, unet, text_encoder)
