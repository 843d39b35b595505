"""Training the teaching model (``python -m binding teach train``): resumable, on a CPU or a GPU.

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

import dataclasses
import json
import math
import os
import platform
import signal
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from binding.shapes import world
from binding.shapes.grounding import grounding_terms, object_targets, tail_mask
from binding.shapes.model import (
    CARD_TITLE,
    ShapesConfig,
    _count,
    build_models,
    build_shapes_pipeline,
    export_pipeline,
    scene_tensor,
)
from binding.storage import atomic_write_text

__all__ = ["RECIPE_NOTES", "TRAIN_OPTIONS", "Trainer", "colour_blind_encoding", "loss_curve", "train"]

CHECKPOINT_FORMAT = 1
PHASES = ("vae", "diffusion")
# The ShapesConfig fields ``teach train`` takes as options (``--field-name``), with what each means.
TRAIN_OPTIONS = {
    "steps": "diffusion steps in all",
    "vae_steps": "VAE steps",
    "batch_size": "diffusion batch (fixed for a run)",
    "checkpoint_every": "steps between checkpoints",
    "lr": "diffusion learning rate",
    "lr_schedule": "constant (a run can be extended) or cosine (an anneal to a tenth of lr by the last step)",
    "warmup_steps": "linear warm-up steps of the learning rate",
    "ema_decay": "decay of the exported weights' moving average (a short fine-tune needs a shorter one)",
    "init_from": "fine-tune an exported shapes model (e.g. assets/shapes): its VAE is kept, phase 1 skipped",
    "ground_nouns": "weight of the nouns' grounding term (0 = off)",
    "ground_colours": "weight of the colour words' grounding term (0 = off)",
    "ground_pixel": "weight of the grounding's pixel BCE",
    "blank_padding": "the UNet sees the empty prompt's EOT/padding outputs in training",
    "padding_weight": "weight of the text encoder's padding term",
    "isolate_colours": "the UNet sees every word but the colour words encoded as if the colour words were absent",
    "isolate_weight": "weight of the text encoder's term that keeps those outputs colour-blind",
}
# Why each recipe v2 term exists: written into every model card.
RECIPE_NOTES = {
    "ground_nouns": "TokenCompose-style grounding (Wang et al., CVPR 2024): at every read layer, each noun's "
                    "attention map, normalised over pixels, must put its mass inside its object's mask, "
                    "`(1 - mass inside)^2`, plus a small pixel BCE. The world's exact masks make this free. "
                    "Without it no word's map is object-specific (own-object share 0.50-0.51) and the guidance "
                    "losses have nothing to act on.",
    "ground_colours": "The same for colour words, measured three ways: strong (0.5, with isolated colours) it "
                      "makes their maps follow the blob of their colour whatever its shape and removes the leak the "
                      "lab must show (vanilla leak 0.00 on calibration prompts); off, their maps stay unspecific "
                      "(own-object share 0.62 in v2); weak (0.1, v3) gives them their own object (share 0.86) while "
                      "vanilla still leaks on held-out prompts (some colour leaked in 21% of pictures).",
    "blank_padding": "In training the UNet sees the empty prompt's encoder outputs at EOT and every padding "
                     "position. CLIP is causal and pads with EOT, so each padding position sums up the whole "
                     "caption: v1 read 71-90% of its cross-attention there and bound colours caption-wide.",
    "padding_weight": "A text-encoder term keeps its EOT and padding outputs equal to the empty prompt's, so "
                      "the stock pipeline at inference feeds the UNet what it saw in training.",
    "isolate_colours": "In training the UNet sees every position but the colour words' as the text encoder "
                       "gives it with the colour words hidden from its attention. CLIP is causal, so otherwise "
                       "a noun's output already holds the colour before it ('circle' in 'a red circle' encodes "
                       "red): grounding the nouns then binds by itself (v2), the colour words' maps stop "
                       "mattering and the binding losses, which move those maps, cannot move a colour.",
    "isolate_weight": "A text-encoder term keeps every non-colour word's output equal to that colour-blind "
                      "encoding, so the stock pipeline at inference feeds the UNet what it saw in training and a "
                      "colour reaches the picture only through its own word's position, as the losses assume.",
    "init_from": "Its VAE and latent scale are kept; a fine-tune fits a 2-hour CPU budget, training afresh would not "
                 "(v1 took 1.25 h of diffusion steps on 2 threads before it drew well).",
}


def colour_blind_encoding(text_encoder, ids: torch.Tensor, colour_ids: torch.Tensor):
    """(colour-word mask (B, 77), outputs (B, 77, D)) of the caption encoded with its colour words hidden from
    every position's attention: what each other word would say if the caption named no colour (the colour words'
    own rows still hold their embeddings, through the residual stream)."""
    colour = torch.isin(ids, colour_ids)
    return colour, text_encoder(ids, attention_mask=(~colour).long())[0]


def _masked_mse(outputs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the encoder's outputs (B, 77, D) from ``target`` over the positions in ``mask``
    (B, 77, 1): the text-encoder terms that keep the stock pipeline's outputs what the UNet saw in training."""
    return ((outputs - target).pow(2) * mask).sum() / (mask.sum() * outputs.shape[-1])


def _training_schedule():
    """SD's training noise schedule (scaled-linear betas, 1000 steps): alphas_cumprod as float64."""
    from diffusers import DDPMScheduler

    from binding.pipelines import SD_SCHEDULER

    s = DDPMScheduler(
        beta_start=SD_SCHEDULER["beta_start"],
        beta_end=SD_SCHEDULER["beta_end"],
        beta_schedule=SD_SCHEDULER["beta_schedule"],
        num_train_timesteps=SD_SCHEDULER["num_train_timesteps"],
    )
    return s.alphas_cumprod.to(torch.float64)


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
    """The training losses as a PNG (log scale): the VAE's, the diffusion loss, and the recipe's extra terms
    (grounding, padding) when the run had them. What the model card shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = history.get("terms") or []
    panels = [("vae", "VAE: reconstruction MSE"), ("diffusion", "UNet + text encoder: noise-prediction MSE")]
    panels = [pn for pn in panels if history.get(pn[0])] or panels[1:]
    n = len(panels) + bool(terms)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.2), dpi=100, squeeze=False)
    for ax, (phase, what) in zip(axes[0], panels):
        rows = history.get(phase) or []
        if rows:
            ax.plot([r[0] for r in rows], [r[1] for r in rows], lw=1.2, color="#1f77b4")
            ax.set_yscale("log")
        ax.set_title(what, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    if terms:
        ax = axes[0, -1]
        for k, name in enumerate(sorted({k for _, row in terms for k in row})):
            pts = [(step, row[name]) for step, row in terms if name in row]
            ax.plot([p[0] for p in pts], [max(p[1], 1e-6) for p in pts], lw=1.2, color=f"C{k + 1}", label=name)
        ax.set_yscale("log")
        ax.set_title("recipe v2 terms (unweighted)", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


class Trainer:
    """Both phases of ``train``; holds models, optimiser, EMA and the noise generator (see the module docstring)."""

    def __init__(
        self,
        out: str | Path,
        cfg: ShapesConfig | None = None,
        device: str | torch.device | None = None,
        log: Callable[[str], None] = print,
    ):
        from binding.pipelines import pick_device
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
        self._colours: torch.Tensor | None = None
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
        x = scene_tensor(self._scenes(cfg.vae_batch_size), cfg.resolution).to(self.device)
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

    def _colour_ids(self) -> torch.Tensor:
        """The token ids of the world's colour words (each is one CLIP token)."""
        if self._colours is None:
            self._colours = torch.tensor(
                [self.tokenizer.convert_tokens_to_ids(c + "</w>") for c in world.COLOURS], device=self.device)
        return self._colours

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
            posterior = self.vae.encode(scene_tensor(scenes, cfg.resolution).to(self.device)).latent_dist
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
            tail = tail_mask(ids, self.tokenizer.eos_token_id)[..., None]  # EOT and every padding position
            if cfg.padding_weight:
                terms["padding"] = _masked_mse(cond, empty.detach(), tail)
            if cfg.blank_padding:
                cond = torch.where(tail, empty.expand_as(cond), cond)
        if cfg.isolate_colours or cfg.isolate_weight:
            colour, blind = colour_blind_encoding(self.text_encoder, ids, self._colour_ids())
            other = (~colour & ~tail_mask(ids, self.tokenizer.eos_token_id))[..., None]  # BOS and other words
            if cfg.isolate_weight:
                terms["isolate"] = _masked_mse(cond, blind.detach(), other)
            if cfg.isolate_colours:
                cond = torch.where(other, blind, cond)
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
        weights = {"padding": cfg.padding_weight, "isolate": cfg.isolate_weight, "ground_nouns": cfg.ground_nouns,
                   "ground_colours": cfg.ground_colours, "pixel_nouns": cfg.ground_pixel,
                   "pixel_colours": cfg.ground_pixel}
        for name, value in terms.items():
            loss = loss + weights[name] * value
        lr = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
        if cfg.lr_schedule == "cosine":  # an anneal: down to a tenth of the rate at the last step
            lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, self.step / max(1, cfg.steps))))
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
        """The recipe's grounding terms for this batch (``binding.shapes.grounding.grounding_terms``)."""
        cfg = self.cfg
        gh, gw = next(iter(layer_maps.values())).shape[1:3]
        pos, masks, valid = (x.to(self.device) for x in object_targets(scenes, ids, (gh, gw), dropped))
        kinds = [k for k, w in (("noun", cfg.ground_nouns), ("colour", cfg.ground_colours)) if w]
        return grounding_terms(layer_maps, pos, masks, valid, kinds, pixel=bool(cfg.ground_pixel))

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
        steps, text = None, ""
        if card.is_file():
            import re

            text = card.read_text(encoding="utf-8")
            m = re.search(r"Phase 2, diffusion: (\d+)", text)
            steps = int(m.group(1)) if m else None
        self.base = {"folder": str(folder), "diffusion_steps": steps, "card": text}
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
        zs = [self.vae.encode(scene_tensor(calib[i : i + 64], cfg.resolution).to(self.device)).latent_dist.mean
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
        from binding.shapes.scorer import detect

        cfg = self.cfg
        self.vae.eval()
        scenes = [world.sample_scene((3 << 36) + i, split="any") for i in range(cfg.calibration_scenes)]
        ok = total = 0
        for i in range(0, len(scenes), 64):
            batch = scenes[i : i + 64]
            x = scene_tensor(batch, cfg.resolution).to(self.device)
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
        return export_pipeline(folder, vae.cpu(), unet.cpu(), text_encoder.cpu(), self.model_card(),
                               lambda d: loss_curve(self.history, d / "loss.png"))

    # ---- the loop

    def run(self, max_steps: int | None = None, max_minutes: float | None = None) -> dict:
        """Train until both phases are done, or ``max_steps`` steps / ``max_minutes`` in this call, or a signal.

        Always leaves a checkpoint behind (and, in phase 2, an exported pipeline).
        """
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.json", json.dumps({"config": cfg.to_dict(), "device": str(self.device)},
                                                              indent=2))
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
    schedule = f"cosine to a tenth by step {cfg.steps}" if cfg.lr_schedule == "cosine" else "constant"
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
    return f"""{CARD_TITLE}

Stable Diffusion's architecture in miniature (AutoencoderKL, UNet2DConditionModel with cross-attention,
CLIPTextModel with the real CLIP tokenizer, SD's PNDM scheduler), trained from scratch on the procedural
shapes world of `binding/shapes/world.py`: 64x64 images of 1-3 flat-coloured objects (circle, square, triangle,
star; red, orange, yellow, green, blue, purple, pink) on white, captioned "a red circle and a blue square".
Made to show attribute leakage on a laptop and to measure it exactly (`python -m binding teach score`).
Not a general image model: it knows these 7 colours, 4 shapes and this caption grammar only.

## Model

{table}

Images {cfg.resolution}x{cfg.resolution}, latents {grid}x{cfg.latent_channels}. Weights: EMA (decay
{cfg.ema_decay}) of the UNet and the text encoder; the VAE's final weights. Files: safetensors.

## Data

Scenes rendered on the fly from seeds, `binding.shapes.world.training_scene(i, data_seed={cfg.data_seed})`.
Held out, never in training: the colour-shape combinations `binding.shapes.world.HELDOUT_COMBOS` (one per colour)
and every pair of objects of the 28 scoring prompts `binding.shapes.world.HELDOUT_PROMPTS`.

## Training

{_recipe_section(tr)}
- Command: `python -m binding teach train --out DIR{" --init-from " + cfg.init_from if cfg.init_from else ""}` (resumable;
  recipe in `binding/shapes/train.py`).
- Phase 1, VAE: {_vae_line(tr, vae_loss)} The scorer reads
  {rt.get("correct", "?")}/{rt.get("objects", "?")} objects right from VAE round trips (the ceiling of any score).
- Phase 2, diffusion: {tr.step} of {cfg.steps} steps at batch {cfg.batch_size}, AdamW lr {cfg.lr} (warm-up
  {cfg.warmup_steps}, then {schedule}), weight decay {cfg.weight_decay}, min-SNR gamma {cfg.snr_gamma},
  {cfg.cond_dropout:.0%} empty captions; {tr.elapsed["diffusion"] / 3600:.2f} h in training steps ({rate:.2f} steps/s).
- Hardware: {"; ".join(tr.hardware) or _hardware(tr.device)}; torch {torch.__version__}.
- Noise-prediction loss (unweighted MSE, mean over {cfg.log_every} steps) by step: {losses}.
  Mean over the last 1000 steps: {float(np.mean(tail)):.4f}. Both phases' curves: `loss.png`.

![training losses](loss.png)

## Scores

`python -m binding teach score --out DIR` on the held-out prompts gives, per method, the rate of images with
every object present and with every object in its own colour, paired by seed with vanilla, with 95% intervals.
{_base_section(tr)}"""


def _base_section(tr: Trainer) -> str:
    """The card of the model this one was fine-tuned from, headings one level down: the lineage stays readable."""
    text = (tr.base or {}).get("card", "")
    if not text:
        return ""
    import re

    body = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", text.strip(), flags=re.M)
    return f"\n## Base model (`{tr.base.get('folder')}`)\n\n{body}\n"


def _vae_line(tr: Trainer, vae_loss: float) -> str:
    cfg = tr.cfg
    if tr.base is not None and not tr.history.get("vae"):
        return f"the base model's (`{tr.base.get('folder')}`), kept as it was, with its latent scale."
    return (f"{cfg.vae_steps} steps at batch {cfg.vae_batch_size}, AdamW lr {cfg.vae_lr} cosine-decayed to "
            f"{cfg.vae_lr * cfg.vae_lr_floor:g}, MSE + {cfg.kl_weight} KL; {tr.elapsed['vae'] / 60:.1f} min in training "
            f"steps; final loss {vae_loss:.5f}.")


def _recipe_section(tr: Trainer) -> str:
    """The recipe's terms, each with its setting and why it is there (``RECIPE_NOTES``)."""
    cfg = tr.cfg
    lines = []
    if tr.base is not None:
        steps = tr.base.get("diffusion_steps")
        kept = "; its card is kept below, under 'Base model'" if tr.base.get("card") else ""
        lines.append(f"- Fine-tuned from `{tr.base.get('folder')}` ({steps or '?'} diffusion steps{kept}). "
                     + RECIPE_NOTES["init_from"])
    settings = {"ground_nouns": f"weight {cfg.ground_nouns} (pixel BCE {cfg.ground_pixel})",
                "ground_colours": f"weight {cfg.ground_colours}",
                "blank_padding": "on" if cfg.blank_padding else "off",
                "padding_weight": f"weight {cfg.padding_weight}",
                "isolate_colours": "on" if cfg.isolate_colours else "off",
                "isolate_weight": f"weight {cfg.isolate_weight}"}
    for name, value in settings.items():
        lines.append(f"- `{name}`: {value}. {RECIPE_NOTES[name]}")
    return "\n".join(lines)


def _thin(hist: list, n: int) -> list:
    if len(hist) <= n:
        return hist
    idx = np.unique(np.linspace(0, len(hist) - 1, n).round().astype(int))
    return [hist[i] for i in idx]
