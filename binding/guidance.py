"""The guided sampler: vanilla and guided Stable Diffusion runs from the same seed.

SynGen, Divide & Bind and Attend-and-Excite share one loop (``binding/METHODS.md``): at each intervened step a
separate forward pass of the UNet on the conditional embedding alone (batch 1, gradients on) records the
cross-attention maps, a loss on them is differentiated w.r.t. the latents, the latents take a gradient step,
and the ordinary classifier-free-guidance step follows on the updated latents. The methods differ only in
their loss terms, step-size schedule and refinement, so a method is a row of ``binding.methods.METHODS`` and
any subset of the loss terms (``binding.methods.TERMS``) can be switched on.

Faithfulness. The vanilla run is ``StableDiffusionPipeline.__call__`` (``StableDiffusionXLPipeline``'s for SDXL)
step for step (same latents from a CPU ``torch.Generator`` seeded with the seed, same scheduler calls), and the
``attend-excite`` preset reproduces
diffusers' ``StableDiffusionAttendAndExcitePipeline``, including two details of the reference code that change
results: the refinement runs at every step listed in the thresholds even past the intervention steps, and
under PNDM the loop has one more index than the step count. Not reproduced, because they change nothing but
the cost: the reference's gradient pass at steps where nothing is updated, the refinement's first forward on
an unchanged latent and its last forward when no update follows, and the layers past the last one a loss reads
(the pass is cut there). The gradient pass feeds ``scheduler.scale_model_input(latents)`` as the CFG pass does
(the identity for PNDM and DDIM; the reference feeds unscaled latents, wrong for e.g. Euler). Divide & Bind
follows the same loop with its own refinement test (smallest object TV below the threshold).

Model families. SD 1.x/2.x and SDXL share this loop; what differs is gathered in a few seams: the prompt
encoding (SDXL: both text encoders' states concatenated, the pooled embedding and the time ids as the UNet's
``added_cond_kwargs``, in ``Plan.unet_inputs``), the alignment check (the losses index the first tokenizer's
positions; SDXL's second tokenizer must put every guided word at the same ones), the step-size default
(``binding.settings.step_size_scale``) and the decode (SDXL's VAE is upcast to fp32 when it is fp16, as its
pipeline does: it overflows in fp16). Under a scheduler that scales the UNet's input (Euler: x / sqrt(sigma^2 + 1))
the gradient step is taken on that input, the variance-preserving latent the papers' step sizes were set on,
and mapped back: z <- z - alpha / c^2 * dL/dz with c the input scale (c = 1 under PNDM and DDIM: unchanged).

Cost. Per intervened step: one conditional forward + backward (plus one per refinement iteration), on the
part of the UNet up to the last layer read, with the parameters' gradients off. The loss and the latent update
run in fp32 even when the UNet runs in fp16. Maps for display are recorded in every CFG pass at the read grid
only and stay on the device until a run ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from binding.analysis import Analysis, Binding, Word
from binding.attention import AttentionCapture, Recording, latent_size
from binding.methods import NEEDS_NOTE, TERMS, Method, compute_terms, resolve_method
from binding.pipelines import family
from binding.records import RunResult

__all__ = ["Cancelled", "GuidanceError", "GuidedSampler", "Plan", "Progress"]

# One lock for the process: a run installs processors on a UNet and drives its pipeline's scheduler.
_RUN_LOCK = threading.RLock()


class Cancelled(Exception):
    """The caller asked to stop; raised between denoising steps."""


class GuidanceError(ValueError):
    """A run went numerically wrong (NaN/inf latents); the message names the step."""


# ------------------------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class Progress:
    """Reported after every denoising loop step of every run."""

    run: str  # "vanilla" or "guided"
    seed: int
    run_index: int  # 0-based, over all runs of the call
    n_runs: int
    step: int  # loop steps done in this run (1..total)
    total: int  # loop steps of a run (PNDM: steps + 1)
    fraction: float  # of the whole call, 0..1
    losses: dict[str, float]  # the active terms on this step's maps (empty for a vanilla method)


def _cancel_requested(cancel) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


# ----------------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """Everything fixed for one prompt before any seed runs: settings, targets of each term, embeddings."""

    prompt: str
    method: Method
    terms: tuple[str, ...]  # the terms that have something to work on
    steps: int
    intervention_steps: int
    guidance_scale: float
    height: int
    width: int
    grid: tuple[int, int]
    n_tokens: int
    tokens: list[str]
    bindings: list[Binding]
    subjects: list[Word]
    attributes: list[Word]  # D&B attribute words, channel j
    pairs: list[tuple[int, int]]  # D&B (subject k, attribute j)
    notes: list[str]
    analysis: Analysis | None = None
    negative_prompt: str | None = None
    timesteps: list[int] = field(default_factory=list)
    step_sizes: list[float] = field(default_factory=list)
    prompt_embeds: torch.Tensor | None = None  # the CFG batch (uncond, cond), or cond alone without CFG
    cond_embeds: torch.Tensor | None = None
    timestep_cond: torch.Tensor | None = None
    added_cond: dict | None = None  # SDXL's added conditioning (pooled text, time ids) for the CFG batch
    cond_added: dict | None = None  # ... and for the conditional half alone
    record_maps: bool = True
    read_layers: list[str] = field(default_factory=list)  # in the order of the recorded layer maps

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def guided(self) -> bool:
        return bool(self.terms)

    @property
    def wants_attributes(self) -> bool:
        return "db_binding" in self.terms and bool(self.pairs)

    def unet_inputs(self, cond_only: bool = False) -> dict:
        """The UNet's conditioning keywords for the CFG batch, or (``cond_only``) the guidance pass's batch 1."""
        return {
            "encoder_hidden_states": self.cond_embeds if cond_only else self.prompt_embeds,
            "timestep_cond": self.timestep_cond,
            "added_cond_kwargs": self.cond_added if cond_only else self.added_cond,
        }

    def binding_positions(self) -> list[tuple[list[list[int]], list[int]]]:
        return [b.positions for b in self.bindings]

    def subject_positions(self) -> list[list[int]]:
        return [list(w.token_indices) for w in self.subjects]

    def attribute_positions(self) -> list[list[int]]:
        return [list(w.token_indices) for w in self.attributes]

    def guidance_at(self, i: int) -> bool:
        """Whether loop index i needs a gradient pass: an update step, or a listed refinement step."""
        return self.guided and (
            i < self.intervention_steps or (self.method.refinement is not None and i in self.method.threshold_map)
        )

    def settings(self, model: str, scheduler: str, device: str, dtype: str, family: str = "sd") -> dict:
        return {
            "model": model,
            "family": family,
            "method": self.method.name,
            "terms": list(self.terms),
            "requested_terms": [t for t in TERMS if t in self.method.terms],
            "steps": self.steps,
            "loop_steps": len(self.timesteps),
            "intervention_steps": self.intervention_steps,
            "step_size": self.method.step_size,
            "schedule": self.method.schedule,
            "refinement": self.method.refinement,
            "thresholds": {str(i): v for i, v in self.method.thresholds},
            "max_refinement": self.method.max_refinement,
            "first_max_refinement": self.method.first_max_refinement,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "size": [self.height, self.width],
            "grid": list(self.grid),
            "read_layers": list(self.read_layers),
            "negative_prompt": self.negative_prompt,
            "scheduler": scheduler,
            "device": device,
            "dtype": dtype,
            "parser": self.analysis.parser if self.analysis is not None else None,
            "guided_is_vanilla": not self.guided,
        }


# ------------------------------------------------------------------------------------- run bookkeeping


@dataclass
class _Trace:
    """What one run leaves behind."""

    name: str
    latents: torch.Tensor | None = None
    maps: list[torch.Tensor] = field(default_factory=list)  # per step, (gh, gw, n_tokens) fp16 on the device
    layer_maps: list[torch.Tensor] = field(default_factory=list)  # per step, (layers, gh, gw, n_tokens) fp16
    previews: list[torch.Tensor] = field(default_factory=list)  # per step, the x0 prediction (C, h, w) fp16
    losses: dict[str, list] = field(default_factory=dict)  # on each step's CFG maps
    before_update: dict[str, list] = field(default_factory=dict)  # what the guidance pass optimised
    grad_passes: int = 0  # conditional forward passes with gradients
    backward_passes: int = 0
    refinement: dict[int, int] = field(default_factory=dict)  # loop index -> iterations
    steps_s: list[float] = field(default_factory=list)
    denoise_s: float = 0.0
    decode_s: float = 0.0
    image: object = None

    def put(self, table: dict[str, list], i: int, n: int, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            table.setdefault(k, [None] * n)[i] = v

    def counters(self) -> dict:
        return {
            "grad_passes": self.grad_passes,
            "backward_passes": self.backward_passes,
            "refinement_iterations": sum(self.refinement.values()),
            "refinement": {str(k): v for k, v in sorted(self.refinement.items())},
            "cfg_passes": len(self.steps_s),
        }

    def timings(self) -> dict:
        return {
            "total_s": self.denoise_s + self.decode_s,
            "denoise_s": self.denoise_s,
            "decode_s": self.decode_s,
            "steps_s": list(self.steps_s),
        }


@contextlib.contextmanager
def _parameters_frozen(module: torch.nn.Module):
    """No parameter gradients (the loss is differentiated w.r.t. the latents only): less memory, less work."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _floats(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Scalars to Python floats with one device sync."""
    if not values:
        return {}
    return dict(zip(values, torch.stack([v.detach().float() for v in values.values()]).tolist(), strict=True))


def _word_key(w: Word) -> tuple[int, int]:
    return (w.start, w.end)


def _divide_bind_pairs(bindings: Sequence[Binding], subjects: Sequence[Word], choice: str = "all"):
    """D&B's (object channel, attribute channel) pairs from the parse.

    ``choice="all"``: each subject's modifiers are its attributes. ``"nearest-colour"`` (the authors' pipeline
    takes one colour index per object): the colour word nearest the noun, else the nearest modifier.
    Returns (attribute words, pairs, nouns of bindings that are not subjects and so are left out).
    """
    from binding.analysis import is_colour_word

    subject_keys = [_word_key(w) for w in subjects]
    attributes: list[Word] = []
    pairs: list[tuple[int, int]] = []
    unpaired: list[str] = []
    for b in bindings:
        if _word_key(b.noun) not in subject_keys:
            unpaired.append(b.noun.text)
            continue
        mods = list(b.modifiers)
        if choice == "nearest-colour" and mods:
            colours = [w for w in mods if is_colour_word(w.text)] or mods
            mods = [min(colours, key=lambda w: abs(b.noun.start - w.end))]
        for mod in mods:
            keys = [_word_key(a) for a in attributes]
            if _word_key(mod) not in keys:
                attributes.append(mod)
                keys.append(_word_key(mod))
            pairs.append((subject_keys.index(_word_key(b.noun)), keys.index(_word_key(mod))))
    return attributes, pairs, unpaired


# -------------------------------------------------------------------------------------------- sampler


class GuidedSampler:
    """Vanilla and guided runs on the components of a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.

    The pipeline is used as it is (its UNet, VAE, text encoders, tokenizers, scheduler and its own
    ``encode_prompt``/``prepare_latents``), so a vanilla run is exactly diffusers'. One call at a time.
    """

    def __init__(self, pipe, model: str | None = None):
        from binding.models import model_name

        self.pipe = pipe
        self.unet = pipe.unet
        self.scheduler = pipe.scheduler
        self.model = model or model_name(pipe)
        self.family = family(pipe)

    # ------------------------------------------------------------------------------------ the call

    def __call__(
        self,
        prompt: str,
        seeds: int | Sequence[int] = (0,),
        method: str | Method = "syngen",
        *,
        runs: Sequence[str] = ("vanilla", "guided"),
        decode: bool = True,
        callback: Callable[[Progress], None] | None = None,
        progress: bool = False,
        cancel: threading.Event | Callable[[], bool] | None = None,
        **settings,
    ) -> list[RunResult]:
        """One ``RunResult`` per seed: a vanilla and a guided run from the same initial latents.

        ``settings`` are ``plan``'s (steps, guidance_scale, height, width, intervention_steps, step_size, terms,
        bindings, subjects, analysis, negative_prompt, record_maps). ``runs`` may drop one side (the benchmark
        times them apart). ``callback`` gets a ``Progress`` after every loop step; ``progress=True`` shows a tqdm
        bar; ``cancel`` (an Event or a callable) stops between steps with ``Cancelled``.
        """
        seeds = [seeds] if isinstance(seeds, (int, np.integer)) else list(seeds)
        runs = tuple(runs)
        if not runs or any(r not in ("vanilla", "guided") for r in runs):
            raise ValueError(f"runs must name 'vanilla' and/or 'guided', not {runs!r}")
        with _RUN_LOCK:
            # 1-3. Check inputs, analyse the prompt, encode it: one plan for every seed.
            plan = self.plan(prompt, method, seeds=seeds, **settings)
            # Nothing to guide: the guided side is the vanilla run itself, computed once.
            computed = tuple(runs) if plan.guided else ("vanilla",)
            n_runs = len(seeds) * len(computed)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=n_runs * len(plan.timesteps), desc="denoising", unit="step")
            results = []
            try:
                # 4. Attach the attention capture for the whole call; processors are restored on exit.
                with self.capture(plan) as capture, _parameters_frozen(self.unet):
                    k = 0
                    for seed in seeds:
                        traces: dict[str, _Trace] = {}
                        for r in computed:
                            # 5. Denoise (prepare latents, loop), then decode.
                            traces[r] = self.denoise(
                                plan,
                                seed,
                                guided=(r == "guided"),
                                capture=capture,
                                report=self._reporter(callback, bar, r, seed, k, n_runs, len(plan.timesteps)),
                                cancel=cancel,
                            )
                            k += 1
                            if decode:
                                self._decode_into(traces[r])
                        if not plan.guided:
                            traces = {r: traces["vanilla"] for r in runs}
                        # 6. Collect
                        results.append(self._result(plan, seed, traces))
            finally:
                if bar is not None:
                    bar.close()
            return results

    # ------------------------------------------------------------------------------ 1-3: the plan

    def plan(
        self,
        prompt: str,
        method: str | Method = "syngen",
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        intervention_steps: int | None = None,
        step_size: float | None = None,
        terms: Iterable[str] | None = None,
        bindings: Sequence[Binding] | None = None,
        subjects: Sequence[Word] | None = None,
        analysis: Analysis | None = None,
        negative_prompt: str | None = None,
        seeds: Sequence[int] = (0,),
        record_maps: bool = True,
    ) -> Plan:
        """Check the inputs, resolve the method, analyse and encode the prompt.

        A setting left at None takes the model's default for the method, else the method's
        (``binding.settings.defaults_for``).
        """
        from binding.models import default_size
        from binding.settings import Settings, defaults_for, step_size_scale

        # 1. Check inputs
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("The prompt is empty: describe the image to generate.")
        m = resolve_method(method, terms)
        base = defaults_for(self.model, m.name, family=self.family)
        size = default_size(self.pipe)
        if not seeds:
            raise ValueError("give at least one seed")
        for seed in seeds:
            Settings(seed=seed).check()
        asked = Settings(
            method=m.name if m.name != "custom" else "custom", terms=tuple(m.terms),
            steps=steps if steps is not None else base["steps"],
            intervention_steps=intervention_steps, step_size=step_size if step_size is not None else base["step_size"],
            guidance_scale=guidance_scale if guidance_scale is not None else base["guidance_scale"],
            height=height or size, width=width or size,
        ).check()
        steps, guidance_scale, height, width = asked.steps, asked.guidance_scale, asked.height, asked.width
        latent = latent_size(height, width, self.pipe.vae_scale_factor)
        scale = step_size_scale(self.family, latent) if step_size is None else 1.0
        if step_size is None:  # the default follows the latent size that runs
            scaled = defaults_for(self.model, m.name, latent=latent, family=self.family)["step_size"]
            asked = dataclasses.replace(asked, step_size=scaled)
        if intervention_steps is None:
            # The method's own count, on loop indices as the reference code does (max_iter_to_alter = 25 at any
            # number of steps; PNDM's loop has one more index than the step count).
            intervention_steps = int(base["intervention_steps"])
        else:
            intervention_steps = asked.intervention_steps
        m = dataclasses.replace(m, step_size=asked.step_size, intervention_steps=intervention_steps)
        for i, thr in m.thresholds:
            if not 0.0 <= thr <= 1.0 and m.refinement == "ae-peak":
                raise ValueError(f"A&E refinement threshold at step {i} must be from 0 to 1, not {thr!r}")

        # 2. Analyse the prompt: what each loss term works on, and what happens when there is nothing
        notes: list[str] = []
        if scale != 1.0 and m.terms:
            notes.append(f"Step size {m.step_size:g}: the papers' default scaled x{scale:g} to this model's "
                         f"{latent[0]}x{latent[1]} latents (they set it on SD 1.x's 64x64).")
        if analysis is None and (m.terms or bindings is not None or subjects is not None):
            from binding.analysis import analyze

            analysis = analyze(prompt)
        elif analysis is not None and analysis.prompt != prompt:
            raise ValueError("the analysis given is of another prompt")
        if analysis is not None:
            tokens, n_tokens = list(analysis.tokens), analysis.n_tokens
        else:
            tokens = self._tokens(prompt)
            n_tokens = len(tokens)
        bindings = list(analysis.bindings if bindings is None and analysis is not None else bindings or [])
        subjects = list(analysis.nouns if subjects is None and analysis is not None else subjects or [])
        for b in bindings:
            for w in (*b.modifiers, b.noun):
                self._check_word(w, n_tokens, "binding word")
        for w in subjects:
            self._check_word(w, n_tokens, "subject")
        if self.family == "sdxl" and (bindings or subjects):
            self._check_tokenizers(prompt, [w for b in bindings for w in (*b.modifiers, b.noun)] + subjects)
        attributes, pairs, unpaired = _divide_bind_pairs(bindings, subjects, m.option("attributes", "all"))
        have = {"bindings": bool(bindings), "subjects": bool(subjects), "pairs": bool(pairs)}
        active = []
        for term in TERMS:
            if term not in m.terms:
                continue
            if have[TERMS[term].needs]:
                active.append(term)
            else:
                notes.append(f"The {term} term is off: {NEEDS_NOTE[TERMS[term].needs]}.")
        if m.terms and not active:
            notes.append(f"Nothing to guide for {m.name}: the guided image is the vanilla one.")
        elif not m.terms:
            notes.append("No guidance (vanilla method): the guided image is the vanilla one.")
        if "db_binding" in active and unpaired:
            notes.append(
                f"Divide & Bind binds only subjects; bindings of {', '.join(unpaired)} are left out of its "
                "binding term."
            )

        # 3. Encode the prompt; fix the grid and the timesteps
        device = self.pipe._execution_device
        grid_capture = AttentionCapture(
            self.unet, height, width, self.pipe.vae_scale_factor, attributes="db_binding" in active
        )
        grid = grid_capture.grid
        if grid[0] < 2 or grid[1] < 2:
            raise ValueError(f"{height}x{width} px gives a {grid[0]}x{grid[1]} attention grid: too small to guide")
        if "db_binding" in active and not grid_capture.attribute_layers:
            notes.append(
                "This model has no cross-attention grid finer than the read grid: Divide & Bind's attribute "
                "maps use the read grid."
            )
        plan = Plan(
            prompt=prompt,
            method=m,
            terms=tuple(active),
            steps=int(steps),
            intervention_steps=int(intervention_steps),
            guidance_scale=float(guidance_scale),
            height=height,
            width=width,
            grid=grid,
            n_tokens=n_tokens,
            tokens=tokens,
            bindings=bindings,
            subjects=subjects,
            attributes=attributes,
            pairs=pairs,
            notes=notes,
            analysis=analysis,
            negative_prompt=negative_prompt,
            record_maps=record_maps,
            read_layers=[layer.name for layer in grid_capture.aggregation_order],
        )
        self._encode(plan, device)
        if self.unet.config.time_cond_proj_dim is not None:
            w = torch.tensor(plan.guidance_scale - 1).repeat(1)
            plan.timestep_cond = self.pipe.get_guidance_scale_embedding(
                w, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=plan.cond_embeds.dtype)
        self.scheduler.set_timesteps(plan.steps, device=device)
        plan.timesteps = [int(t) for t in self.scheduler.timesteps]
        plan.step_sizes = m.step_sizes(len(plan.timesteps))
        return plan

    def _encode(self, plan: Plan, device) -> None:
        """The plan's text conditioning, as the family's pipeline computes it in its ``__call__``."""
        with torch.no_grad():  # diffusers' __call__ runs under no_grad; the text encoder is never differentiated
            if self.family == "sdxl":
                cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
                    plan.prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=plan.do_cfg,
                    negative_prompt=plan.negative_prompt,
                )
                te2 = getattr(self.pipe, "text_encoder_2", None)
                size = (plan.height, plan.width)
                time_ids = self.pipe._get_add_time_ids(
                    size, (0, 0), size, dtype=cond.dtype,
                    text_encoder_projection_dim=te2.config.projection_dim if te2 is not None else int(pooled.shape[-1]),
                ).to(device)
                plan.cond_added = {"text_embeds": pooled, "time_ids": time_ids}
                plan.added_cond = (
                    {"text_embeds": torch.cat([uncond_pooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])}
                    if plan.do_cfg else plan.cond_added
                )
            else:
                cond, uncond = self.pipe.encode_prompt(plan.prompt, device, 1, plan.do_cfg, plan.negative_prompt)
        plan.cond_embeds = cond
        plan.prompt_embeds = torch.cat([uncond, cond]) if plan.do_cfg else cond

    def _check_tokenizers(self, prompt: str, words: Sequence[Word]) -> None:
        """The maps' key positions are the first tokenizer's; with two text encoders side by side each key
        concatenates both encoders' states at that position, so the second tokenizer must put every guided word
        at the same positions (it does for CLIP's BPE, which SDXL's two tokenizers share; padding differs)."""
        from binding.analysis import word_positions

        for attr in ("tokenizer", "tokenizer_2"):
            tok = getattr(self.pipe, attr, None)
            if tok is None:
                continue
            if not hasattr(tok, "backend_tokenizer"):  # a slow tokenizer has no character offsets
                raise ValueError(f"The model's {attr.replace('_', ' ')} is a slow tokenizer: words cannot be aligned to "
                                 "its positions. Save the model with fast tokenizers (tokenizer.json).")
            for w, got in zip(words, word_positions(prompt, words, tok), strict=True):
                if tuple(got) != tuple(w.token_indices):
                    raise ValueError(
                        f"The model's {attr.replace('_', ' ')} puts '{w.text}' at position(s) {list(got)}, the "
                        f"analysis at {list(w.token_indices)}: its two text encoders do not line up on this prompt, so "
                        "its attention maps cannot be read per word."
                    )

    def _tokens(self, prompt: str) -> list[str]:
        """CLIP tokens as the text encoder sees them, when no analysis was needed (vanilla)."""
        from binding.tokenizer import readable_token

        tok = self.pipe.tokenizer
        ids = tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids
        return [readable_token(t) for t in tok.convert_ids_to_tokens(ids)]

    @staticmethod
    def _check_word(w: Word, n_tokens: int, what: str) -> None:
        if not w.token_indices:
            raise ValueError(f"{what} '{w.text}' has no CLIP position (past the 77-token limit?)")
        bad = [p for p in w.token_indices if not 1 <= p <= n_tokens - 2]
        if bad:
            raise ValueError(
                f"{what} '{w.text}' has CLIP position(s) {bad} outside the prompt's words (1..{n_tokens - 2})"
            )

    def capture(self, plan: Plan) -> AttentionCapture:
        """The attention capture a plan needs (attach it with ``with``)."""
        return AttentionCapture(
            self.unet, plan.height, plan.width, self.pipe.vae_scale_factor, attributes=plan.wants_attributes
        )

    # ------------------------------------------------------------------------------- 4-5: denoise

    def prepare_latents(self, plan: Plan, seed: int) -> tuple[torch.Tensor, torch.Generator]:
        """Initial latents as ``StableDiffusionPipeline`` draws them from ``torch.Generator("cpu").manual_seed(seed)``."""
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        latents = self.pipe.prepare_latents(
            1,
            self.unet.config.in_channels,
            plan.height,
            plan.width,
            plan.prompt_embeds.dtype,
            self.pipe._execution_device,
            generator,
        )
        return latents, generator

    def denoise(
        self,
        plan: Plan,
        seed: int,
        guided: bool,
        capture: AttentionCapture,
        report: Callable[[int, dict], None] | None = None,
        cancel=None,
    ) -> _Trace:
        """One run: the scheduler's loop from the seed's latents, with the guidance step when ``guided``."""
        trace = _Trace("guided" if guided else "vanilla")
        start = time.perf_counter()
        self.scheduler.set_timesteps(plan.steps, device=self.pipe._execution_device)  # resets its state too
        if hasattr(self.scheduler, "set_begin_index"):  # as diffusers' loops do (Euler finds its step index so)
            self.scheduler.set_begin_index(0)
        timesteps = self.scheduler.timesteps
        latents, generator = self.prepare_latents(plan, seed)
        extra = self.pipe.prepare_extra_step_kwargs(generator, 0.0)
        n = len(timesteps)
        for i, t in enumerate(timesteps):
            if _cancel_requested(cancel):
                raise Cancelled(f"cancelled before step {i + 1} of the {trace.name} run (seed {seed})")
            t0 = time.perf_counter()
            if guided and plan.guidance_at(i):
                latents = self.guidance_step(plan, capture, latents, i, t, trace, cancel)
            latents, values = self.cfg_step(plan, capture, latents, i, t, extra, trace)
            if not torch.isfinite(latents).all():
                raise GuidanceError(
                    f"The {trace.name} run (seed {seed}) produced NaN/inf latents at step {i + 1} of {n} (t={int(t)})"
                    + (
                        f"; the step size {plan.method.step_size:g} is probably too large for this model"
                        if guided
                        else ""
                    )
                )
            trace.put(trace.losses, i, n, values)
            trace.steps_s.append(time.perf_counter() - t0)
            if report is not None:
                report(i + 1, values)
        trace.latents = latents
        trace.denoise_s = time.perf_counter() - start
        return trace

    def cfg_step(self, plan, capture, latents, i, t, extra, trace=None) -> tuple[torch.Tensor, dict[str, float]]:
        """diffusers' denoising step (no grad), recording the conditional branch's maps for display."""
        with torch.no_grad():
            model_input = torch.cat([latents] * 2) if plan.do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            rec_ctx = (
                capture.record(batch_index=1 if plan.do_cfg else 0, attributes=plan.wants_attributes)
                if plan.record_maps
                else contextlib.nullcontext()
            )
            with rec_ctx as rec:
                noise_pred = self.unet(
                    model_input, t, **plan.unet_inputs(), cross_attention_kwargs=None, return_dict=False
                )[0]
            if plan.do_cfg:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + plan.guidance_scale * (noise_text - noise_uncond)
            if trace is not None and plan.record_maps:
                trace.previews.append(self._predicted_x0(latents, noise_pred, t)[0].to(torch.float16))
            latents = self.scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            values: dict[str, float] = {}
            if rec is not None:
                if trace is not None:
                    trace.maps.append(rec.maps()[..., : plan.n_tokens].to(torch.float16))
                    layers = rec.layer_maps()
                    trace.layer_maps.append(torch.stack([m[..., : plan.n_tokens] for m in layers.values()]).half())
                if plan.terms:
                    _, parts, diag = self.losses(plan, rec, i)
                    values = _floats({**parts, **diag})
        return latents, values

    def _input_scale(self, t) -> float:
        """c with ``scale_model_input(z, t) = c z``: 1 for PNDM and DDIM, 1 / sqrt(sigma^2 + 1) for Euler."""
        return float(self.scheduler.scale_model_input(torch.ones(1, dtype=torch.float64), t))

    def _predicted_x0(self, latents: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
        """The clean latents this step's prediction implies (epsilon or v prediction), for latents in the
        variance-preserving form (PNDM, DDIM) or in the sigma form of Euler-type schedulers (x0 + sigma * eps)."""
        x, out = latents.float(), model_output.float()
        v = self.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
        c = self._input_scale(t)
        if c != 1.0:  # the sigma form: the UNet sees x / sqrt(sigma^2 + 1)
            sigma = (1.0 / (c * c) - 1.0) ** 0.5
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1) if v else x - sigma * out
        acp = self.scheduler.alphas_cumprod.to(latents.device)[int(t)].float()
        if v:
            return acp.sqrt() * x - (1 - acp).sqrt() * out
        return (x - (1 - acp).sqrt() * out) / acp.sqrt()

    # ---------------------------------------------------------------------------------- guidance

    def losses(
        self, plan: Plan, rec: Recording, i: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(total, per-term losses, diagnostics) on the maps of one pass, at loop index ``i``
        (``binding.methods.compute_terms``). Divide & Bind's two terms meet inside a max over objects, so they
        are one value, ``divide_bind``; the diagnostics drive the refinements."""
        return compute_terms(plan, rec, i)

    def grad_pass(self, plan: Plan, capture: AttentionCapture, z: torch.Tensor, t, i: int, trace: _Trace | None = None):
        """The conditional forward with gradients (cut after the last layer read) and the losses on its maps."""
        with torch.enable_grad():
            model_input = self.scheduler.scale_model_input(z, t).to(self.unet.dtype)
            with capture.record(batch_index=0, attributes=plan.wants_attributes, stop_early=True) as rec:
                self.unet(model_input, t, **plan.unet_inputs(cond_only=True), return_dict=False)
            if trace is not None:
                trace.grad_passes += 1
            return self.losses(plan, rec, i)

    def _descend(self, z: torch.Tensor, total: torch.Tensor, alpha: float, trace: _Trace | None) -> torch.Tensor:
        (grad,) = torch.autograd.grad(total, [z])
        if total.dtype != torch.float32 or grad.dtype != torch.float32:  # the invariant under a half-precision UNet
            raise GuidanceError(f"the guidance loss and update must be float32, got a {total.dtype} loss and a "
                                f"{grad.dtype} gradient")
        if trace is not None:
            trace.backward_passes += 1
        return (z - alpha * grad).detach().requires_grad_(True)

    def guidance_step(self, plan, capture, latents, i, t, trace: _Trace | None = None, cancel=None) -> torch.Tensor:
        """Loop index ``i``'s update: refinement where listed, then the ordinary gradient step (fp32), taken on
        the UNet's input (see the module docstring)."""
        alpha = plan.step_sizes[i]
        c = self._input_scale(t)
        if c != 1.0:
            alpha = alpha / (c * c)
        ordinary = i < plan.intervention_steps
        threshold = plan.method.threshold_map.get(i) if plan.method.refinement else None
        z = latents.detach().float().requires_grad_(True)
        total, parts, diag = self.grad_pass(plan, capture, z, t, i, trace)
        if trace is not None:
            trace.put(trace.before_update, i, len(plan.timesteps), _floats({**parts, **diag}))
        if threshold is not None and plan.method.unmet(parts, diag, threshold):
            # The reference's loop: each iteration steps from the latest latents, then tests the loss it had
            # *before* that step, so it ends one step after the threshold is met; the forward at the final
            # latents serves both the next test and the ordinary step that follows.
            cap = plan.method.refinement_cap(i)
            it = 0
            while True:
                if _cancel_requested(cancel):
                    raise Cancelled(f"cancelled during the refinement at step {i + 1}")
                it += 1
                unmet = plan.method.unmet(parts, diag, threshold)
                updated = bool(total != 0)
                if updated:
                    z = self._descend(z, total, alpha, trace)
                done = it >= cap or not unmet or not updated
                if done and not (ordinary and updated):
                    break
                total, parts, diag = self.grad_pass(plan, capture, z, t, i, trace)
                if done:
                    break
            if trace is not None:
                trace.refinement[i] = it
        if ordinary and bool(total != 0):
            z = self._descend(z, total, alpha, trace)
        return z.detach().to(latents.dtype)


    # --------------------------------------------------------------------------------- 6: results

    def decode(self, latents: torch.Tensor):
        """The PIL image of final latents (the family's decode and post-processing, as its pipeline does them).

        SDXL's VAE overflows in fp16: as ``StableDiffusionXLPipeline`` does (``force_upcast``), it decodes in fp32
        and goes back to fp16 afterwards.
        """
        vae = self.pipe.vae
        upcast = self.family == "sdxl" and vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        with torch.no_grad():
            try:
                if upcast:
                    vae.to(dtype=torch.float32)
                z = latents.to(vae.dtype)
                mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
                if self.family == "sdxl" and mean is not None and std is not None:
                    shape = (1, -1, 1, 1)
                    z = z * torch.tensor(std).view(shape).to(z) / vae.config.scaling_factor + torch.tensor(mean).view(
                        shape).to(z)
                else:
                    z = z / vae.config.scaling_factor
                image = vae.decode(z, return_dict=False)[0]
            finally:
                if upcast:
                    vae.to(dtype=torch.float16)
        return self.pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True])[0]

    def _decode_into(self, trace: _Trace) -> None:
        start = time.perf_counter()
        trace.image = self.decode(trace.latents)
        trace.decode_s = time.perf_counter() - start

    @staticmethod
    def _reporter(callback, bar, run, seed, k, n_runs, total):
        if callback is None and bar is None:
            return None

        def report(step: int, losses: dict) -> None:
            if bar is not None:
                bar.update(1)
                if losses:
                    bar.set_postfix({key: f"{v:.3g}" for key, v in losses.items()}, refresh=False)
            if callback is not None:
                callback(
                    Progress(run, seed, k, n_runs, step, total, (k * total + step) / (n_runs * total), dict(losses))
                )

        return report

    def _result(self, plan: Plan, seed: int, traces: dict[str, _Trace]) -> RunResult:
        def arr(x):
            return None if x is None else x.detach().float().cpu().numpy()

        def maps(tr, what="maps"):
            return None if tr is None or not getattr(tr, what) else torch.stack(getattr(tr, what)).cpu().numpy()

        v, g = traces.get("vanilla"), traces.get("guided")
        # Each run once: a guided side that is the vanilla run itself has no timings or counters of its own.
        own = {
            name: tr
            for name, tr in (("vanilla", v), ("guided", g))
            if tr is not None and not (name == "guided" and tr is v)
        }
        losses = {}
        for name, tr in (("vanilla", v), ("guided", g)):
            if tr is not None and tr.losses:
                losses[name] = tr.losses
        if g is not None and g.before_update:
            losses["guided_before_update"] = g.before_update
        vanilla_latents, vanilla_maps = (arr(v.latents), maps(v)) if v else (None, None)
        settings = plan.settings(
            self.model,
            type(self.scheduler).__name__,
            str(self.pipe._execution_device),
            str(self.unet.dtype).replace("torch.", ""),
            self.family,
        )
        return RunResult(
            prompt=plan.prompt,
            seed=int(seed),
            settings=settings,
            bindings=list(plan.bindings),
            subjects=list(plan.subjects),
            grid=tuple(plan.grid),
            tokens=list(plan.tokens),
            vanilla_image=v.image if v else None,
            guided_image=g.image if g else None,
            vanilla_maps=vanilla_maps,
            guided_maps=vanilla_maps if g is v else maps(g),
            losses=losses,
            notes=list(plan.notes),
            timings={name: tr.timings() for name, tr in own.items()},
            counters={name: tr.counters() for name, tr in own.items()},
            vanilla_latents=vanilla_latents,
            guided_latents=vanilla_latents if g is v else arr(g.latents) if g else None,
            vanilla_layer_maps=maps(v, "layer_maps"),
            guided_layer_maps=maps(g, "layer_maps"),
            vanilla_previews=maps(v, "previews"),
            guided_previews=maps(g, "previews"),
        )

