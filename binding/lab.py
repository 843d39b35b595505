"""What the app shows, as plain functions: prompt views, edited pairs, run views.

The Gradio layer (app.py) only wires components to these functions, so everything a visitor sees can be
produced and tested without a browser. All text that comes from a visitor is escaped here.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from binding.analysis import (
    Analysis,
    Binding,
    PromptError,
    analyze,
    bindings_from_pairs,
    pairs_from_bindings,
    resolve_word,
)
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


def edited_bindings(analysis: Analysis, rows) -> tuple[list[Binding], list[str], list[str]]:
    """Bindings from the edited table, one message per unusable row, and notes (rows merged onto one noun).

    Only an explicit untick switches a row off: a row added through the table's menu has no tick yet and is used.
    """
    used = []
    index = []
    for r, row in enumerate(_table_rows(rows)):
        use, mods, noun = (list(row) + [None, "", ""])[:3]
        if use is None or (isinstance(use, str) and not use.strip()) or _truthy(use):
            used.append((mods or "", noun or ""))
            index.append(r)
    bindings, problems = bindings_from_pairs(analysis, used)
    bad = {p.row for p in problems}
    per_noun: dict[int, list[int]] = {}
    for k, (mods, noun) in enumerate(used):
        if k in bad or not str(noun or "").strip() or not str(mods or "").strip():
            continue
        per_noun.setdefault(resolve_word(analysis, str(noun)).start, []).append(index[k] + 1)
    notes = []
    for b in bindings:
        rows_of = per_noun.get(b.noun.start, [])
        if len(rows_of) > 1:
            notes.append(f"rows {', '.join(map(str, rows_of))} all bind '{b.noun.text}': their modifiers are merged "
                         f"({', '.join(m.text for m in b.modifiers)})")
    return bindings, [f"row {index[p.row] + 1}: {p.message}" for p in problems], notes


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


PRESETS_ENV = "BINDING_PRESETS"  # a Space's setting: the presets a visitor may pick, comma-separated


def allowed_models() -> list[str]:
    """The presets a visitor may pick: ``$BINDING_PRESETS`` if set; else every app preset, except that on a
    Space without a GPU (``SPACE_ID`` set, no CUDA, no ZeroGPU) only the offline ones (no multi-GB download on
    a click, no SD on a CPU)."""
    import os

    import torch

    from binding.models import PRESETS

    offered = [n for n, p in PRESETS.items() if p.in_app]
    chosen = [n.strip().lower() for n in os.environ.get(PRESETS_ENV, "").split(",") if n.strip()]
    if chosen:
        unknown = [n for n in chosen if n not in offered]
        if unknown:
            raise ValueError(f"{PRESETS_ENV} names unknown presets {', '.join(unknown)}; choose from {', '.join(offered)}")
        return chosen
    on_gpu = torch.cuda.is_available() or os.environ.get("SPACES_ZERO_GPU")
    if os.environ.get("SPACE_ID") and not on_gpu:
        return [n for n in offered if PRESETS[n].offline]
    return offered


def hub_notice(model: str) -> str | None:
    """Why a hub model would be slow or fail here, said before anyone clicks: not downloaded on an offline
    machine, or no GPU. None when it should just work."""
    import os

    import torch

    from binding.models import preset

    p = preset(model)
    if p is None or p.offline:
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(p.repo, "model_index.json"), str)
    except Exception:  # no hub library or a broken cache: say nothing we cannot know
        cached = True
    if not cached and offline:
        return (f"{p.name} ({p.repo}) is not downloaded on this machine and the machine is offline, so it cannot "
                "load. Choose shapes, or download it where there is a network.")
    if not torch.cuda.is_available():
        return (f"No GPU here: {p.name} runs on the CPU at minutes per image"
                + ("" if cached else f", after a download of several GB from {p.repo}") + ".")
    if not cached:
        return f"The first run downloads {p.name} ({p.repo}, several GB) before it starts."
    return None


def model_banner(model: str) -> str:
    from binding.models import PRESETS, describe, preset
    from binding.shapes.world import COLOURS, SHAPES

    p = preset(model)
    allowed = allowed_models()
    limits = ""
    if len(allowed) < sum(q.in_app for q in PRESETS.values()):
        limits = f" This server offers {', '.join(allowed)}."
    if p is not None and p.builder == "shapes":
        body = (
            f"Running <b>offline</b> on <b>shapes</b>: {html.escape(p.description)}. It knows {len(COLOURS)} colours "
            f"({', '.join(COLOURS)}) and {len(SHAPES)} shapes ({', '.join(SHAPES)}), in prompts like "
            "<i>a blue square and a yellow triangle</i>; every picture is read back by an exact scorer."
        )
    elif p is not None and p.offline:
        body = (
            f"Running <b>offline</b> on <b>{html.escape(p.name)}</b>: {html.escape(p.description)}. Its pictures are "
            "not meant to look like anything; the parse, the attention maps, the losses and the guidance are real."
        )
    else:
        body = f"Model: {html.escape(describe(model))}."
        notice = hub_notice(model)
        if notice:
            body += f' <span class="warn">{html.escape(notice)}</span>'
    return f'<div class="banner">{body}{html.escape(limits)}</div>'


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

        from binding.settings import Settings

        warnings: list[str] = []
        prompt = (prompt or "").strip()
        if not prompt:
            raise ValueError("The prompt is empty: type what the image should show.")
        allowed = allowed_models()
        if model not in allowed:
            raise ValueError(f"Model {model!r} is not offered here: choose one of {', '.join(allowed)}.")
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
        analysis = analyze(prompt)
        bindings, problems, _ = edited_bindings(analysis, rows)
        if problems:
            raise ValueError("Some pairs cannot be used; fix or switch them off: " + "; ".join(problems))
        binding_terms = {"syngen_positive", "syngen_negative", "db_binding"}
        if binding_terms & set(terms) and not bindings:
            warnings.append("No modifier → noun pair is switched on, so the binding terms have nothing to bind.")
        if not terms:
            warnings.append("No loss term is ticked: the guided run is the vanilla run.")
        elif ("ae_excite" in terms or "db_attendance" in terms) and not analysis.nouns and not bindings:
            warnings.append("The prompt has no noun for Attend-and-Excite / Divide & Bind to excite.")
        return cls(prompt, analysis, bindings, model, key, list(checked.terms), checked.steps,
                   checked.intervention_steps, checked.step_size, checked.guidance_scale, checked.seed, warnings)

    def job(self, methods: list[str] | None = None):
        """The picklable job (``binding.serving.Job``): vanilla and this request's method, or ``methods`` (every
        one from this seed; the hand-set step size applies to this request's method only)."""
        from binding.serving import Job

        if methods is None:
            return Job(self.prompt, self.model, ("vanilla", self.method), tuple(self.bindings),
                       tuple(self.terms) if self.method == "custom" else None, self.steps, self.intervention_steps,
                       self.step_size, self.guidance_scale, self.seed)
        return Job(self.prompt, self.model, tuple(dict.fromkeys(["vanilla", *methods])), tuple(self.bindings), None,
                   self.steps, None, None, self.guidance_scale, self.seed)


def pair_result(results: dict, method: str):
    """One ``RunResult`` holding vanilla and ``method`` from a job's per-method results (same seed)."""
    import dataclasses

    v, g = results["vanilla"], results[method]
    return dataclasses.replace(
        g, vanilla_image=v.vanilla_image, vanilla_maps=v.vanilla_maps, vanilla_latents=v.vanilla_latents,
        vanilla_layer_maps=v.vanilla_layer_maps, vanilla_previews=v.vanilla_previews,
        losses={**g.losses, "vanilla": v.losses.get("vanilla", {})},
        timings={**v.timings, **g.timings}, counters={**v.counters, **g.counters},
    )


def swap_word(prompt: str, old: str, new: str) -> str:
    """The prompt with one word replaced (``old`` as in the pairs table: ``dog``, ``dog#2``, ``@12``), for a
    counterfactual run from the same seed (DAAM's "new adjective"). ValueError naming the problem."""
    from binding.analysis import resolve_word

    new = " ".join((new or "").split())
    if not new:
        raise ValueError("Give the word to put in (e.g. green).")
    word = resolve_word(analyze(prompt), old or "")
    return prompt[: word.start] + new + prompt[word.end :]


# ------------------------------------------------------------------------------------------ run view


@dataclass(frozen=True)
class RunView:
    summary: str  # Markdown
    grid: object  # PIL image: heatmaps, vanilla row and guided row
    overlaps: list[list]  # the overlap table
    loss_plot: object  # PIL image
    n_steps: int


CONTENT_POS = frozenset({"NOUN", "PROPN", "ADJ", "VERB", "NUM", "ADV", "X", "SYM"})
MAP_VIEWS = {
    "step": "that pass's maps over the picture it predicted (PNDM makes steps + 1 passes)",
    "guided steps": "maps averaged over the guided steps, over the final picture",
    "all steps": "maps averaged over every step, over the final picture",
}
MAP_SCALES = {"row": "one colour scale per row", "shared": "one colour scale for all"}


def display_words(analysis: Analysis, function_words: bool = False, limit: int = 12):
    """The words that get a heatmap cell: content words (nouns, adjectives, verbs...) and every bound word;
    with ``function_words`` also "a", "and"...; punctuation never; at most ``limit``."""
    words = [w for w in analysis.words if w.token_indices and any(c.isalnum() for c in w.text)]
    bound = {x.start for b in analysis.bindings for x in (b.noun, *b.modifiers)} | {w.start for w in analysis.nouns}
    if not function_words:
        pos = {t.idx: t.pos_ for t in analysis.doc} if analysis.doc is not None else {}
        words = [w for w in words if w.start in bound or pos.get(w.start, "X") in CONTENT_POS]
    if len(words) > limit:
        words = [w for w in words if w.start in bound][:limit] or words[:limit]
    return words


@dataclass(frozen=True)
class MapsView:
    image: object  # PIL image: a row per run, a column per word, colour bar
    caption: str  # Markdown: what the picture shows
    n_steps: int


def _layer_subset(result, run: str, layers, steps: slice):
    """(steps, H, W, T) maps of ``run``: every read layer (head-weighted), or the mean of the chosen ones."""
    names = list(result.settings.get("read_layers") or [])
    chosen = [n for n in (layers or []) if n in names]
    lm = result.layer_maps(run)
    if not chosen or len(chosen) == len(names) or lm is None:
        return result.maps(run)[steps].astype("float32"), "every read layer"
    idx = [names.index(n) for n in chosen]
    return lm[steps][:, idx].astype("float32").mean(1), f"{len(idx)} of {len(names)} read layers"


def short_layer(name: str) -> str:
    """``up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor`` -> ``up 1.2``."""
    parts = name.split(".")
    if parts[0] == "mid_block":
        return f"mid {parts[2] if len(parts) > 2 else 0}"
    return f"{parts[0].split('_')[0]} {parts[1]}.{parts[3] if len(parts) > 3 else 0}"


def maps_view(result, step: int | None = None, view: str = "step", scale: str = "row", mask: bool = False,
              function_words: bool = False, layers=None, opacity: float = DEFAULT_OPACITY, cell: int = 160) -> MapsView:
    """Cross-attention of each word as evidence: for both runs, on a comparable colour scale (see ``MAP_VIEWS``).

    ``step`` is 1-based (None: the last); ``layers``: read-layer names to average (None: all).
    """
    from binding.render import evidence_grid, latent_previews

    if view not in MAP_VIEWS:
        raise ValueError(f"view must be one of {', '.join(MAP_VIEWS)}, not {view!r}")
    n_steps = 0 if result.vanilla_maps is None else len(result.vanilla_maps)
    if not n_steps:
        return MapsView(_blank(), "No attention maps were recorded for this run.", 0)
    step = n_steps if step is None else max(1, min(int(step), n_steps))
    guided_n = max(1, min(int(result.settings.get("intervention_steps") or n_steps), n_steps))
    span = {"step": slice(step - 1, step), "guided steps": slice(0, guided_n), "all steps": slice(0, n_steps)}[view]
    rows, used = [], ""
    for run in ("vanilla", "guided"):
        maps, used = _layer_subset(result, run, layers, span)
        picture = result.image(run) or _blank()
        previews = result.previews(run)
        latents = result.vanilla_latents if run == "vanilla" else result.guided_latents
        if view == "step" and previews is not None and latents is not None and result.image(run) is not None:
            picture = latent_previews(previews[step - 1 : step], latents, picture)[0]
        rows.append((run, picture, maps.mean(0)))
    analysis = analyze(result.prompt)
    image = evidence_grid(rows, display_words(analysis, function_words), scale=scale, mask=mask, opacity=opacity,
                          cell=cell)
    what = f"pass {step} of {n_steps}" if view == "step" else (
        f"the {guided_n} guided steps" if view == "guided steps" else f"all {n_steps} steps")
    shown = "where each map exceeds half its own peak" if mask else MAP_SCALES[scale]
    caption = (f"*{what.capitalize()}: {MAP_VIEWS[view]}; {used}; {shown}. Brighter = more of that word's attention "
               "probability at that place.*")
    return MapsView(image, caption, n_steps)


def maps_animation(result, path: str, frame_ms: int = 250, **view) -> str:
    """Every step's maps as an animated GIF (``maps_view``'s options; view is "step")."""
    n = 0 if result.vanilla_maps is None else len(result.vanilla_maps)
    if not n:
        raise ValueError("this run recorded no attention maps to animate")
    view = {**view, "view": "step", "cell": view.get("cell", 112)}
    frames = [maps_view(result, k, **view).image.convert("P", palette=1, colors=255) for k in range(1, n + 1)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0, optimize=True)
    return path


def run_view(result, step: int | None = None, opacity: float = DEFAULT_OPACITY) -> RunView:
    """Everything shown below the images for one run, at denoising ``step`` (1-based; None = the last)."""
    from binding.metrics import binding_overlaps
    from binding.render import loss_plot

    n_steps = 0 if result.vanilla_maps is None else len(result.vanilla_maps)
    step = n_steps if step is None else max(1, min(int(step), n_steps))
    overlaps = []
    if n_steps:
        maps = {run: result.maps(run)[step - 1].astype("float32") for run in ("vanilla", "guided")}
        vanilla = binding_overlaps(maps["vanilla"], result.bindings, result.subjects)
        guided = binding_overlaps(maps["guided"], result.bindings, result.subjects)
        for v, g in zip(vanilla, guided):
            overlaps.append([f"{v.modifier} → {v.noun}", v.other_noun or "–", round(v.own, 3),
                             round(v.other, 3) if v.other_noun else "–", round(g.own, 3),
                             round(g.other, 3) if g.other_noun else "–"])
    grid = maps_view(result, step, opacity=opacity).image
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
    rate = fix_rate_line(result)
    if rate:
        lines.append(md(rate))
    return "\n\n".join(lines)


def shapes_verdict(image, prompt: str, s: dict | None = None) -> str | None:
    """What the shapes scorer reads in a picture and whether every object has its own colour, in words; None
    for a prompt outside the shapes world's grammar (the scorer cannot judge it)."""
    from binding.shapes.scorer import score_image
    from binding.shapes.world import parse_caption

    try:
        objects = parse_caption(prompt)
    except ValueError:
        return None
    s = s if s is not None else score_image(image, objects)
    seen = ", ".join("unclear" if d["unclear"] or d["shape"] == "other" else f"{d['colour']} {d['shape']}"
                     for d in s["detections"]) or "nothing"
    if s["bound_all"]:
        verdict = "every object in its own colour ✓"
    else:
        says = {"leak": "took another object's colour (leak)", "unclear": "is unclear (two colours or no clear shape)"}
        problems = []
        for (colour, shape), state in zip(objects, s["states"]):
            if state == "bound":
                continue
            if state == "missing":
                problems.append(f"no {shape}")
            elif state == "wrong":
                problems.append(f"the {shape} is not {colour}")
            else:
                problems.append(f"the {shape} {says[state]}")
        verdict = "; ".join(problems) + (" ?" if all(st in ("bound", "unclear") for st in s["states"]) else " ✗")
    return f"sees {seen} → {verdict}"


def scorer_reading(image, prompt: str):
    """(verdict text, detections) of the shapes scorer on a picture; (None, []) outside the world's grammar."""
    from binding.shapes.scorer import score_image
    from binding.shapes.world import parse_caption

    try:
        objects = parse_caption(prompt)
    except ValueError:
        return None, []
    s = score_image(image, objects)
    return shapes_verdict(image, prompt, s), s["detections"]


def verdict_picture(image, prompt: str, size: int = 256):
    """The picture upscaled with the scorer's detections drawn on it (outline and label), so a class can check
    the verdict against what it sees; the picture as it is outside the shapes world."""
    from PIL import ImageDraw

    from binding.render import _font, display_image

    big = display_image(image, size)
    verdict, dets = scorer_reading(image, prompt)
    if verdict is None:
        return big
    big = big.convert("RGB")
    k = big.width / image.width
    draw = ImageDraw.Draw(big)
    font = _font(max(11, int(11 * k / 4)))
    for d in dets:
        x0, y0, x1, y1 = (int(v * k) for v in d["box"])
        unclear = d["shape"] == "other" or d.get("unclear")
        colour = "#777777" if unclear else "#111111"
        draw.rectangle([x0 - 2, y0 - 2, x1 + 1, y1 + 1], outline=colour, width=2)
        label = "unclear" if unclear else f"{d['colour']} {d['shape']}"
        ty = y0 - 16 if y0 >= 16 else y1 + 2
        w = draw.textlength(label, font=font)
        draw.rectangle([x0 - 2, ty, x0 + w + 4, ty + 14], fill="white")
        draw.text((x0 + 1, ty), label, fill=colour, font=font)
    return big


def compare_view(results: dict, prompt: str, cell: int = 192):
    """The compare-all row: one column per method from the same seed, each picture with the scorer's reading
    drawn on it and its verdict under it; and a table of the numbers (verdict, pair overlaps)."""
    from PIL import Image, ImageDraw

    from binding.metrics import binding_overlaps
    from binding.render import _fit, _font

    methods = list(results)
    head, foot, pad = 28, 46, 8
    canvas = Image.new("RGB", (len(methods) * (cell + pad) + pad, head + cell + foot), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(15), _font(12)
    rows = []
    for k, method in enumerate(methods):
        r = results[method]
        side = "vanilla" if method == "vanilla" else "guided"
        image = r.image(side)
        x = pad + k * (cell + pad)
        label = METHODS[method].label if method in METHODS else method
        draw.text((x, 6), _fit(draw, label, font, cell), fill="black", font=font)
        if image is not None:
            canvas.paste(verdict_picture(image, prompt, cell).resize((cell, cell)), (x, head))
        verdict, _ = scorer_reading(image, prompt) if image is not None else (None, [])
        short = (verdict or "").split("→")[-1].strip()
        lines, line = [], ""
        for word in short.split():
            if draw.textlength(line + " " + word, font=small) > cell:
                lines.append(line)
                line = word
            else:
                line = (line + " " + word).strip()
        lines.append(line)
        for j, text in enumerate(lines[:3]):
            draw.text((x, head + cell + 4 + 14 * j), text, fill="#1a7f37" if "✓" in short else "#b42318", font=small)
        maps = r.final_maps(side)
        pairs = binding_overlaps(maps.astype("float32"), r.bindings, r.subjects) if maps is not None else []
        own = sum(p.own for p in pairs) / len(pairs) if pairs else None
        other = [p.other for p in pairs if p.other_noun]
        rows.append([label, short or "–", "–" if own is None else round(own, 3),
                     round(sum(other) / len(other), 3) if other else "–"])
    return canvas, rows


def side_by_side(result, size: int = 512):
    """Vanilla and guided next to each other, upscaled, labelled: one picture for a slide."""
    from PIL import Image, ImageDraw

    from binding.render import _font, display_image

    pics = [display_image(result.image(r), size).resize((size, size)) for r in ("vanilla", "guided")]
    canvas = Image.new("RGB", (2 * size + 24, size + 40), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (label, pic) in enumerate(zip(("vanilla", result.settings.get("method", "guided")), pics)):
        canvas.paste(pic, (8 + k * (size + 8), 32))
        draw.text((8 + k * (size + 8), 6), f"{label} · seed {result.seed}", fill="black", font=_font(18))
    return canvas


def n_steps(result) -> int:
    return 0 if result.vanilla_maps is None else len(result.vanilla_maps)


def layer_choices(names) -> list[str]:
    """The read layers as a visitor sees them ("up 1.2"), in the order of ``names``."""
    return [short_layer(n) for n in names]

COMPARED = ("syngen", "divide-bind", "attend-excite")  # what "compare all" runs beside vanilla
COMPARE_HEADERS = ["method", "scorer", "modifier on its noun", "on the other noun"]


def compare_methods(model: str) -> list[str]:
    """The methods "compare all" runs from one seed (the three papers' presets)."""
    return list(COMPARED)


def md(text) -> str:
    return _md_escape(text)


def html_text(text) -> str:
    return html.escape(str(text))


# ---------------------------------------------------------------------------- measured examples, lesson


def _shapes_table() -> dict:
    """The teaching model's measured examples (``assets/shapes/examples.json``, written by
    ``python -m binding teach examples``): for each held-out prompt, how often over 8 seeds each method fixes a
    vanilla leak, and a telling seed."""
    import json

    from binding.shapes.model import SHAPES_DIR

    path = SHAPES_DIR / "examples.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def example_seed(model: str, prompt: str) -> int:
    """A seed that shows the effect for a measured example prompt (0 when none was measured)."""
    from binding.models import preset

    p = preset(model)
    if p is None or p.builder != "shapes":
        return 0
    entry = _shapes_table().get("prompts", {}).get((prompt or "").strip())
    return int(entry["seed"]) if entry and entry.get("seed") is not None else 0


def fix_rate_line(result) -> str | None:
    """How often, over the measured seeds, the method fixes this prompt's leak on the teaching model."""
    if str(result.settings.get("model")) != "shapes":
        return None
    entry = _shapes_table().get("prompts", {}).get(result.prompt.strip())
    method = result.settings.get("method")
    if not entry or method not in entry.get("fixed", {}):
        return None
    fixed, leaks, n = entry["fixed"][method], entry["vanilla_unbound"], entry["seeds"]
    label = METHODS[method].label if method in METHODS else method
    return (f"Measured on this prompt: vanilla misses or leaks on {leaks} of {n} seeds; {label} fixes {fixed} of "
            f"those (at this model's default settings).")


LESSON_TITLES = ("1 · The leak", "2 · Why it happens", "3 · The fix")


@dataclass(frozen=True)
class LessonStep:
    text: str
    prompt: str
    seed: int
    image: object


_LESSON_CACHE: dict = {}


def lesson_step(k: int, model: str, run=None) -> LessonStep:
    """Step ``k`` of the lesson on the teaching model: its words, example, seed and picture; the runs are made
    once per process and reused (a class sees them at once)."""
    from binding.models import preset

    table = _shapes_table().get("lesson") or {}
    prompt = table.get("prompt", "a blue square and a yellow triangle")
    seed = int(table.get("seed", 0))
    method = table.get("method", "syngen")
    lesson_model = "shapes" if "shapes" in allowed_models() else model
    key = (lesson_model, prompt, seed, method)
    if key not in _LESSON_CACHE:
        from binding.serving import Job, run_job

        job = Job(prompt, lesson_model, ("vanilla", method), steps=0, seed=seed)
        job = _with_defaults(job, lesson_model, method)
        results = {e.method: e.result for e in (run or run_job)(job) if e.kind == "result"}
        _LESSON_CACHE[key] = pair_result(results, method)
    r = _LESSON_CACHE[key]
    colour, noun = _first_pair(r)
    note = "" if preset(model) is not None and preset(model).builder == "shapes" else (
        " (on the teaching model: it draws in seconds and its pictures can be checked exactly)")
    label = METHODS[method].label
    if k == 0:
        verdict = shapes_verdict(r.vanilla_image, prompt) or ""
        text = (f"**The leak.** The prompt asks for *{md(prompt)}*. The model draws it from seed {seed}{note}: look "
                f"at the colours. The scorer reads: {md(verdict)}. Colours went to the wrong object, or one colour "
                "took over the scene: that is attribute leakage.")
        image = side_by_side_single(r.vanilla_image, prompt, "vanilla")
    elif k == 1:
        text = (f"**Why.** Each word has a cross-attention map: where in the picture the model reads that word. "
                f"Here, the map of *{md(colour)}* does not stay on the {md(noun)}: it spreads over the other object "
                "too, and what a word's map covers is where its meaning lands.")
        image = maps_view(r, view="guided steps", scale="shared").image
    else:
        verdict = shapes_verdict(r.guided_image, prompt) or ""
        text = (f"**The fix.** Same seed, same model, guided by {label}: while drawing, it nudges the picture so "
                f"that each colour word's map sits on its own noun's. The map moves, and the colour moves with it. "
                f"The scorer now reads: {md(verdict)}.")
        image = side_by_side(r, 256)
    return LessonStep(text, prompt, seed, image)


def _with_defaults(job, model: str, method: str):
    import dataclasses

    from binding.settings import defaults_for

    d = defaults_for(model, method)
    return dataclasses.replace(job, steps=d["steps"], intervention_steps=d["intervention_steps"],
                               step_size=d["step_size"], guidance_scale=d["guidance_scale"])


def _first_pair(result) -> tuple[str, str]:
    if result.bindings:
        b = result.bindings[0]
        return " ".join(m.text for m in b.modifiers), b.noun.text
    return "the colour word", "its noun"


def side_by_side_single(image, prompt: str, label: str, size: int = 320):
    from PIL import Image, ImageDraw

    from binding.render import _font

    pic = verdict_picture(image, prompt, size).resize((size, size))
    canvas = Image.new("RGB", (size + 16, size + 36), "white")
    canvas.paste(pic, (8, 30))
    ImageDraw.Draw(canvas).text((8, 6), label, fill="black", font=_font(18))
    return canvas


def _blank():
    from PIL import Image

    return Image.new("RGB", (64, 64), "white")


def downloads(result, folder: str) -> list[str]:
    """Slide-ready PNGs (each image upscaled to 512 px, and both side by side) and the run record as one .zip
    (``binding.records.load_run`` reads it back)."""
    import os

    from binding.records import save_run_archive
    from binding.render import display_image

    paths = []
    for run in ("vanilla", "guided"):
        image = result.image(run)
        if image is not None:
            path = os.path.join(folder, f"{run}-seed{result.seed}.png")
            display_image(image, 512).save(path, format="PNG")
            paths.append(path)
    if result.vanilla_image is not None and result.guided_image is not None:
        path = os.path.join(folder, f"side-by-side-seed{result.seed}.png")
        side_by_side(result).save(path, format="PNG")
        paths.append(path)
    paths.append(str(save_run_archive(result, os.path.join(folder, f"run-seed{result.seed}.zip"))))
    return paths
