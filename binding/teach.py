"""The teaching model: Stable Diffusion's architecture, small enough for a laptop, trained on the shapes world.

Why a model of its own. Stable Diffusion needs a GPU and a 4 GB download, and the random ``tiny`` model draws
noise. This one draws the shapes world (``binding.world``) in seconds on a CPU and, like Stable Diffusion,
sometimes gives a colour to the wrong object; unlike Stable Diffusion its images can be scored exactly
(``binding.scorer``), so whether a guidance method helps becomes a measured rate with an interval.

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

Training (``train``), two phases, one command, resumable exactly:

1. VAE alone (reconstruction MSE + a small KL, cosine-decayed rate), then its latent scale (``scaling_factor`` = 1 / std of the
   latents, SD's 0.18215 rule) is measured. First and apart, because the diffusion model must learn a fixed
   latent space: training both at once moves the target under the UNet and leaves the scale unknown.
2. UNet and text encoder together on the frozen VAE's latents: noise-prediction MSE with min-SNR weighting
   (gamma 5: each timestep's target is unchanged, convergence is faster), 10% empty captions for classifier-free guidance, AdamW,
   linear warm-up then a constant rate (so a run can be extended), gradient clipping, EMA of the weights
   (what is exported).

Every batch is a pure function of the step (scenes ``training_scene(step * batch + i)``) and all noise comes
from one CPU generator saved in each checkpoint, so the data and noise do not depend on the device and a resumed
run continues bit for bit (on the same kind of machine; another device rounds differently). CUDA is
used when present; on a CPU the run goes on in the background for hours and can be stopped (Ctrl-C, SIGTERM,
``--max-minutes``) and resumed at any time. Each checkpoint also exports the EMA model as a diffusers folder
(``OUT/pipeline``) with a model card, ready for ``StableDiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from binding import world
from binding.stats import bootstrap_paired, newcombe_paired, wilson

__all__ = [
    "SHAPES_DIR",
    "ShapesConfig",
    "Trainer",
    "add_teach_commands",
    "bootstrap_paired",
    "build_models",
    "build_shapes_pipeline",
    "export_pipeline",
    "format_summary",
    "newcombe_paired",
    "score",
    "summarize",
    "train",
    "wilson",
]

SHAPES_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes"
CHECKPOINT_FORMAT = 1
PHASES = ("vae", "diffusion")
# The recipe fields of v2 with the values v1 (the first shipped model) was trained with.
LEGACY_RECIPE = dict(ground_nouns=0.0, ground_colours=0.0, ground_pixel=0.0, blank_padding=False, padding_weight=0.0)
# Why each recipe v2 term exists: written into every model card.
RECIPE_NOTES = {
    "ground_nouns": "TokenCompose-style grounding (Wang et al., CVPR 2024): at every read layer, each noun's "
                    "attention map, normalised over pixels, must put its mass inside its object's mask, "
                    "`(1 - mass inside)^2`, plus a small pixel BCE. The world's exact masks make this free. "
                    "Without it no word's map is object-specific (own-object share 0.50-0.51) and the guidance "
                    "losses have nothing to act on.",
    "ground_colours": "The same for colour words. Off by default: grounding them makes their maps follow the "
                      "blob of their colour whatever its shape, which removes the leak the lab must show and "
                      "leaves SynGen without effect (probe before v2).",
    "blank_padding": "In training the UNet sees the empty prompt's encoder outputs at EOT and every padding "
                     "position. CLIP is causal and pads with EOT, so each padding position sums up the whole "
                     "caption: v1 read 71-90% of its cross-attention there and bound colours caption-wide.",
    "padding_weight": "A text-encoder term keeps its EOT and padding outputs equal to the empty prompt's, so "
                      "the stock pipeline at inference feeds the UNet what it saw in training.",
    "init_from": "Fine-tuned from the v1 model (its VAE and latent scale kept), within a 2-hour CPU budget.",
}


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


# -------------------------------------------------------------------------------------------- models


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


def _training_schedule():
    """SD's training noise schedule (scaled-linear betas, 1000 steps): alphas_cumprod as float64."""
    from diffusers import DDPMScheduler

    from binding.models import SD_SCHEDULER

    s = DDPMScheduler(
        beta_start=SD_SCHEDULER["beta_start"],
        beta_end=SD_SCHEDULER["beta_end"],
        beta_schedule=SD_SCHEDULER["beta_schedule"],
        num_train_timesteps=SD_SCHEDULER["num_train_timesteps"],
    )
    return s.alphas_cumprod.to(torch.float64)


def _images(scenes: Sequence[world.Scene], size: int) -> torch.Tensor:
    """(B, 3, size, size) float32 in [-1, 1], the range SD's VAE works in."""
    arr = np.stack([s.array(size) for s in scenes]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ exporting


def _pipeline(vae, unet, text_encoder):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from binding.models import SD_SCHEDULER
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


def export_pipeline(folder: str | Path, vae, unet, text_encoder, card: str | None = None,
                    history: dict | None = None) -> Path:
    """Save a diffusers Stable Diffusion folder (safetensors, SD's PNDM, the shipped CLIP tokenizer).

    Written beside ``folder`` and renamed into place, so a reader never sees half a model.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with _quiet():
            _pipeline(vae, unet, text_encoder).save_pretrained(tmp, safe_serialization=True)
        # The tokenizer as the shipped vocab.json + merges.txt (1.5 MB) rather than tokenizer.json (3.5 MB).
        from binding.tokenizer import ASSET_DIR

        (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(ASSET_DIR / name, tmp / "tokenizer" / name)
        if card:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        if history:
            loss_curve(history, tmp / "loss.png")
        old = folder.with_name(f".{folder.name}-old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
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


def build_shapes_pipeline(folder: str | Path | None = None, device: str | torch.device | None = None, dtype=None):
    """The shapes model as a ready ``StableDiffusionPipeline`` (default folder: ``assets/shapes``).

    Raises ``FileNotFoundError`` saying how to train it when the folder holds no weights.
    """
    from diffusers import StableDiffusionPipeline

    from binding.models import pick_device
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


# ------------------------------------------------------------------------------------------- training


class _EMA:
    """Exponential moving average of parameters (decay warms up as (1 + n) / (10 + n), as in diffusers)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_([self.shadow[k] for k in params], [v.detach() for v in params.values()], 1.0 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU {_cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"


def loss_curve(history: dict[str, list], path: str | Path) -> Path:
    """The training losses of both phases as a PNG (log scale): what the model card shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    for ax, phase, what in ((axes[0], "vae", "VAE: reconstruction MSE"),
                            (axes[1], "diffusion", "UNet + text encoder: noise-prediction MSE")):
        rows = history.get(phase) or []
        if rows:
            ax.plot([r[0] for r in rows], [r[1] for r in rows], lw=1.2, color="#1f77b4")
            ax.set_yscale("log")
        ax.set_title(what, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _tail_mask(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """(B, 77) bool: the first EOT and every position after it (CLIP pads with EOT)."""
    return (ids == eos).long().cumsum(1) > 0


def object_targets(scenes: Sequence[world.Scene], ids: torch.Tensor, grid: tuple[int, int], dropped=None):
    """Where each object's words sit and which cells of the read grid it covers.

    Returns ``pos`` (B, J, 2) long: the CLIP positions of each object's (colour, shape) words; ``masks``
    (B, J, gh*gw) float: 1 on the cells the object touches; ``valid`` (B, J) bool. J = most objects in a scene;
    dropped (empty-caption) rows have no valid object. Every word of the world is one CLIP token and a
    scene's colours and shapes are distinct, so each word's id occurs once in its caption.
    """
    from binding.tokenizer import load_tokenizer

    tok = load_tokenizer()
    gh, gw = grid
    j = max(len(s.objects) for s in scenes)
    pos = torch.zeros(len(scenes), j, 2, dtype=torch.long)
    masks = torch.zeros(len(scenes), j, gh * gw)
    valid = torch.zeros(len(scenes), j, dtype=torch.bool)
    for b, scene in enumerate(scenes):
        if dropped is not None and bool(dropped[b]):
            continue
        row = ids[b].tolist()
        for k, obj in enumerate(scene.objects):
            for c, word in enumerate(obj.pair):
                pos[b, k, c] = row.index(tok.convert_tokens_to_ids(word + "</w>"))
            m = world.object_mask(obj, world.CANVAS)
            cells = m.reshape(gh, m.shape[0] // gh, gw, m.shape[1] // gw).any(axis=(1, 3))
            masks[b, k] = torch.from_numpy(cells.reshape(-1).astype(np.float32))
            valid[b, k] = True
    return pos, masks, valid


class Trainer:
    """Both phases of ``train``; holds models, optimiser, EMA and the noise generator (see the module docstring)."""

    def __init__(
        self,
        out: str | Path,
        cfg: ShapesConfig | None = None,
        device: str | torch.device | None = None,
        log: Callable[[str], None] = print,
    ):
        from binding.models import pick_device
        from binding.tokenizer import load_tokenizer

        self.out = Path(out)
        self.device = pick_device(device)
        self.log = log
        saved = self.out / "config.json"
        if saved.is_file():
            stored = ShapesConfig.from_dict(json.loads(saved.read_text())["config"])
            if cfg is not None:
                # Only the length of the run and its bookkeeping may change when resuming.
                free = {"steps", "vae_steps", "checkpoint_every", "keep_checkpoints", "log_every"}
                clash = [f.name for f in dataclasses.fields(cfg) if f.name not in free
                         and getattr(cfg, f.name) != getattr(stored, f.name)]
                if clash:
                    raise ValueError(
                        f"{self.out} was trained with other settings ({', '.join(clash)}); use a new --out"
                    )
                stored = dataclasses.replace(stored, **{k: getattr(cfg, k) for k in free})
            cfg = stored
        self.cfg = cfg = cfg or ShapesConfig()
        self.vae, self.unet, self.text_encoder = (m.to(self.device) for m in build_models(cfg))
        self.tokenizer = load_tokenizer.__wrapped__()
        self.alphas_cumprod = _training_schedule()
        self.phase, self.step = "vae", 0
        self.elapsed = {"vae": 0.0, "diffusion": 0.0}
        self.generator = torch.Generator("cpu").manual_seed(cfg.seed + 1)
        self.scaling_factor: float | None = None
        self.vae_roundtrip: dict | None = None
        self.hardware: list[str] = []  # every machine the run was trained on, in order
        self.history: dict[str, list] = {"vae": [], "diffusion": []}  # (step, mean loss over log_every)
        self._new_optimizer()
        self._ids: dict[str, torch.Tensor] = {}
        self._window: list[float] = []
        self._terms_window: list[dict[str, float]] = []
        self.base: dict | None = None  # the model a fine-tune started from
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # ---- state

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        if self.phase == "vae":
            return {f"vae.{k}": p for k, p in self.vae.named_parameters()}
        return {
            **{f"unet.{k}": p for k, p in self.unet.named_parameters()},
            **{f"text_encoder.{k}": p for k, p in self.text_encoder.named_parameters()},
        }

    def _new_optimizer(self) -> None:
        cfg = self.cfg
        params = list(self._trainable().values())
        lr = cfg.vae_lr if self.phase == "vae" else cfg.lr
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
        self.ema = _EMA(self._trainable(), cfg.ema_decay) if self.phase == "diffusion" else None
        for m in (self.vae, self.unet, self.text_encoder):
            m.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "phase": self.phase,
            "step": self.step,
            "elapsed": dict(self.elapsed),
            "vae": self.vae.state_dict(),
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "generator": self.generator.get_state(),
            "scaling_factor": self.scaling_factor,
            "vae_roundtrip": self.vae_roundtrip,
            "hardware": self.hardware,
            "history": self.history,
            "base": self.base,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {state.get('format')!r}")
        self.phase, self.step = state["phase"], int(state["step"])
        self.elapsed = dict(state["elapsed"])
        for name in ("vae", "unet", "text_encoder"):
            getattr(self, name).load_state_dict(state[name])
        self.scaling_factor = state["scaling_factor"]
        if self.scaling_factor is not None:
            self.vae.register_to_config(scaling_factor=float(self.scaling_factor))
        self.vae_roundtrip = state.get("vae_roundtrip")
        self.hardware = list(state.get("hardware", []))
        self.history = state["history"]
        self.base = state.get("base")
        self._new_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"].cpu())

    def checkpoints(self) -> list[Path]:
        """Saved checkpoints, oldest first."""
        found = (self.out / "checkpoints").glob("*.pt")
        return sorted(found, key=lambda p: (PHASES.index(p.stem.split("-")[0]), p.stem))

    def resume(self) -> bool:
        """Load the latest checkpoint, if any."""
        found = self.checkpoints()
        if not found:
            return False
        state = torch.load(found[-1], map_location="cpu", weights_only=False)  # copied to the device on load
        self.load_state_dict(state)
        self.log(f"resumed from {found[-1]} ({self.phase} step {self.step})")
        return True

    def save_checkpoint(self) -> Path:
        ckdir = self.out / "checkpoints"
        ckdir.mkdir(parents=True, exist_ok=True)
        path = ckdir / f"{self.phase}-{self.step:07d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        for old in [p for p in self.checkpoints() if p.stem.startswith(self.phase)][: -self.cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
        for old in [p for p in self.checkpoints() if p.stem.startswith("vae")] if self.phase == "diffusion" else []:
            old.unlink(missing_ok=True)  # a diffusion checkpoint holds the final VAE too
        return path

    # ---- one step of each phase

    def _scenes(self, batch: int) -> list[world.Scene]:
        offset = (0 if self.phase == "vae" else 1) << 36  # the phases draw from disjoint parts of the stream
        return [world.training_scene(offset + self.step * batch + i, self.cfg.data_seed) for i in range(batch)]

    def vae_step(self) -> float:
        cfg = self.cfg
        x = _images(self._scenes(cfg.vae_batch_size), cfg.resolution).to(self.device)
        posterior = self.vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=self.generator).to(self.device)
        z = posterior.mean + posterior.std * eps
        recon = self.vae.decode(z).sample
        loss = F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        progress = min(1.0, self.step / max(1, cfg.vae_steps))
        scale = cfg.vae_lr_floor + (1 - cfg.vae_lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.vae_lr * scale
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        return loss.item()

    def _token_ids(self, captions: Sequence[str]) -> torch.Tensor:
        rows = []
        for c in captions:
            if c not in self._ids:
                ids = self.tokenizer(c, padding="max_length", max_length=77, truncation=True).input_ids
                self._ids[c] = torch.tensor(ids, dtype=torch.long)
            rows.append(self._ids[c])
        return torch.stack(rows).to(self.device)

    def diffusion_step(self) -> float:
        cfg = self.cfg
        scenes = self._scenes(cfg.batch_size)
        b = len(scenes)
        g = self.generator
        drop = torch.rand(b, generator=g) < cfg.cond_dropout
        captions = ["" if d else s.caption for s, d in zip(scenes, drop.tolist())]
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=g)
        eps_vae = torch.randn((b, cfg.latent_channels, cfg.latent_size, cfg.latent_size), generator=g)
        noise = torch.randn((b, cfg.latent_channels, cfg.latent_size, cfg.latent_size), generator=g)
        with torch.no_grad():
            posterior = self.vae.encode(_images(scenes, cfg.resolution).to(self.device)).latent_dist
            latents = (posterior.mean + posterior.std * eps_vae.to(self.device)) * self.scaling_factor
        acp = self.alphas_cumprod[t]
        noise = noise.to(self.device)
        noisy = (
            acp.sqrt().float().view(-1, 1, 1, 1).to(self.device) * latents
            + (1 - acp).sqrt().float().view(-1, 1, 1, 1).to(self.device) * noise
        )
        ids = self._token_ids(captions)
        cond = self.text_encoder(ids)[0]
        terms: dict[str, torch.Tensor] = {}
        if cfg.blank_padding or cfg.padding_weight:
            empty = self.text_encoder(self._token_ids([""]))[0]
            tail = _tail_mask(ids, self.tokenizer.eos_token_id)[..., None]  # EOT and every padding position
            if cfg.padding_weight:
                terms["padding"] = ((cond - empty.detach()).pow(2) * tail).sum() / (tail.sum() * cond.shape[-1])
            if cfg.blank_padding:
                cond = torch.where(tail, empty.expand_as(cond), cond)
        if cfg.grounded:
            from binding.attention import AttentionCapture

            with AttentionCapture(self.unet, cfg.resolution, cfg.resolution, cfg.vae_factor) as capture:
                with capture.record(batch_index=None) as rec:
                    pred = self.unet(noisy, t.to(self.device), encoder_hidden_states=cond).sample
                terms.update(self._grounding(rec.layer_maps(), scenes, ids, drop))
        else:
            pred = self.unet(noisy, t.to(self.device), encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma:
            snr = acp / (1 - acp)
            weight = (torch.clamp(snr, max=cfg.snr_gamma) / snr).float().to(self.device)
            loss = (per_sample * weight).mean()
        else:
            loss = per_sample.mean()
        weights = {"padding": cfg.padding_weight, "ground_nouns": cfg.ground_nouns,
                   "ground_colours": cfg.ground_colours, "pixel_nouns": cfg.ground_pixel,
                   "pixel_colours": cfg.ground_pixel}
        for name, value in terms.items():
            loss = loss + weights[name] * value
        lr = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self._trainable().values()), cfg.grad_clip)
        self.optimizer.step()
        self.ema.update(self._trainable())
        self._terms_window.append({k: float(v.detach()) for k, v in terms.items()})
        return per_sample.mean().item()  # the unweighted loss: comparable across recipes

    def _grounding(self, layer_maps: dict[str, torch.Tensor], scenes, ids: torch.Tensor, dropped) -> dict:
        """The grounding terms: for each word kind switched on, the mean over read layers and objects of
        ``(1 - mass of the word's normalised map inside its object)^2``, and the pixel BCE of its map."""
        cfg = self.cfg
        gh, gw = next(iter(layer_maps.values())).shape[1:3]
        pos, masks, valid = object_targets(scenes, ids, (gh, gw), dropped)
        if not valid.any():
            return {}
        pos, masks, valid = pos.to(self.device), masks.to(self.device), valid.to(self.device)
        out = {}
        for kind, column, weight in (("nouns", 1, cfg.ground_nouns), ("colours", 0, cfg.ground_colours)):
            if not weight:
                continue
            token, pixel = [], []
            for m in layer_maps.values():
                flat = m.flatten(1, 2)  # (B, HW, keys)
                idx = pos[..., column]  # (B, J)
                a = torch.gather(flat, 2, idx[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)  # (B, J, HW)
                inside = (a / a.sum(-1, keepdim=True).clamp_min(1e-8) * masks).sum(-1)
                token.append(((1 - inside) ** 2)[valid].mean())
                pixel.append(F.binary_cross_entropy(a[valid].clamp(1e-6, 1 - 1e-6), masks[valid]))
            out[f"ground_{kind}"] = torch.stack(token).mean()
            if cfg.ground_pixel:
                out[f"pixel_{kind}"] = torch.stack(pixel).mean()
        return out

    # ---- phase transitions and export

    def start_from(self, folder: str | Path) -> None:
        """Phase 2 from an exported shapes model: its VAE and latent scale kept, UNet and text encoder trained on.

        The architecture in ``cfg`` must be the exported one (loading the weights checks it).
        """
        folder = Path(folder)
        pipe = build_shapes_pipeline(folder, device="cpu")
        for name in ("vae", "unet", "text_encoder"):
            getattr(self, name).load_state_dict(getattr(pipe, name).state_dict())
        self.scaling_factor = float(pipe.vae.config.scaling_factor)
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        card = folder / "README.md"
        steps = None
        if card.is_file():
            import re

            m = re.search(r"Phase 2, diffusion: (\d+)", card.read_text(encoding="utf-8"))
            steps = int(m.group(1)) if m else None
        self.base = {"folder": str(folder), "diffusion_steps": steps}
        self.phase, self.step = "diffusion", 0
        self._new_optimizer()  # its EMA starts at the loaded weights
        self.vae_roundtrip = self._vae_roundtrip()
        self.log(f"fine-tuning {folder} ({steps or '?'} diffusion steps); scorer on its VAE round trips "
                 f"{self.vae_roundtrip['correct']}/{self.vae_roundtrip['objects']} objects")

    @torch.no_grad()
    def _finish_vae(self) -> None:
        """Measure the latent scale and how well the scorer reads VAE round trips, then start phase 2."""
        cfg = self.cfg
        self.vae.eval()
        calib = [world.training_scene((2 << 36) + i, cfg.data_seed) for i in range(cfg.calibration_scenes)]
        zs = [self.vae.encode(_images(calib[i : i + 64], cfg.resolution).to(self.device)).latent_dist.mean
              for i in range(0, len(calib), 64)]
        self.scaling_factor = float(1.0 / torch.cat(zs).float().std())
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        self.vae_roundtrip = self._vae_roundtrip()
        ok, total = self.vae_roundtrip["correct"], self.vae_roundtrip["objects"]
        self.log(f"vae: scaling factor {self.scaling_factor:.4f}; scorer on VAE round trips {ok}/{total} objects")
        if ok < 0.95 * total:
            self.log("warning: the scorer misreads many VAE round trips; the model's scores will be capped by the VAE "
                     "(train the VAE longer: a new --out with a larger --vae-steps)")
        self.phase, self.step = "diffusion", 0
        self._new_optimizer()

    @torch.no_grad()
    def _vae_roundtrip(self) -> dict:
        """The scorer on VAE round trips of scenes from the whole world: the ceiling of any score of the model."""
        from binding.scorer import detect

        cfg = self.cfg
        self.vae.eval()
        scenes = [world.sample_scene((3 << 36) + i, split="any") for i in range(cfg.calibration_scenes)]
        ok = total = 0
        for i in range(0, len(scenes), 64):
            batch = scenes[i : i + 64]
            x = _images(batch, cfg.resolution).to(self.device)
            rec = self.vae.decode(self.vae.encode(x).latent_dist.mean).sample
            imgs = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            for scene, img in zip(batch, imgs):
                got = [d.pair for d in detect(img)]
                for pair in scene.pairs:
                    total += 1
                    if pair in got:
                        ok += 1
                        got.remove(pair)
        return {"objects": total, "correct": ok, "accuracy": ok / total}

    def model_card(self) -> str:
        return _model_card(self)

    def export(self, folder: str | Path | None = None) -> Path:
        """The EMA weights as a diffusers folder (default ``OUT/pipeline``), with the model card."""
        if self.phase != "diffusion":
            raise RuntimeError("the VAE phase is not finished: there is no diffusion model to export yet")
        vae, unet, text_encoder = build_models(self.cfg)
        with torch.no_grad():
            for name, copy in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
                copy.load_state_dict(getattr(self, name).state_dict())
                if name != "vae":
                    for k, p in copy.named_parameters():
                        p.copy_(self.ema.shadow[f"{name}.{k}"])
        vae.register_to_config(scaling_factor=float(self.scaling_factor))
        folder = folder or self.out / "pipeline"
        return export_pipeline(folder, vae.cpu(), unet.cpu(), text_encoder.cpu(), self.model_card(), self.history)

    # ---- the loop

    def run(self, max_steps: int | None = None, max_minutes: float | None = None) -> dict:
        """Train until both phases are done, or ``max_steps`` steps / ``max_minutes`` in this call, or a signal.

        Always leaves a checkpoint behind (and, in phase 2, an exported pipeline).
        """
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(
            json.dumps({"config": cfg.to_dict(), "device": str(self.device)}, indent=2), encoding="utf-8"
        )
        stop = {"why": None}
        if not self.hardware or self.hardware[-1] != _hardware(self.device):
            self.hardware.append(_hardware(self.device))

        def on_signal(signum, frame):
            if stop["why"] is not None:  # asked twice: stop now, without a checkpoint
                raise KeyboardInterrupt
            stop["why"] = signal.Signals(signum).name
            self.log(f"{stop['why']}: finishing this step and saving a checkpoint (again to stop at once)")

        handlers = {}
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, on_signal)
        done_here, t_call = 0, time.perf_counter()
        logf = open(self.out / "log.jsonl", "a", encoding="utf-8")
        try:
            while True:
                total = cfg.vae_steps if self.phase == "vae" else cfg.steps
                if self.step >= total:
                    if self.phase == "vae":
                        self.save_checkpoint()
                        self._finish_vae()
                        self.save_checkpoint()
                        continue
                    break
                if stop["why"] or (max_steps is not None and done_here >= max_steps) or (
                    max_minutes is not None and time.perf_counter() - t_call >= 60 * max_minutes
                ):
                    stop["why"] = stop["why"] or "limit"
                    break
                self.vae.train(self.phase == "vae")
                self.unet.train(self.phase == "diffusion")
                self.text_encoder.train(self.phase == "diffusion")
                t0 = time.perf_counter()
                loss = self.vae_step() if self.phase == "vae" else self.diffusion_step()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"{self.phase} step {self.step}: the loss is {loss}")
                self.elapsed[self.phase] += time.perf_counter() - t0
                self.step += 1
                done_here += 1
                self._window.append(loss)
                if self.step % cfg.log_every == 0 or self.step == total:
                    mean = float(np.mean(self._window))
                    self._window = []
                    self.history[self.phase].append((self.step, mean))
                    terms = _mean_terms(self._terms_window)
                    self._terms_window = []
                    if terms:
                        self.history.setdefault("terms", []).append((self.step, terms))
                    rate = self.step / max(self.elapsed[self.phase], 1e-9)
                    logf.write(json.dumps({"phase": self.phase, "step": self.step, "loss": mean, **terms,
                                           "elapsed_s": round(self.elapsed[self.phase], 2)}) + "\n")
                    logf.flush()
                    extra = "".join(f", {k} {v:.4f}" for k, v in terms.items())
                    self.log(f"{self.phase} {self.step}/{total} loss {mean:.5f}{extra} ({rate:.2f} steps/s, "
                             f"{(total - self.step) / max(rate, 1e-9) / 60:.1f} min left)")
                if self.step % cfg.checkpoint_every == 0 and self.step < total:
                    self._checkpoint_and_export()
            self._checkpoint_and_export()
        finally:
            logf.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        finished = self.phase == "diffusion" and self.step >= cfg.steps
        if stop["why"] and not finished:
            self.log(f"stopped ({stop['why']}) at {self.phase} step {self.step}; run the same command to resume")
        return {"phase": self.phase, "step": self.step, "finished": finished, "stopped": stop["why"]}

    def _checkpoint_and_export(self) -> None:
        path = self.save_checkpoint()
        msg = f"checkpoint {path}"
        if self.phase == "diffusion" and self.step > 0:
            msg += f"; exported {self.export()}"
        self.log(msg)


def _mean_terms(window: list[dict[str, float]]) -> dict[str, float]:
    names = {k for row in window for k in row}
    return {k: float(np.mean([row[k] for row in window if k in row])) for k in sorted(names)}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(
    out: str | Path,
    cfg: ShapesConfig | None = None,
    device: str | torch.device | None = None,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    log: Callable[[str], None] = print,
) -> Trainer:
    """Train (or resume) the shapes model in ``out``; see the module docstring. Returns the ``Trainer``."""
    trainer = Trainer(out, cfg, device, log)
    if not trainer.resume():
        cfg = trainer.cfg
        if cfg.init_from:
            trainer.start_from(cfg.init_from)
        phases = (f"{cfg.steps} diffusion steps" if cfg.init_from
                  else f"{cfg.vae_steps} VAE steps then {cfg.steps} diffusion steps")
        log(
            f"new run in {out} on {_hardware(trainer.device)}: VAE {_count(trainer.vae) / 1e6:.2f}M, "
            f"UNet {_count(trainer.unet) / 1e6:.2f}M, text encoder {_count(trainer.text_encoder) / 1e6:.2f}M "
            f"parameters; {phases} at batch {cfg.batch_size}"
        )
    trainer.run(max_steps=max_steps, max_minutes=max_minutes)
    return trainer


def _model_card(tr: Trainer) -> str:
    """README.md of an export: what the model is, how it was trained, on what, for how long, and its losses."""
    cfg = tr.cfg
    nan = float("nan")
    hist = tr.history.get("diffusion", [])
    tail = [loss for step, loss in hist if step > tr.step - 1000] or [nan]
    vae_loss = tr.history["vae"][-1][1] if tr.history.get("vae") else nan
    rt = tr.vae_roundtrip or {}
    rate = tr.step / max(tr.elapsed["diffusion"], 1e-9)
    losses = ", ".join(f"{step}: {loss:.4f}" for step, loss in _thin(hist, 10)) or "none yet"
    grid = f"{cfg.latent_size}x{cfg.latent_size}"
    rows = [
        f"| VAE | AutoencoderKL, channels {list(cfg.vae_channels)}, factor {cfg.vae_factor}, "
        f"{cfg.latent_channels} latent channels, scaling factor {tr.scaling_factor or nan:.5f} "
        f"| {_count(tr.vae) / 1e6:.2f}M |",
        f"| UNet | channels {list(cfg.unet_channels)}, {cfg.unet_layers} layers per block, heads "
        f"{list(cfg.unet_heads)}; cross-attention at {grid} (the read grid) and in the mid block "
        f"| {_count(tr.unet) / 1e6:.2f}M |",
        f"| text encoder | CLIPTextModel, hidden {cfg.text_hidden}, {cfg.text_layers} layers, {cfg.text_heads} "
        f"heads, CLIP's vocabulary | {_count(tr.text_encoder) / 1e6:.2f}M |",
    ]
    table = "\n".join(["| part | configuration | parameters |", "|---|---|---|", *rows])
    return f"""# shapes: a teaching text-to-image model

Stable Diffusion's architecture in miniature (AutoencoderKL, UNet2DConditionModel with cross-attention,
CLIPTextModel with the real CLIP tokenizer, SD's PNDM scheduler), trained from scratch on the procedural
shapes world of `binding/world.py`: 64x64 images of 1-3 flat-coloured objects (circle, square, triangle,
star; red, orange, yellow, green, blue, purple, pink) on white, captioned "a red circle and a blue square".
Made to show attribute leakage on a laptop and to measure it exactly (`python -m binding teach score`).
Not a general image model: it knows these 7 colours, 4 shapes and this caption grammar only.

## Model

{table}

Images {cfg.resolution}x{cfg.resolution}, latents {grid}x{cfg.latent_channels}. Weights: EMA (decay
{cfg.ema_decay}) of the UNet and the text encoder; the VAE's final weights. Files: safetensors.

## Data

Scenes rendered on the fly from seeds, `binding.world.training_scene(i, data_seed={cfg.data_seed})`.
Held out, never in training: the colour-shape combinations `binding.world.HELDOUT_COMBOS` (one per colour)
and every pair of objects of the 28 scoring prompts `binding.world.HELDOUT_PROMPTS`.

## Training

- Command: `python -m binding teach train --out DIR` (resumable; recipe in `binding/teach.py`).
- Phase 1, VAE: {cfg.vae_steps} steps at batch {cfg.vae_batch_size}, AdamW lr {cfg.vae_lr} cosine-decayed to
  {cfg.vae_lr * cfg.vae_lr_floor:g}, MSE +
  {cfg.kl_weight} KL; {tr.elapsed["vae"] / 60:.1f} min in training steps; final loss {vae_loss:.5f}. The scorer reads
  {rt.get("correct", "?")}/{rt.get("objects", "?")} objects right from VAE round trips (the ceiling of any score).
- Phase 2, diffusion: {tr.step} of {cfg.steps} steps at batch {cfg.batch_size}, AdamW lr {cfg.lr} (warm-up
  {cfg.warmup_steps}, then constant), weight decay {cfg.weight_decay}, min-SNR gamma {cfg.snr_gamma},
  {cfg.cond_dropout:.0%} empty captions; {tr.elapsed["diffusion"] / 3600:.2f} h in training steps ({rate:.2f} steps/s).
- Hardware: {"; ".join(tr.hardware) or _hardware(tr.device)}; torch {torch.__version__}.
- Noise-prediction loss (unweighted MSE, mean over {cfg.log_every} steps) by step: {losses}.
  Mean over the last 1000 steps: {float(np.mean(tail)):.4f}. Both phases' curves: `loss.png`.

![training losses](loss.png)

## Scores

`python -m binding teach score --out DIR` on the held-out prompts gives, per method, the rate of images with
every object present and with every object in its own colour, paired by seed with vanilla, with 95% intervals.
"""


def _thin(hist: list, n: int) -> list:
    if len(hist) <= n:
        return hist
    idx = np.unique(np.linspace(0, len(hist) - 1, n).round().astype(int))
    return [hist[i] for i in idx]


# -------------------------------------------------------------------------------------------- scoring


METRICS = ("present_all", "bound_all", "leak_any")
GRID_SEEDS = 6  # columns of the picture grid


def summarize(rows: Sequence[dict], methods: Sequence[str] | None = None, baseline: str = "vanilla") -> dict:
    """Per method and prompt group: rates with Wilson intervals, and differences from ``baseline`` paired by
    (prompt, seed) with Newcombe's and a prompt-clustered bootstrap interval."""
    methods = list(methods or dict.fromkeys(r["method"] for r in rows))
    groups = ["all"] + sorted({r["group"] for r in rows})
    index = {(r["method"], r["prompt"], r["seed"]): r for r in rows}
    out: dict = {}
    for group in groups:
        out[group] = {}
        for m in methods:
            mine = [r for r in rows if r["method"] == m and (group == "all" or r["group"] == group)]
            entry: dict = {"n": len(mine)}
            for metric in METRICS:
                x = sum(bool(r[metric]) for r in mine)
                entry[metric] = {"rate": x / len(mine) if mine else float("nan"), "ci": list(wilson(x, len(mine)))}
            if m != baseline:
                pairs = [(r, index.get((baseline, r["prompt"], r["seed"]))) for r in mine]
                pairs = [(r, v) for r, v in pairs if v is not None]
                entry["paired_n"] = len(pairs)
                for metric in METRICS:
                    g = np.array([bool(r[metric]) for r, _ in pairs])
                    v = np.array([bool(vr[metric]) for _, vr in pairs])
                    a, b = int((g & v).sum()), int((g & ~v).sum())
                    c, d = int((~g & v).sum()), int((~g & ~v).sum())
                    diff, lo, hi = newcombe_paired(a, b, c, d)
                    boot = (
                        bootstrap_paired(g, v, np.array([r["prompt"] for r, _ in pairs])) if pairs else (0.0, 0.0)
                    )
                    entry[metric]["vs_" + baseline] = {
                        "diff": diff, "newcombe_ci": [lo, hi], "bootstrap_ci": list(boot),
                        "only_method": b, "only_baseline": c,
                    }
            out[group][m] = entry
    return out


def format_summary(summary: dict) -> str:
    lines = []
    for group, per_method in summary.items():
        lines.append(f"[{group}]")
        lines.append(
            f"{'method':<14} {'n':>5}  {'present_all':<22} {'bound_all':<22} {'leak_any':<22} "
            f"{'d bound vs vanilla (Newcombe | prompt bootstrap)'}"
        )
        for m, e in per_method.items():
            cells = [f"{e[k]['rate']:.3f} [{e[k]['ci'][0]:.3f}, {e[k]['ci'][1]:.3f}]" for k in METRICS]
            line = f"{m:<14} {e['n']:>5}  " + " ".join(f"{c:<22}" for c in cells)
            vs = e["bound_all"].get("vs_vanilla")
            if vs:
                line += (f" {vs['diff']:+.3f} [{vs['newcombe_ci'][0]:+.3f}, {vs['newcombe_ci'][1]:+.3f}] | "
                         f"[{vs['bootstrap_ci'][0]:+.3f}, {vs['bootstrap_ci'][1]:+.3f}]  "
                         f"(+{vs['only_method']} / -{vs['only_baseline']})")
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def _prompt_groups(prompts: Sequence[str] | None) -> list[tuple[str, str]]:
    if prompts is None:
        return [(p, "unseen") for p in world.HELDOUT_UNSEEN] + [(p, "seen") for p in world.HELDOUT_SEEN]
    out = []
    for p in prompts:
        world.parse_caption(p)  # the scorer needs the world's grammar
        group = "unseen" if p in world.HELDOUT_UNSEEN else "seen" if p in world.HELDOUT_SEEN else "custom"
        out.append((p, group))
    return out


def score(
    model: str | Path | None = None,
    methods: Sequence[str] = ("vanilla", "syngen", "divide-bind", "attend-excite"),
    seeds: Iterable[int] = range(10),
    prompts: Sequence[str] | None = None,
    steps: int = 50,
    guidance_scale: float = 7.5,
    out: str | Path | None = None,
    device: str | None = None,
    save_images: bool = False,
    intervention_steps: int | None = None,
    log: Callable[[str], None] = print,
    pipe=None,
) -> dict:
    """Generate every (method, held-out prompt, seed) and score it; returns ``{"rows", "summary"}``.

    Vanilla runs once per (prompt, seed) and every method is paired with it by seed (same initial latents).
    With ``out``, rows are appended to ``OUT/rows.jsonl`` as they are made and an interrupted run resumes where
    it stopped; ``summary.json`` and ``summary.txt`` are written at the end.
    """
    from binding.analysis import analyze
    from binding.guidance import GuidedSampler
    from binding.scorer import score_image

    methods = list(dict.fromkeys(["vanilla", *methods]))
    seeds = [int(s) for s in seeds]
    plist = _prompt_groups(prompts)
    if pipe is None:
        if model is not None and os.path.isdir(str(model)):
            pipe = build_shapes_pipeline(model, device=device)
        else:
            from binding.models import load_pipeline

            pipe = load_pipeline(str(model or "shapes"), device=device)
    settings = {"model": str(model or "shapes"), "steps": steps, "guidance_scale": guidance_scale}
    plan = {} if intervention_steps is None else {"intervention_steps": intervention_steps}
    if plan:
        settings.update(plan)
    rows: list[dict] = []
    done: set = set()
    rows_file = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / "score_config.json"
        if cfg_path.is_file() and json.loads(cfg_path.read_text()) != settings:
            raise ValueError(f"{out} holds scores made with other settings ({cfg_path}); use another --out")
        cfg_path.write_text(json.dumps(settings), encoding="utf-8")
        if (out / "rows.jsonl").is_file():
            rows = [json.loads(l) for l in (out / "rows.jsonl").read_text().splitlines() if l.strip()]
            done = {(r["method"], r["prompt"], r["seed"]) for r in rows}
        rows_file = open(out / "rows.jsonl", "a", encoding="utf-8")
    sampler = GuidedSampler(pipe)
    t_start = time.perf_counter()
    total = len(plist) * len(methods)
    try:
        for k, (prompt, group) in enumerate(plist):
            analysis = analyze(prompt)
            objects = world.parse_caption(prompt)
            for j, method in enumerate(methods):
                todo = [s for s in seeds if (method, prompt, s) not in done]
                if not todo:
                    continue
                run = "vanilla" if method == "vanilla" else "guided"
                results = sampler(
                    prompt, todo, method, steps=steps, guidance_scale=guidance_scale, analysis=analysis,
                    runs=(run,), record_maps=False, **plan,
                )
                for res in results:
                    image = res.vanilla_image if run == "vanilla" else res.guided_image
                    s = score_image(image, objects)
                    row = {"method": method, "prompt": prompt, "group": group, "seed": res.seed,
                           **{key: s[key] for key in ("present_all", "bound_all", "leak_any", "n_detected",
                                                       "extra", "present", "bound", "leaked")},
                           "detected": [[d["colour"], d["shape"]] for d in s["detections"]]}
                    rows.append(row)
                    if rows_file is not None:
                        rows_file.write(json.dumps(row) + "\n")
                        rows_file.flush()
                        if save_images:
                            img_dir = out / "images" / method
                            img_dir.mkdir(parents=True, exist_ok=True)
                            image.save(img_dir / f"{k:02d}-{res.seed}.png")
                mine = [r for r in rows if r["method"] == method and r["prompt"] == prompt]
                log(
                    f"[{k * len(methods) + j + 1}/{total}] {method:<14} {prompt!r}: "
                    f"present {sum(r['present_all'] for r in mine)}/{len(mine)}, "
                    f"bound {sum(r['bound_all'] for r in mine)}/{len(mine)} "
                    f"({(time.perf_counter() - t_start) / 60:.1f} min)"
                )
    finally:
        if rows_file is not None:
            rows_file.close()
    summary = summarize(rows, methods)
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        (out / "summary.txt").write_text(format_summary(summary), encoding="utf-8")
    return {"rows": rows, "summary": summary}


def rows_from_eval(out: str | Path) -> list[dict]:
    """The scorer's verdicts from an evaluation grid on the shapes set (``python -m binding eval --set shapes
    --model shapes``), as ``score``'s rows: one generation serves both reports."""
    from binding.evaluation import collect_rows

    rows = []
    for r in collect_rows(out):
        m = r.get("metrics", {})
        if m.get("shapes_bound_all") is None:
            continue
        rows.append({"method": r["method"], "prompt": r["prompt"], "group": r["group"], "seed": r["seed"],
                     "present_all": bool(m["shapes_present_all"]), "bound_all": bool(m["shapes_bound_all"]),
                     "leak_any": bool(m["shapes_leak_any"])})
    if not rows:
        raise ValueError(f"{out} holds no shapes scores: run `python -m binding eval --set shapes --model shapes "
                         f"--out {out}` first")
    return rows


def picture_grid(eval_out: str | Path, prompts: Sequence[int], seeds: Sequence[int], methods: Sequence[str]):
    """One PIL image: for each prompt (index in the set) a block of rows per method and columns per seed, from
    an evaluation grid's items: the same seed in a column is the same start."""
    from PIL import Image

    from binding.evaluation import collect_rows, prompt_grid

    texts = {r["prompt_index"]: r["prompt"] for r in collect_rows(eval_out)}
    blocks = [prompt_grid(eval_out, i, methods, seeds, title=texts.get(i, f"prompt {i}")) for i in prompts]
    grid = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks) + 12 * len(blocks)), "white")
    y = 0
    for b in blocks:
        grid.paste(b, (0, y))
        y += b.height + 12
    return grid


# ------------------------------------------------------------------------------------------------ CLI


def _cmd_train(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("steps", args.steps), ("vae_steps", args.vae_steps),
                                   ("batch_size", args.batch_size), ("checkpoint_every", args.checkpoint_every),
                                   ("lr", args.lr), ("warmup_steps", args.warmup_steps),
                                   ("init_from", args.init_from), ("ground_nouns", args.ground_nouns),
                                   ("ground_colours", args.ground_colours), ("ground_pixel", args.ground_pixel),
                                   ("blank_padding", args.blank_padding), ("padding_weight", args.padding_weight))
                 if v is not None}
    out = Path(args.out)
    if (out / "config.json").is_file():
        stored = ShapesConfig.from_dict(json.loads((out / "config.json").read_text())["config"])
        cfg = dataclasses.replace(stored, **overrides)
    else:
        cfg = ShapesConfig(**overrides)
    try:
        trainer = train(out, cfg, device=args.device, max_steps=args.max_steps, max_minutes=args.max_minutes,
                        log=lambda m: print(m, flush=True))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.export and trainer.phase == "diffusion" and trainer.step > 0:
        print(f"exported {trainer.export(args.export)}")
    return 0


def _cmd_export(args) -> int:
    trainer = Trainer(args.run, device="cpu", log=lambda m: print(m, flush=True))
    if args.checkpoint:
        trainer.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=False))
    elif not trainer.resume():
        print(f"error: {args.run} has no checkpoint", file=sys.stderr)
        return 2
    try:
        print(f"exported {trainer.export(args.to)}")
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_score(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.from_eval:
        try:
            rows = rows_from_eval(args.from_eval)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        present = list(dict.fromkeys(["vanilla", *[m for m in methods if any(r["method"] == m for r in rows)]]))
        summary = summarize(rows, present)
        if args.grid:
            seeds = sorted({r["seed"] for r in rows})[:GRID_SEEDS]
            picked = args.grid_prompts or [0, 1, 2]
            picture_grid(args.from_eval, picked, seeds, present).save(args.grid)
            print(f"picture grid: {args.grid}", flush=True)
        print(json.dumps(summary) if args.json else format_summary(summary), flush=True)
        return 0
    prompts = None
    if args.prompts:
        prompts = [l.strip() for l in Path(args.prompts).read_text().splitlines() if l.strip()]
    try:
        res = score(
            args.model, [m.strip() for m in args.methods.split(",") if m.strip()], args.seeds, prompts,
            steps=args.steps, guidance_scale=args.guidance, out=args.out, device=args.device,
            save_images=args.save_images, intervention_steps=args.intervention_steps,
            log=lambda m: print(m, flush=True),
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res["summary"]) if args.json else format_summary(res["summary"]), flush=True)
    return 0


def _cmd_check_scorer(args) -> int:
    """The scorer's accuracy on ground-truth renders (clean and degraded) and on the shapes model's VAE round
    trips: how far its verdicts can be trusted, and the ceiling of any score the model can get."""
    from binding.scorer import DEGRADATIONS, accuracy

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'renders':<26} {'objects right':>16} {'images exact':>13}  commonest errors")
    readers = [(kind, None) for kind in DEGRADATIONS]
    try:
        from binding.models import ModelLoadError, load_pipeline

        vae = load_pipeline(args.model, device="cpu").vae.eval()

        @torch.no_grad()
        def roundtrip(arr):
            x = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            return ((rec[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()

        readers.append((f"{args.model} VAE round trip", roundtrip))
    except ModelLoadError as exc:
        print(f"(no VAE round trip: {exc})")
    for kind, reader in readers:
        a = accuracy(args.n, "clean" if reader else kind, seed=0, reader=reader)
        errs = ", ".join(f"{c} {s} {what} x{k}" for ((c, s), what), k in a["errors"].most_common(3)) or "none"
        print(f"{kind:<26} {a['objects_right']:>6}/{a['objects']:<5} {a['object_accuracy']:>5.1%}"
              f" {a['image_accuracy']:>12.1%}  {errs}", flush=True)
    return 0


def add_teach_commands(subparsers) -> None:
    """Register ``teach train``, ``teach score`` and ``teach export`` on the CLI's subparsers."""
    from binding.cli import parse_seeds

    t = subparsers.add_parser("teach", help="the teaching model: train it on the shapes world, score guidance")
    tsub = t.add_subparsers(dest="teach_command", metavar="TEACH_COMMAND", required=True)

    tr = tsub.add_parser("train", help="train (or resume) the shapes model; checkpoints and exports go to --out")
    tr.add_argument("--out", required=True, help="run folder (checkpoints/, pipeline/, log.jsonl); run again to resume")
    tr.add_argument("--steps", type=int, default=None, help=f"diffusion steps in all (default {ShapesConfig.steps})")
    tr.add_argument("--vae-steps", type=int, default=None, help=f"VAE steps (default {ShapesConfig.vae_steps})")
    tr.add_argument("--batch-size", type=int, default=None, help=f"diffusion batch (default {ShapesConfig.batch_size}; fixed for a run)")
    tr.add_argument("--checkpoint-every", type=int, default=None, help=f"steps between checkpoints (default {ShapesConfig.checkpoint_every})")
    tr.add_argument("--lr", type=float, default=None, help=f"diffusion learning rate (default {ShapesConfig.lr})")
    tr.add_argument("--warmup-steps", type=int, default=None, help=f"(default {ShapesConfig.warmup_steps})")
    tr.add_argument("--init-from", default=None, metavar="DIR",
                    help="fine-tune an exported shapes model (e.g. assets/shapes): its VAE is kept, phase 1 skipped")
    tr.add_argument("--ground-nouns", type=float, default=None,
                    help=f"weight of the nouns' grounding term, 0 = off (default {ShapesConfig.ground_nouns})")
    tr.add_argument("--ground-colours", type=float, default=None,
                    help=f"weight of the colour words' grounding term (default {ShapesConfig.ground_colours})")
    tr.add_argument("--ground-pixel", type=float, default=None,
                    help=f"weight of the grounding's pixel BCE (default {ShapesConfig.ground_pixel})")
    tr.add_argument("--blank-padding", action=argparse.BooleanOptionalAction, default=None,
                    help="the UNet sees the empty prompt's EOT/padding outputs in training (default on)")
    tr.add_argument("--padding-weight", type=float, default=None,
                    help=f"weight of the text encoder's padding term (default {ShapesConfig.padding_weight})")
    tr.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this call (checkpointed)")
    tr.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes in this call (checkpointed)")
    tr.add_argument("--device", default=None, help="cuda, cpu (default: CUDA when available)")
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is best on a shared machine)")
    tr.add_argument("--export", default=None, metavar="DIR", help="also export the EMA model to DIR at the end (e.g. assets/shapes)")
    tr.set_defaults(func=_cmd_train)

    ex = tsub.add_parser("export", help="export a run's EMA model as a diffusers folder with its model card")
    ex.add_argument("--run", required=True, help="the run folder given to teach train --out")
    ex.add_argument("--to", required=True, help="destination folder, e.g. assets/shapes")
    ex.add_argument("--checkpoint", default=None, help="a checkpoint file (default: the latest)")
    ex.set_defaults(func=_cmd_export)

    sc = tsub.add_parser("score", help="measure object presence and colour binding per method on held-out prompts")
    sc.add_argument("--model", default=None, help="a shapes model folder (default: assets/shapes) or a preset")
    sc.add_argument("--methods", default="vanilla,syngen,divide-bind,attend-excite", help="comma-separated")
    sc.add_argument("--seeds", type=parse_seeds, default=list(range(10)), help="e.g. 0-9 (default) or 0,3,7")
    sc.add_argument("--prompts", default=None, help="a file of captions in the world's grammar (default: the held-out list)")
    sc.add_argument("--steps", type=int, default=50)
    sc.add_argument("--guidance", type=float, default=7.5)
    sc.add_argument("--intervention-steps", type=int, default=None, help="guided steps from the start (method default: 25)")
    sc.add_argument("--from-eval", default=None, metavar="DIR",
                    help="no generation: summarise an eval run's shapes scores (eval --set shapes --model shapes --out DIR)")
    sc.add_argument("--grid", default=None, metavar="PNG", help="with --from-eval: a picture grid of methods x seeds")
    sc.add_argument("--grid-prompts", type=parse_seeds, default=None, help="prompt indices for --grid (default 0-2)")
    sc.add_argument("--out", default=None, help="folder for rows.jsonl (resumable), summary.json, summary.txt")
    sc.add_argument("--save-images", action="store_true", help="with --out: keep every image under OUT/images")
    sc.add_argument("--device", default=None)
    sc.add_argument("--threads", type=int, default=None)
    sc.add_argument("--json", action="store_true", help="print the summary as JSON")
    sc.set_defaults(func=_cmd_score)

    ck = tsub.add_parser("check-scorer", help="the scorer's accuracy on ground-truth renders and on the model's VAE")
    ck.add_argument("--n", type=int, default=1000, help="scenes per condition (default 1000)")
    ck.add_argument("--model", default="shapes", help="whose VAE round trips to read (default: shapes)")
    ck.add_argument("--threads", type=int, default=None)
    ck.set_defaults(func=_cmd_check_scorer)
