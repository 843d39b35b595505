"""A run's settings, their ranges and their defaults: one table and one check for every entry point.

The sampler, the CLI, the app (its sliders too), the benchmark and the evaluation all take a ``Settings`` and
call ``check()``, so a value is accepted or refused the same way everywhere, with a message naming the field.
Defaults come in two layers: the papers' (SD 1.x: 50 PNDM steps, guidance 7.5, each method's step size and
intervention steps, in ``binding.methods``), then a model preset's own (``binding.models.Preset.defaults``:
the 64 px teaching model is measured at 20 steps, with its own step sizes). On the SDXL family the papers' step
size is scaled to the latent size (``step_size_scale``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_GUIDANCE_SCALE", "DEFAULT_STEPS", "PAPER_LATENT", "RANGES", "Range", "Settings", "defaults_for",
           "step_size_scale"]

DEFAULT_STEPS = 50  # the papers' setting (SD 1.x, PNDM)
DEFAULT_GUIDANCE_SCALE = 7.5
PAPER_LATENT = (64, 64)  # SD 1.x's latents at 512 px, where the papers set their step sizes
# A family's own defaults, under a preset's: SDXL's guidance scale is its pipeline's default (5.0, not SD's 7.5).
FAMILY_DEFAULTS = {"sdxl": {"guidance_scale": 5.0}}


@dataclass(frozen=True)
class Range:
    """The values a setting may take; ``step`` is the UI's increment."""

    label: str
    lo: float
    hi: float
    step: float
    integer: bool = False
    help: str = ""

    def check(self, value, name: str):
        """The value as int/float, or a ValueError naming the field and its range."""
        what = "a whole number" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{self.label} must be {what} from {self.lo:g} to {self.hi:g}, not {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{self.label} must be {what} from {self.lo:g} to {self.hi:g}, not {value!r}")
        if self.integer and float(value) != int(value):
            raise ValueError(f"{self.label} must be a whole number, not {value!r}")
        v = int(value) if self.integer else float(value)
        if not self.lo <= v <= self.hi:
            raise ValueError(f"{self.label} must be from {self.lo:g} to {self.hi:g}, not {v:g}")
        return v


RANGES: dict[str, Range] = {
    "steps": Range("Inference steps", 1, 200, 1, True, "denoising steps"),
    "intervention_steps": Range("Intervention steps", 0, 200, 1, True, "guided steps from the start"),
    "step_size": Range("Step size", 0, 1000, 0.5, False, "gradient step size on the latents"),
    "guidance_scale": Range("Guidance scale", 1, 30, 0.5, False, "classifier-free guidance (1 = none)"),
    "seed": Range("Seed", 0, 2**63 - 1, 1, True, "initial noise"),
    "height": Range("Height", 64, 2048, 8, True, "pixels, a multiple of 8"),
    "width": Range("Width", 64, 2048, 8, True, "pixels, a multiple of 8"),
}


@dataclass(frozen=True)
class Settings:
    """What a run is asked to do; ``None`` means the method's or the model's default."""

    method: str = "syngen"
    terms: tuple[str, ...] | None = None
    steps: int = DEFAULT_STEPS
    intervention_steps: int | None = None
    step_size: float | None = None
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    seed: int = 0
    height: int | None = None
    width: int | None = None

    def check(self) -> "Settings":
        """A copy with every value checked against ``RANGES`` and normalised; ValueError names the field."""
        from binding.methods import TERMS, resolve_method

        changes = {}
        for name, r in RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            changes[name] = r.check(value, name)
        for name in ("height", "width"):
            if changes.get(name) is not None and changes[name] % 8:
                raise ValueError(f"{RANGES[name].label} must be a multiple of 8, not {changes[name]}")
        steps = changes["steps"]
        if changes.get("intervention_steps") is not None and changes["intervention_steps"] > steps:
            raise ValueError(f"Intervention steps ({changes['intervention_steps']}) cannot exceed the inference "
                             f"steps ({steps})")
        if self.terms is not None:
            terms = tuple(dict.fromkeys(str(t) for t in self.terms))
            bad = [t for t in terms if t not in TERMS]
            if bad:
                raise ValueError(f"Unknown loss term(s) {', '.join(bad)}: the terms are {', '.join(TERMS)}")
            changes["terms"] = terms
        method = resolve_method(self.method, changes.get("terms"))  # ValueError on an unknown method
        changes["method"] = self.method if method.name == "custom" else method.name
        return dataclasses.replace(self, **changes)

    def merged(self, **values) -> "Settings":
        """A copy with the given fields replaced, ``None`` values left out."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def sampler_kwargs(self) -> dict:
        """What ``GuidedSampler``'s call takes (seeds apart)."""
        return {k: getattr(self, k) for k in ("steps", "intervention_steps", "step_size", "guidance_scale",
                                               "height", "width", "terms")}


def step_size_scale(family: str, latent: tuple[int, int]) -> float:
    """The factor on the papers' step sizes for a model family at a latent size.

    SDXL: latent area / 64x64. A perturbation of the maps spread over k times as many latent pixels gets a
    gradient k times smaller per pixel, so the same move needs a k times larger step (x4 at 1024 px). SD 1.x/2.x
    keep the papers' values at every size (they are what the references compute, and what is tested against).
    """
    if family != "sdxl":
        return 1.0
    return latent[0] * latent[1] / (PAPER_LATENT[0] * PAPER_LATENT[1])


def defaults_for(model: str | None, method: str, latent: tuple[int, int] | None = None,
                 family: str | None = None) -> dict:
    """steps, intervention_steps, step_size and guidance_scale for ``method`` on ``model``: the model preset's
    own where it has them, else the family's (``FAMILY_DEFAULTS``), else the method's (the papers'), the step
    size scaled by ``step_size_scale`` for the ``family`` (default: the preset's) at ``latent`` (default: the
    preset's native latent size)."""
    from binding.methods import resolve_method
    from binding.models import preset_for

    m = resolve_method(method, None if method != "custom" else ())
    out = {"steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE_SCALE,
           "intervention_steps": m.intervention_steps, "step_size": m.step_size}
    p = preset_for(model) if model else None
    family = family or (p.family if p is not None else "sd")
    out.update(FAMILY_DEFAULTS.get(family, {}))
    latent = latent or (p.latent if p is not None else None)
    if latent is not None:
        out["step_size"] = m.step_size * step_size_scale(family, latent)
    if p is not None:
        out.update(p.defaults_for(m.name))
    return out

