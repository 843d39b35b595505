"""Model presets and loading: a hub id, a local diffusers folder, or an offline model (``shapes``, ``tiny``,
``tiny-sdxl``, ``arch:*``).

Every fact about a preset (where it comes from, what it is, its native resolution) lives in ``PRESETS`` and
nowhere else. ``load_pipeline`` turns a preset name or a folder into a ready ``StableDiffusionPipeline`` (or
``StableDiffusionXLPipeline`` for the SDXL family):
half precision on CUDA (the guidance keeps its loss and latent update in fp32), fp32 on CPU, no safety
checker, no progress bar. A model that cannot be had offline fails with ``ModelLoadError`` saying how to
get it, instead of a stack of hub errors.

The ``shapes`` model is the teaching model trained on the shapes world (``binding.shapes``), shipped in
``assets/shapes``: the offline default, it draws coloured shapes on a CPU in seconds and leaks colours like SD.

The ``tiny`` model is Stable Diffusion's architecture in miniature with random weights (the shape of the
tiny pipeline in diffusers' own tests, sized like SD in its layout: cross-attention at two UNet levels,
a mid block, PNDM). It is built in code from a fixed seed, so it needs no download and is bit-identical on
every run and machine. Its images are noise; it exists to exercise and test the mechanics offline.

``tiny-sdxl`` is the same idea for SDXL (as diffusers' own SDXL tests build one): two CLIP text encoders, the
added time/text conditioning, cross-attention at the two lower of three levels, Euler, and a second tokenizer
that pads with "!" as SDXL's does. For tests and mechanics; not offered in the app.

SDXL at its real size needs a GPU: ``sdxl-base`` (``Preset.gpu_only``) is refused on a CPU with a message, and
the app offers it only where CUDA or ZeroGPU is present (``binding.lab.allowed_models``).

The ``arch:*`` models are real Stable Diffusion architectures (SD 1.5, SD 2.1-base, SDXL) with random weights, built
from their published configurations (``binding.architectures``): real-scale timing and memory with no
download, for the benchmark and the GPU check. They are not offered in the app (``Preset.in_app``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from binding.pipelines import assemble_pipeline, default_dtype, pick_device

__all__ = [
    "ModelLoadError",
    "OFFLINE_DEFAULT",
    "PRESETS",
    "Preset",
    "build_tiny_pipeline",
    "build_tiny_sdxl_pipeline",
    "default_model",
    "default_size",
    "describe",
    "load_pipeline",
    "model_name",
    "pick_device",
    "preset",
]


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and how to get it."""


@dataclass(frozen=True)
class Preset:
    """A named model: where its weights come from and how it is meant to be used."""

    name: str
    repo: str | None  # Hugging Face hub id; None for an offline model (shipped or built in code)
    description: str
    resolution: int  # default image side in pixels
    # offline models: "shapes" (assets/shapes), "tiny" / "tiny-sdxl" (built from a seed) or "arch" (``architecture``,
    # a key of ``binding.architectures.ARCHITECTURES``, with random weights)
    builder: str | None = None
    architecture: str | None = None
    family: str = "sd"  # "sd" (StableDiffusionPipeline) or "sdxl" (StableDiffusionXLPipeline)
    vae_scale_factor: int = 8  # pixels per latent pixel (the tiny models': 2)
    gpu_only: bool = False  # refused without CUDA: hours per picture on a CPU
    # The model's own defaults where the papers' do not fit it: {"*": every method, METHOD: that method}, each
    # a dict of settings (steps, intervention_steps, step_size, guidance_scale); see ``binding.settings``.
    defaults: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    examples: tuple[str, ...] = ()  # prompts that suit it (the app's examples)
    in_app: bool = True  # offered in the app's model menu (architecture presets for benchmarks are not)

    def defaults_for(self, method: str) -> dict:
        return {**self.defaults.get("*", {}), **self.defaults.get(method, {})}

    @property
    def latent(self) -> tuple[int, int]:
        """The latent grid at the native resolution."""
        side = self.resolution // self.vae_scale_factor
        return side, side

    @property
    def offline(self) -> bool:
        """Available without any download."""
        return self.repo is None


EVERYDAY_EXAMPLES = (
    "a red apple and a green banana",
    "a yellow flamingo and a pink sunflower",
    "a checkered bowl on a red and blue table",
    "a horned lion and a spotted monkey",
    "a blue car and a red house",
    "a dog that is brown and a cat that is white",
)
# Held-out prompts of the shapes world (never seen in training), where its colours leak.
SHAPES_EXAMPLES = (
    "a blue square and a yellow triangle",
    "a green circle and an orange square",
    "a purple circle and a blue square",
    "a pink square and a red star",
)
# Measured on the shipped model (assets/shapes/README.md). Guidance 5: at the papers' 7.5 the teaching models
# oversaturate, at 3 vanilla binds too well to show a leak on held-out prompts. SynGen's step size and intervened
# steps: a sweep on separate prompts (shapes-calibration, 28 x 4 seeds) on v3, bound - vanilla at ss 1 / 2 / 4 / 8
# (10 of 20 steps guided) +0.125 / +0.152 / +0.045 / -0.045, at ss 2 with 5 / 10 / 15 guided +0.098 / +0.152 /
# +0.188. D&B's 5 and A&E's 2: swept again on v3 (the same prompts x 2 seeds, 15 of 20 guided) at 2 / 5 / 10:
# D&B -0.054 / +0.018 / -0.018, A&E -0.071 / -0.054 / -0.161; neither binds at any size (the card says why).
SHAPES_DEFAULTS = {
    "*": {"steps": 20, "intervention_steps": 15, "guidance_scale": 5.0},
    "syngen": {"step_size": 2.0},
    "attend-excite": {"step_size": 2.0},
    "divide-bind": {"step_size": 5.0},
    "divide-bind-original": {"step_size": 5.0},
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "shapes",
            None,
            "Teaching model trained on coloured shapes (offline, seconds on a CPU; leaks colours like SD)",
            64,
            builder="shapes",
            vae_scale_factor=4,
            defaults=SHAPES_DEFAULTS,  # measured on it: see the comment above SHAPES_DEFAULTS
            examples=SHAPES_EXAMPLES,
        ),
        Preset(
            "tiny",
            None,
            "Tiny random-weight Stable Diffusion built offline (tests, mechanics; images are noise)",
            64,
            builder="tiny",
            vae_scale_factor=2,
            examples=EVERYDAY_EXAMPLES,
        ),
        Preset(
            "sd-1.4",
            "CompVis/stable-diffusion-v1-4",
            "Stable Diffusion 1.4, the base of SynGen and Attend-and-Excite",
            512,
            examples=EVERYDAY_EXAMPLES,
        ),
        Preset(
            "sd-1.5",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "Stable Diffusion 1.5, the base of Divide & Bind",
            512,
            examples=EVERYDAY_EXAMPLES,
        ),
        Preset("sd-2.1-base", "stabilityai/stable-diffusion-2-1-base", "Stable Diffusion 2.1 base (512 px)", 512,
               examples=EVERYDAY_EXAMPLES),
        Preset(
            "arch:sd-1.5",
            None,
            "SD 1.5's architecture (860M-parameter UNet, CLIP ViT-L/14) with random weights: benchmarks and tests",
            512,
            builder="arch",
            architecture="sd-1.5",
            in_app=False,
        ),
        Preset(
            "arch:sd-2.1-base",
            None,
            "SD 2.1-base's architecture (OpenCLIP ViT-H text encoder) with random weights: benchmarks and tests",
            512,
            builder="arch",
            architecture="sd-2.1-base",
            in_app=False,
        ),
        Preset(
            "tiny-sdxl",
            None,
            "Tiny random-weight SDXL built offline (two text encoders, added conditioning; tests, mechanics)",
            128,
            builder="tiny-sdxl",
            family="sdxl",
            vae_scale_factor=2,
            examples=EVERYDAY_EXAMPLES,
            in_app=False,
        ),
        Preset(
            "sdxl-base",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "Stable Diffusion XL base 1.0 (1024 px, two text encoders; needs a GPU)",
            1024,
            family="sdxl",
            gpu_only=True,
            examples=EVERYDAY_EXAMPLES,
        ),
        Preset(
            "arch:sdxl",
            None,
            "SDXL base's architecture (2.6B-parameter UNet, CLIP ViT-L + OpenCLIP ViT-bigG) with random weights: "
            "benchmarks",
            1024,
            builder="arch",
            architecture="sdxl",
            family="sdxl",
            in_app=False,
        ),
    )
}

# The model used when there is no GPU.
OFFLINE_DEFAULT = "shapes"
GPU_DEFAULT = "sd-1.4"

TINY_SEED = 0
# Gain on the tiny model's cross-attention query/key weights. With plain random weights every pixel attends
# almost uniformly to all 77 keys (peak ~1/77) and the losses have nothing to act on; this gain gives peaked
# maps (peak probability ~0.3, like a trained SD's) so the guidance's effect is measurable in tests.
TINY_ATTENTION_GAIN = 5.0
def default_model() -> str:
    """The model to use when none is named: SD 1.4 where a GPU makes it practical, else the offline one."""
    return GPU_DEFAULT if torch.cuda.is_available() else OFFLINE_DEFAULT


def preset(name: str) -> Preset | None:
    """The preset called ``name`` (case-insensitive), or None."""
    return PRESETS.get(str(name).strip().lower())


def preset_for(name_or_path: str) -> Preset | None:
    """The preset whose defaults fit ``name_or_path``: the named one, or ``shapes`` for a folder holding a shapes
    model (a fine-tune or a training candidate), which would draw nothing at Stable Diffusion's defaults."""
    p = preset(name_or_path)
    if p is None and os.path.isdir(os.path.expanduser(str(name_or_path))):
        from binding.shapes.model import is_shapes_folder

        if is_shapes_folder(os.path.expanduser(str(name_or_path))):
            return PRESETS["shapes"]
    return p


def _preset_list() -> str:
    return "; ".join(f"{p.name} ({p.description})" for p in PRESETS.values())


def describe(name_or_path: str) -> str:
    """One line for a banner: what the model is and where it comes from."""
    p = preset(name_or_path)
    if p is not None:
        where = {"shapes": "shipped in assets/shapes, offline", "tiny": "built in, offline",
                 "tiny-sdxl": "built in, offline",
                 "arch": "built in from the published configuration, random weights, offline"}.get(p.builder, p.repo)
        return f"{p.name}: {p.description} [{where}, {p.resolution} px]"
    return f"{name_or_path}: local diffusers Stable Diffusion (or SDXL) checkpoint"


def model_name(pipe) -> str:
    """The name a pipeline was loaded under (preset name or folder), for records."""
    return getattr(pipe, "_binding_model", None) or getattr(pipe, "name_or_path", None) or "unknown"


def default_size(pipe_or_name) -> int:
    """Default image side in pixels: the preset's, else what the UNet was trained at (diffusers' rule)."""
    if isinstance(pipe_or_name, str):
        p = preset(pipe_or_name)
        if p is None:
            raise ValueError(f"{pipe_or_name!r} is not a preset; load it to learn its size")
        return p.resolution
    p = preset(model_name(pipe_or_name))
    if p is not None:
        return p.resolution
    size = pipe_or_name.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return int(size * pipe_or_name.vae_scale_factor)


# ------------------------------------------------------------------------------------------------ tiny


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter from ``generator`` with PyTorch's default-like initialisation.

    Done explicitly (rather than relying on each library's ``_init_weights``) so the tiny model stays the
    same across diffusers/transformers versions and machines: only this function and the seed decide it.
    """
    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
                fan_in = module.weight[0].numel()
                bound = 1.0 / fan_in**0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                done.add(id(module.weight))
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
                    done.add(id(module.bias))
            elif isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                    done.update((id(module.weight), id(module.bias)))
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, 0.02, generator=generator)
                done.add(id(module.weight))
        for p in model.parameters():  # anything else (none in these models today)
            if id(p) not in done:
                p.normal_(0.0, 0.02, generator=generator)


def build_tiny_pipeline(seed: int = TINY_SEED):
    """The offline ``tiny`` model: SD's architecture in miniature, random weights from ``seed``, CPU fp32.

    UNet: block_out_channels (32, 64), one layer per block, 2 and 4 heads, cross_attention_dim 32 (as in
    diffusers' Attend-and-Excite tests), with cross-attention at both levels and in the mid block: as in SD, the
    grid the losses read (the coarser level, 16x16 at 64 px) is not the finest one, so Divide & Bind's finer
    attribute grid exists. VAE: two levels (scale factor 2: 64 px -> 32x32 latents). Text encoder: a 5-layer
    CLIP with CLIP's vocabulary ids (bos 49406, eos/pad 49407), used with the shipped tokenizer. Scheduler:
    SD's PNDM.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG: keep the caller's intact
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),  # diffusers' name; it is the number of heads per level
        )
        vae = _tiny_vae(sample_size=64)
        text_encoder = CLIPTextModel(_tiny_clip_config())
    _finish_tiny((unet, vae, text_encoder), seed)
    return assemble_pipeline(vae, unet, text_encoder)


def _tiny_clip_config(**extra):
    """The tiny models' CLIP text tower: CLIP's vocabulary ids (bos 49406, eos/pad 49407), 32 wide, 5 layers."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=5,
                          num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407, **extra)


def _tiny_vae(**extra):
    """The tiny models' VAE: two levels (scale factor 2), 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, **extra)


def _finish_tiny(models, seed: int) -> None:
    """Seeded weights and the cross-attention gain, the same for both tiny models."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for model in models:
        _randomize(model, generator)
        model.eval()
    with torch.no_grad():
        for module in models[0].modules():
            if getattr(module, "is_cross_attention", False):
                module.to_q.weight.mul_(TINY_ATTENTION_GAIN)
                module.to_k.weight.mul_(TINY_ATTENTION_GAIN)


def build_tiny_sdxl_pipeline(seed: int = TINY_SEED):
    """The offline ``tiny-sdxl`` model: SDXL's layout in miniature, random weights from ``seed``, CPU fp32.

    UNet as SDXL's: three levels, no attention at the finest, cross-attention at the two coarser ones (1 and 2
    transformer layers, as SDXL's 2 and 10) and in the mid block, linear projections, ``text_time`` added
    conditioning (6 time ids x 8 + the pooled 32 = 80 inputs). At 128 px (64x64 latents) the losses read the
    16x16 grid (latents / 4, as SDXL's 32x32 at 1024 px) and Divide & Bind's attributes the 32x32 one. Text
    encoders: two tiny CLIPs, the second with a projection (the pooled embedding); cross_attention_dim 32 + 32.
    VAE: two levels (scale factor 2). Scheduler: SDXL's Euler.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from binding.pipelines import assemble_xl_pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 2, 4),  # heads per level
            use_linear_projection=True,
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
        vae = _tiny_vae(sample_size=128, scaling_factor=0.13025)  # SDXL's latent scale
        text_encoder = CLIPTextModel(_tiny_clip_config())
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(projection_dim=32))
    _finish_tiny((unet, vae, text_encoder, text_encoder_2), seed)
    return assemble_xl_pipeline(vae, unet, text_encoder, text_encoder_2)


# ---------------------------------------------------------------------------------------------- loading


def _how_to_get(repo: str) -> str:
    return (
        f"Download it once on a machine with network access: `huggingface-cli download {repo}` (it is then loaded "
        f"from the Hugging Face cache, also offline), or `huggingface-cli download {repo} --local-dir DIR` and pass "
        f"DIR as the model. Some checkpoints need you to accept their licence on huggingface.co first."
    )


def _from_pretrained(source: str, dtype: torch.dtype, local_files_only: bool | None, family: str = "sd", **kwargs):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    extra = {} if local_files_only is None else {"local_files_only": local_files_only}
    if family == "sdxl":
        # The fp16 files halve the download; the watermark is off so pictures do not depend on an optional package.
        variant = {"variant": "fp16"} if dtype == torch.float16 and not os.path.isdir(source) else {}
        return StableDiffusionXLPipeline.from_pretrained(
            source, torch_dtype=dtype, add_watermarker=False, use_safetensors=True, **variant, **extra, **kwargs
        )
    return StableDiffusionPipeline.from_pretrained(
        source, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, **extra, **kwargs
    )


def _folder_family(folder: Path) -> str:
    """``"sdxl"`` for a folder saved from a ``StableDiffusionXLPipeline``, else ``"sd"``."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "sd"
    return "sdxl" if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")) else "sd"


def _load_folder(folder: Path, dtype: torch.dtype):
    from binding.tokenizer import SDXL_PAD_TOKEN, load_tokenizer

    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers Stable Diffusion folder (no model_index.json). Give a preset "
            f"({', '.join(PRESETS)}) or a folder saved with `pipe.save_pretrained(DIR)` / downloaded with "
            f"`huggingface-cli download REPO --local-dir DIR`."
        )
    extra = {}
    family = _folder_family(folder)
    if not (folder / "tokenizer").is_dir():
        # A fresh instance of the shipped CLIP tokenizer (the same BPE as SD 1.x/2.x and SDXL).
        extra["tokenizer"] = load_tokenizer.__wrapped__()
    if family == "sdxl" and not (folder / "tokenizer_2").is_dir():
        extra["tokenizer_2"] = load_tokenizer.__wrapped__(pad_token=SDXL_PAD_TOKEN)
    try:
        return _from_pretrained(str(folder), dtype, local_files_only=True, family=family, **extra)
    except Exception as exc:  # diffusers raises OSError, ValueError, KeyError... for broken folders
        raise ModelLoadError(f"Cannot load the Stable Diffusion checkpoint in {folder}: {exc}") from exc


def load_pipeline(
    name_or_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
):
    """A ready ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL) for a preset name or a local
    diffusers folder.

    ``device`` defaults to CUDA when available; ``dtype`` to fp16 on CUDA, fp32 elsewhere. Hub presets load
    from the network or the Hugging Face cache (``local_files_only=True``, or HF_HUB_OFFLINE=1, skips the
    network). Raises ``ModelLoadError`` with instructions when the model cannot be had.
    """
    name_or_path = name_or_path or default_model()
    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    p = preset(name_or_path)
    if p is not None and p.gpu_only and device.type != "cuda":
        raise ModelLoadError(
            f"{p.name} needs a CUDA GPU (on a CPU one {p.resolution} px picture takes hours). On this machine try "
            "tiny-sdxl for the mechanics, or `bench --model arch:sdxl` for SDXL-size timings."
        )
    if p is not None and p.builder == "tiny":
        pipe = build_tiny_pipeline()
    elif p is not None and p.builder == "tiny-sdxl":
        pipe = build_tiny_sdxl_pipeline()
    elif p is not None and p.builder == "arch":
        from binding.architectures import build_arch_pipeline

        pipe = build_arch_pipeline(p.architecture, device=device, dtype=dtype)  # built in place: no fp32 copy
    elif p is not None and p.builder == "shapes":
        from binding.shapes.model import build_shapes_pipeline

        try:
            pipe = build_shapes_pipeline(device="cpu", dtype=torch.float32)
        except FileNotFoundError as exc:
            raise ModelLoadError(str(exc)) from exc
    elif p is not None:
        try:
            pipe = _from_pretrained(p.repo, dtype, local_files_only, family=p.family)
        except Exception as exc:
            raise ModelLoadError(
                f"Cannot load {p.name} ({p.repo}) from the Hugging Face hub or its local cache: {exc}\n"
                + _how_to_get(p.repo)
            ) from exc
    elif os.path.isdir(os.path.expanduser(str(name_or_path))):
        pipe = _load_folder(Path(os.path.expanduser(str(name_or_path))), dtype)
    else:
        raise ModelLoadError(
            f"Unknown model {name_or_path!r}: it is neither a preset nor a folder. Presets: {_preset_list()}. "
            f"Or give a local folder holding a diffusers Stable Diffusion checkpoint."
        )
    for component in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if component is not None and component.dtype != dtype:  # hub loads have it already; tiny is built in fp32
            component.to(dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe._binding_model = p.name if p is not None else str(name_or_path)
    return pipe
