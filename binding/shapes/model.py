"""The teaching model: Stable Diffusion's architecture, small enough for a laptop, for the shapes world.
The teaching model: Stable Diffusion's architecture, small enough for a laptop, trained on the shapes world.

Why a model of its own. Stable Diffusion needs a GPU and a 4 GB download, and the random ``tiny`` model draws
noise. This one draws the shapes world (``binding.shapes.world``) in seconds on a CPU and, like Stable Diffusion,
sometimes gives a colour to the wrong object; unlike Stable Diffusion its images can be scored exactly
(``binding.shapes.scorer``), so whether a guidance method helps becomes a measured rate with an interval.

Architecture (``ShapesConfig``), every part the class Stable Diffusion uses, so the guidance runs unchanged:

- VAE: ``AutoencoderKL``, three levels (factor 4): 64x64 images <-> 16x16x4 latents (0.7M parameters).
- UNet: ``UNet2DConditionModel``, channels (64, 128), two layers per block as in SD. Cross-attention sits at
  16x16 (down block 0: 2 layers, up block 1: 3 layers, SD's five read layers) and in the 8x8 mid block; the 8x8
  down/up blocks have none, like SD's deepest level. The guidance reads the coarsest grid the down/up blocks
  cross-attend at (``binding.attention.read_grid``), so here it reads 16x16, one cell per 4x4 pixels: an
  object (14-24 px) covers 3-6 cells and each object's map can be told apart. Cross-attending at 8x8 as well
  would make 8x8 the read grid.
- Text encoder: ``CLIPTextModel`` (hidden 64, 3 layers, 4 heads, CLIP's 49408-token vocabulary and 77
  positions, causal like CLIP) trained from scratch, with the real CLIP tokenizer shipped in ``assets``.
- Scheduler: SD's PNDM (``steps_offset=1``, ``skip_prk_steps``) for sampling; SD's scaled-linear betas and
  epsilon prediction for training.

This module builds, saves and loads the model; ``binding.shapes.train`` trains it. Loading the shipped model
(``build_shapes_pipeline``) needs nothing from the trainer.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from binding.pipelines import assemble_pipeline, pick_device
from binding.shapes import world
from binding.storage import replace_dir

__all__ = [
    "LEGACY_RECIPE",
    "CARD_TITLE",
    "SHAPES_DIR",
    "ShapesConfig",
    "build_models",
    "build_shapes_pipeline",
    "export_pipeline",
    "scene_tensor",
]

SHAPES_DIR = Path(__file__).resolve().parent.parent.parent / "assets" / "shapes"
# The first line of every shapes model card: what marks a folder (a fine-tune, a candidate) as a shapes model,
# so that it gets the shapes defaults and not Stable Diffusion's.
CARD_TITLE = "# shapes: a teaching text-to-image model"
# The recipe fields of v2 with the values v1 (the first shipped model) was trained with.
LEGACY_RECIPE = dict(ground_nouns=0.0, ground_colours=0.0, ground_pixel=0.0, blank_padding=False, padding_weight=0.0,
                     lr_schedule="constant", isolate_colours=False, isolate_weight=0.0)

# -------------------------------------------------------------------------------------------- config


@dataclass
class ShapesConfig:
    """Model sizes and the training recipe; saved beside every run so a resume uses the same ones."""

    resolution: int = 64
    # VAE: len(vae_channels) levels -> factor 2 ** (levels - 1)
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_layers: int = 1
    vae_groups: int = 16
    latent_channels: int = 4
    # UNet: cross-attention at the first level and in the mid block only (see the module docstring)
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers: int = 2
    unet_heads: tuple[int, ...] = (4, 8)
    unet_groups: int = 32
    # text encoder
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_intermediate: int = 256
    # phase 1: VAE
    vae_steps: int = 2000
    vae_batch_size: int = 16
    vae_lr: float = 1e-3  # cosine-decayed to vae_lr_floor * vae_lr over vae_steps: a constant rate ends on a spike
    vae_lr_floor: float = 0.02
    kl_weight: float = 1e-6
    # phase 2: diffusion
    steps: int = 30000
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 500
    lr_schedule: str = "constant"  # or "cosine": see binding.shapes.train.TRAIN_OPTIONS
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # half-life ~700 steps: a CPU run of a few thousand steps still averages its late weights
    cond_dropout: float = 0.1
    snr_gamma: float | None = 5.0
    # recipe v2: make the words carry the caption (see RECIPE_NOTES; each term can be switched off)
    init_from: str | None = None  # an exported shapes model to fine-tune (skips phase 1, keeps its VAE)
    ground_nouns: float = 0.5  # weight of the noun tokens' grounding term (0: off)
    ground_colours: float = 0.0  # weight of the colour words' grounding term (0: off)
    ground_pixel: float = 0.05  # weight of the pixel BCE that goes with each grounding term
    blank_padding: bool = True  # the UNet sees the empty prompt's encoder outputs from EOT on, in training
    padding_weight: float = 1.0  # text-encoder term: EOT and padding outputs equal to the empty prompt's
    isolate_colours: bool = False  # the UNet sees every other word as if the caption had no colour words
    isolate_weight: float = 0.0  # text-encoder term: those outputs equal to the colour-blind encoding
    # bookkeeping
    calibration_scenes: int = 256  # for the latent scale and the scorer-on-VAE check at the end of phase 1
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    data_seed: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("vae_channels", "unet_channels", "unet_heads"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_factor

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ShapesConfig":
        """A stored config; recipe fields it predates get the values that were trained then (recipe v1)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**LEGACY_RECIPE, **{k: v for k, v in d.items() if k in known}})

    @property
    def grounded(self) -> bool:
        return bool(self.ground_nouns or self.ground_colours)

    @classmethod
    def micro(cls, **overrides) -> "ShapesConfig":
        """A few-hundred-kilobyte model of the same layout, for tests."""
        base = dict(
            vae_channels=(8, 16, 16), vae_groups=8, unet_channels=(16, 32), unet_layers=1, unet_heads=(2, 4),
            unet_groups=8, text_hidden=16, text_layers=1, text_heads=2, text_intermediate=32, vae_steps=2,
            vae_batch_size=4, steps=4, batch_size=4, warmup_steps=2, calibration_scenes=8, checkpoint_every=2,
            log_every=1,
        )
        base.update(overrides)
        return cls(**base)

def build_models(cfg: ShapesConfig, seed: int | None = None):
    """Fresh (vae, unet, text_encoder) for ``cfg``, initialised from ``seed`` without touching the global RNG."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = len(cfg.unet_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=cfg.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
            layers_per_block=cfg.vae_layers,
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.vae_groups,
            sample_size=cfg.resolution,
        )
        unet = UNet2DConditionModel(
            sample_size=cfg.latent_size,
            in_channels=cfg.latent_channels,
            out_channels=cfg.latent_channels,
            block_out_channels=cfg.unet_channels,
            layers_per_block=cfg.unet_layers,
            down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (levels - 1),
            up_block_types=("UpBlock2D",) * (levels - 1) + ("CrossAttnUpBlock2D",),
            mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=cfg.text_hidden,
            attention_head_dim=cfg.unet_heads,  # diffusers' name for SD 1.x's number of heads per level
            norm_num_groups=cfg.unet_groups,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=cfg.text_hidden,
                intermediate_size=cfg.text_intermediate,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    return vae, unet, text_encoder


def scene_tensor(scenes: Sequence[world.Scene], size: int) -> torch.Tensor:
    """(B, 3, size, size) float32 in [-1, 1], the range SD's VAE works in."""
    arr = np.stack([s.array(size) for s in scenes]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())

# ------------------------------------------------------------------------------------------ exporting


def export_pipeline(folder: str | Path, vae, unet, text_encoder, card: str | None = None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Save a diffusers Stable Diffusion folder (safetensors, SD's PNDM, the shipped CLIP tokenizer).

    Written beside ``folder`` and exchanged with it in one atomic rename, so a reader never sees half a model.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with _quiet():
            assemble_pipeline(vae, unet, text_encoder).save_pretrained(tmp, safe_serialization=True)
        # The tokenizer as the shipped vocab.json + merges.txt (1.5 MB) rather than tokenizer.json (3.5 MB).
        from binding.tokenizer import ASSET_DIR

        (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(ASSET_DIR / name, tmp / "tokenizer" / name)
        if card:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        if extra is not None:  # more files for the folder (the trainer's loss curves)
            extra(tmp)
        replace_dir(tmp, folder)  # atomic: a kill leaves the old model or the new one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class _quiet:
    """No progress bars from diffusers/transformers while saving or loading (they clutter training logs)."""

    def __enter__(self):
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        self.was = (dl.is_progress_bar_enabled(), tl.is_progress_bar_enabled())
        dl.disable_progress_bar()
        tl.disable_progress_bar()

    def __exit__(self, *exc):
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        if self.was[0]:
            dl.enable_progress_bar()
        if self.was[1]:
            tl.enable_progress_bar()


def is_shapes_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model trained on the shapes world (its card says so)."""
    card = Path(folder) / "README.md"
    try:
        with card.open(encoding="utf-8", errors="replace") as f:
            return f.readline().strip() == CARD_TITLE
    except OSError:
        return False


def build_shapes_pipeline(folder: str | Path | None = None, device: str | torch.device | None = None, dtype=None):
    """The shapes model as a ready ``StableDiffusionPipeline`` (default folder: ``assets/shapes``).

    Raises ``FileNotFoundError`` saying how to train it when the folder holds no weights.
    """
    from diffusers import StableDiffusionPipeline

    from binding.tokenizer import load_tokenizer

    folder = Path(folder) if folder is not None else SHAPES_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder} holds no trained shapes model (no model_index.json). Train one with "
            f"`python -m binding teach train --out runs/shapes` and copy runs/shapes/pipeline there."
        )
    device = pick_device(device)
    dtype = dtype or torch.float32  # small model: fp32 everywhere; the guidance's losses want fp32 anyway
    extra = {} if (folder / "tokenizer").is_dir() else {"tokenizer": load_tokenizer.__wrapped__()}
    with _quiet():
        pipe = StableDiffusionPipeline.from_pretrained(
            str(folder),
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=True,
            **extra,
        )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe._binding_model = "shapes" if folder.resolve() == SHAPES_DIR.resolve() else str(folder)
    return pipe
