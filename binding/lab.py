"""What the app shows, as plain functions: prompt views, edited pairs, run views.

The Gradio layer (app.py) only wires components to these functions, so everything a visitor sees can be
produced and tested without a browser. All text that comes from a visitor is escaped here.
"""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass

from binding.analysis import Analysis, Binding, PromptError, analyze, bindings_from_pairs, pairs_from_bindings
from binding.methods import DIAGNOSTICS, METHODS, TERMS, method_names
from binding.render import binding_colours, parse_svg

PAIR_HEADERS = ["use", "modifiers", "noun"]


@dataclass(frozen=True)
class PromptView:
    analysis: Analysis
    parse_html: str  # the parse SVG in a horizontally scrolling box, with the parser's name
    rows: list[list]  # the editable pairs table, prefilled from the parse
    tokens_html: str  # CLIP tokens with positions, bound words coloured
    notice: str  # Markdown: notes on the prompt (empty, no noun, truncation), or ""


def prompt_view(prompt: str) -> PromptView:
    """Everything the app shows for a prompt before any model runs; a prompt that cannot be read gives the
    empty view with the reason as its notice."""
    try:
        analysis = analyze(prompt or "")
    except PromptError as exc:
        empty = analyze("")
        notice = notes_markdown([f"This prompt cannot be used: {exc}."])
        return PromptView(empty, parse_html(empty), [], tokens_html(empty), notice)
    rows = [[True, mods, noun] for mods, noun in pairs_from_bindings(analysis)]
    return PromptView(analysis, parse_html(analysis), rows, tokens_html(analysis), notes_markdown(analysis.notes))


def recoloured(analysis: Analysis, bindings) -> tuple[str, str]:
    """The parse and the tokens coloured by the given (edited) bindings."""
    return parse_html(analysis, bindings), tokens_html(analysis, bindings)


def parse_html(analysis: Analysis, bindings=None) -> str:
    header = f'<div class="parser-name">parsed by <code>{html.escape(analysis.parser)}</code></div>'
    if not analysis.prompt.strip():
        return header + '<div class="parse-empty">Type a prompt to see its dependency parse.</div>'
    return header + f'<div class="parse-scroll" style="overflow-x:auto">{parse_svg(analysis, bindings=bindings)}</div>'


def tokens_html(analysis: Analysis, bindings=None) -> str:
    """CLIP tokens as chips "position: piece", each bound word's chips in its binding's colour."""
    bindings = analysis.bindings if bindings is None else bindings
    by_start = binding_colours(bindings)
    colour_of = {i: by_start[w.start] for b in bindings for w in (b.noun, *b.modifiers) for i in w.token_indices}
    chips = []
    for i, tok in enumerate(analysis.tokens):
        style = f' style="border-color:{colour_of[i]};color:{colour_of[i]};font-weight:bold"' if i in colour_of else ""
        chips.append(f'<span class="tok"{style}><sub>{i}</sub>{html.escape(tok.replace("</w>", ""))}</span>')
    note = ""
    if analysis.truncated:
        cut = " ".join(w.text for w in analysis.truncated[:10])
        note = (
            f'<div class="trunc">The prompt is longer than CLIP reads (77 tokens): the model never sees '
            f"<b>{html.escape(cut)}{' …' if len(analysis.truncated) > 10 else ''}</b>.</div>"
        )
    return f'<div class="tokens">{"".join(chips)}</div>{note}'


def notes_markdown(notes) -> str:
    return "\n".join(f"- {_md_escape(n)}" for n in notes)


def _md_escape(text: str) -> str:
    """Text shown in Markdown stays text: no HTML, no emphasis, no links."""
    text = html.escape(str(text), quote=False)
    for ch in "\\`*_[]|~":
        text = text.replace(ch, "\\" + ch)
    return text


def edited_bindings(analysis: Analysis, rows) -> tuple[list[Binding], list[str]]:
    """Bindings from the edited table (rows switched off are ignored) and one message per unusable row."""
    used = []
    index = []
    for r, row in enumerate(_table_rows(rows)):
        use, mods, noun = (list(row) + [None, "", ""])[:3]
        if _truthy(use):
            used.append((mods or "", noun or ""))
            index.append(r)
    bindings, problems = bindings_from_pairs(analysis, used)
    return bindings, [f"row {index[p.row] + 1}: {p.message}" for p in problems]


def problems_markdown(problems: list[str]) -> str:
    return "\n".join(f"- {_md_escape(p)}" for p in problems)


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1", "yes", "on", "x"}
    return bool(value)


def _table_rows(rows) -> list[list]:
    """A Dataframe value as a list of rows, whatever form Gradio hands it in (list, dict, pandas)."""
    if rows is None:
        return []
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # pandas
        return rows.values.tolist()
    if isinstance(rows, dict):
        return list(rows.get("data") or [])
    return [list(r) for r in rows]


def binding_legend(bindings) -> str:
    """A line per binding in its colour: "red -> apple"."""
    colours = binding_colours(bindings)
    out = []
    for b in bindings:
        c = colours.get(b.noun.start, "#000")
        out.append(f'<span style="color:{c};font-weight:bold">{html.escape(str(b))}</span>')
    return " · ".join(out)


# ------------------------------------------------------------------------------------- app settings

CUSTOM = "Custom"
# The methods a visitor picks from: every guided preset by its label, then custom.
METHOD_KEYS = {**{METHODS[n].label: n for n in method_names(guided_only=True)}, CUSTOM: "custom"}
METHOD_LABELS = list(METHOD_KEYS)
DEFAULT_METHOD = METHODS["syngen"].label
TERM_CHOICES = [(t.label, t.name) for t in TERMS.values()]
DEFAULT_OPACITY = 0.55
OVERLAP_HEADERS = ["pair", "other noun", "vanilla: own", "vanilla: other", "guided: own", "guided: other"]
OVERLAP_LABEL = ("Where each modifier's attention lies: overlap with its own noun's map vs the closest other noun's "
                 "(0 = apart, 1 = same place; at the step shown). Binding works when own goes up and other down.")


def method_settings(label: str, model: str | None = None) -> dict | None:
    """The terms, step size and intervention steps of a preset on ``model`` (None for custom)."""
    from binding.settings import defaults_for

    key = METHOD_KEYS.get(label)
    if key is None or key == "custom":
        return None
    d = defaults_for(model, key)
    return {"terms": [t for t in TERMS if t in METHODS[key].terms], "step_size": d["step_size"],
            "intervention_steps": d["intervention_steps"], "steps": d["steps"]}


def terms_match(label: str, terms) -> bool:
    settings = method_settings(label)
    return settings is not None and set(settings["terms"]) == set(terms or [])


def examples_for(model: str) -> list[str]:
    """The example prompts that suit a model (its preset's)."""
    from binding.models import preset

    p = preset(model)
    return list(p.examples) if p is not None and p.examples else []


def model_banner(model: str) -> str:
    from binding.models import describe, preset
    from binding.shapes.world import COLOURS, SHAPES

    p = preset(model)
    if p is not None and p.builder == "shapes":
        return (
            f'<div class="banner">Running <b>offline</b> on <b>shapes</b>: {html.escape(p.description)}. '
            f"It knows {len(COLOURS)} colours ({', '.join(COLOURS)}) and {len(SHAPES)} shapes ({', '.join(SHAPES)}), "
            "in prompts like <i>a blue square and a yellow triangle</i>; every picture is read back by an exact "
            "scorer. With a GPU, choose Stable Diffusion 1.4 for everyday prompts.</div>"
        )
    if p is not None and p.offline:
        return (
            f'<div class="banner">Running <b>offline</b> on <b>{html.escape(p.name)}</b>: {html.escape(p.description)}. '
            "Its pictures are not meant to look like anything; the parse, the attention maps, the losses and the "
            "guidance are real. With a GPU, choose Stable Diffusion 1.4 for real images.</div>"
        )
    return f'<div class="banner">Model: {html.escape(describe(model))}</div>'


# ---------------------------------------------------------------------------------------- generation


@dataclass
class GenerationRequest:
    """A visitor's settings, checked: everything a run needs, or a ValueError saying what is wrong."""

    prompt: str
    analysis: Analysis
    bindings: list[Binding]
    model: str
    method: str
    terms: list[str]
    steps: int
    intervention_steps: int
    step_size: float
    guidance_scale: float
    seed: int
    warnings: list[str]

    @classmethod
    def from_ui(cls, prompt, rows, model, method_label, terms, steps, intervention_steps, step_size, guidance_scale,
                seed, randomize_seed=False) -> "GenerationRequest":
        import random

        from binding.models import PRESETS
        from binding.settings import Settings

        warnings: list[str] = []
        prompt = (prompt or "").strip()
        if not prompt:
            raise ValueError("The prompt is empty: type what the image should show.")
        if model not in PRESETS:
            raise ValueError(f"Unknown model {model!r}: choose one of {', '.join(PRESETS)}.")
        key = METHOD_KEYS.get(method_label, method_label)
        if key not in METHOD_KEYS.values():
            raise ValueError(f"Unknown method {method_label!r}: choose one of {', '.join(METHOD_LABELS)}.")
        terms = [t for t in (terms or []) if t]
        if randomize_seed:
            seed = random.randrange(2**31)
        if isinstance(intervention_steps, (int, float)) and isinstance(steps, (int, float)) and intervention_steps > steps:
            warnings.append(f"Intervention steps ({intervention_steps:g}) exceed the inference steps: using {steps:g}.")
            intervention_steps = steps
        checked = Settings(method=key, terms=tuple(terms), steps=steps, intervention_steps=intervention_steps,
                           step_size=step_size, guidance_scale=guidance_scale, seed=seed).check()
        steps, intervention_steps, seed = checked.steps, checked.intervention_steps, checked.seed

        analysis = analyze(prompt)
        bindings, problems = edited_bindings(analysis, rows)
        if problems:
            raise ValueError("Some pairs cannot be used; fix or switch them off: " + "; ".join(problems))
        binding_terms = {"syngen_positive", "syngen_negative", "db_binding"}
        if binding_terms & set(terms) and not bindings:
            warnings.append("No modifier → noun pair is switched on, so the binding terms have nothing to bind.")
        if not terms:
            warnings.append("No loss term is ticked: the guided run is the vanilla run.")
        elif ("ae_excite" in terms or "db_attendance" in terms) and not analysis.nouns and not bindings:
            warnings.append("The prompt has no noun for Attend-and-Excite / Divide & Bind to excite.")
        return cls(prompt, analysis, bindings, model, key, list(checked.terms), steps, intervention_steps,
                   checked.step_size, checked.guidance_scale, seed, warnings)


_PIPES: dict = {}
_PIPE_LOCK = threading.Lock()


def pipeline(model: str):
    """The loaded pipeline for a preset, kept while it is the one in use (one model in memory at a time)."""
    from binding.models import load_pipeline

    with _PIPE_LOCK:
        if model not in _PIPES:
            _PIPES.clear()
            _PIPES[model] = load_pipeline(model)
        return _PIPES[model]


def run_generation(job: GenerationRequest, callback=None, cancel=None):
    """One seed, vanilla and guided, with the visitor's method, terms and pairs."""
    from binding.guidance import GuidedSampler

    pipe = pipeline(job.model)
    (result,) = GuidedSampler(pipe)(
        job.prompt, [job.seed], job.method, terms=job.terms, steps=job.steps, intervention_steps=job.intervention_steps,
        step_size=job.step_size, guidance_scale=job.guidance_scale, bindings=job.bindings,
        analysis=job.analysis, callback=callback, cancel=cancel,
    )
    return result


def gpu_seconds(job: GenerationRequest) -> int:
    """A ZeroGPU reservation long enough for the run on a shared A100-class GPU (SD 1.x, 512 px)."""
    refinement = 3 if {"ae_excite", "db_attendance", "db_binding"} & set(job.terms) else 1
    return int(min(300, 20 + 0.15 * 2 * job.steps + 0.4 * job.intervention_steps * refinement))


# ------------------------------------------------------------------------------------------ run view


@dataclass(frozen=True)
class RunView:
    summary: str  # Markdown
    grid: object  # PIL image: heatmaps, vanilla row and guided row
    overlaps: list[list]  # the overlap table
    loss_plot: object  # PIL image
    n_steps: int


def display_words(analysis: Analysis, limit: int = 12):
    """The words that get a heatmap cell: punctuation never; past ``limit`` words, only nouns and bound words."""
    words = [w for w in analysis.words if w.token_indices and any(c.isalnum() for c in w.text)]
    if len(words) <= limit:
        return words
    keep = {w.start for w in analysis.nouns} | {x.start for b in analysis.bindings for x in (b.noun, *b.modifiers)}
    return [w for w in words if w.start in keep][:limit]


def run_view(result, step: int | None = None, opacity: float = DEFAULT_OPACITY) -> RunView:
    """Everything shown below the images for one run, at denoising ``step`` (1-based; None = the last)."""
    from binding.metrics import binding_overlaps
    from binding.render import heatmap_grid, loss_plot

    n_steps = 0 if result.vanilla_maps is None else len(result.vanilla_maps)
    step = n_steps if step is None else max(1, min(int(step), n_steps))
    analysis = analyze(result.prompt)
    rows, overlaps = [], []
    if n_steps:
        maps = {run: result.maps(run)[step - 1].astype("float32") for run in ("vanilla", "guided")}
        for run in ("vanilla", "guided"):
            rows.append((run, result.image(run) or _blank(), maps[run]))
        vanilla = binding_overlaps(maps["vanilla"], result.bindings, result.subjects)
        guided = binding_overlaps(maps["guided"], result.bindings, result.subjects)
        for v, g in zip(vanilla, guided):
            overlaps.append([f"{v.modifier} → {v.noun}", v.other_noun or "–", round(v.own, 3),
                             round(v.other, 3) if v.other_noun else "–", round(g.own, 3),
                             round(g.other, 3) if g.other_noun else "–"])
    grid = heatmap_grid(rows, display_words(analysis), opacity=opacity) if rows else _blank()
    return RunView(run_summary(result, step, n_steps), grid, overlaps, loss_plot(plot_losses(result.losses)), n_steps)


def plot_losses(losses: dict) -> dict:
    """The guided run's terms and the same terms measured on the vanilla run (dashed), per step."""
    out = {}
    for run in ("guided", "vanilla"):
        for term, values in (losses.get(run) or {}).items():
            if term in DIAGNOSTICS:
                continue
            out[f"{run}: {term}"] = values
    return out


def run_summary(result, step: int, n_steps: int) -> str:
    s = result.settings
    terms = ", ".join(s.get("terms") or []) or "none (guided = vanilla)"
    timing = result.timings or {}
    secs = " · ".join(f"{run} {t.get('total_s', 0):.1f} s" for run, t in timing.items())
    lines = [
        f"**seed {result.seed}** · model `{_md_escape(s.get('model'))}` · method **{_md_escape(s.get('method'))}** · "
        f"terms: {_md_escape(terms)} · {s.get('steps')} steps, guided for the first {s.get('intervention_steps')} · "
        f"step size {s.get('step_size')} · guidance scale {s.get('guidance_scale')} · maps {result.grid[0]}×{result.grid[1]}"
        + (f" · {secs}" if secs else ""),
    ]
    if result.bindings:
        lines.append("pairs guided: " + binding_legend(result.bindings))
    if str(s.get("model")) == "shapes":  # the scorer judges the teaching model's pictures exactly
        for run in ("vanilla", "guided"):
            image = result.image(run)
            verdict = shapes_verdict(image, result.prompt) if image is not None else None
            if verdict:
                lines.append(f"**scorer, {run}:** {_md_escape(verdict)}")
    lines += [f"- {_md_escape(n)}" for n in result.notes]
    if n_steps:
        lines.append(f"*Heatmaps and overlaps at step {step} of {n_steps}; each cell is scaled on its own.*")
    return "\n\n".join(lines)


def shapes_verdict(image, prompt: str) -> str | None:
    """What the shapes scorer reads in a picture and whether every object has its own colour, in words; None
    for a prompt outside the shapes world's grammar (the scorer cannot judge it)."""
    from binding.shapes.scorer import score_image
    from binding.shapes.world import parse_caption

    try:
        objects = parse_caption(prompt)
    except ValueError:
        return None
    s = score_image(image, objects)
    seen = ", ".join(f"{d['colour']} {d['shape']}" for d in s["detections"]) or "nothing"
    if s["bound_all"]:
        verdict = "every object in its own colour ✓"
    else:
        problems = []
        for (colour, shape), present, bound, leaked in zip(objects, s["present"], s["bound"], s["leaked"]):
            if bound:
                continue
            if leaked:
                problems.append(f"the {shape} took another object's colour (leak)")
            elif present:
                problems.append(f"the {shape} is not {colour}")
            else:
                problems.append(f"no {shape}")
        verdict = "; ".join(problems) + " ✗"
    return f"sees {seen} → {verdict}"


def _blank():
    from PIL import Image

    return Image.new("RGB", (64, 64), "white")


def downloads(result, folder: str) -> list[str]:
    """Both images as PNG and the run record as one .zip (``binding.records.load_run`` reads it back)."""
    import os

    from binding.records import save_run_archive

    paths = []
    for run in ("vanilla", "guided"):
        image = result.image(run)
        if image is not None:
            path = os.path.join(folder, f"{run}-seed{result.seed}.png")
            image.save(path, format="PNG")
            paths.append(path)
    paths.append(str(save_run_archive(result, os.path.join(folder, f"run-seed{result.seed}.zip"))))
    return paths
