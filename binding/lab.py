"""What the app shows before anything runs, as plain functions: the prompt's views, the edited pairs, the
methods and settings offered, the presets this server offers, and a visitor's checked request.

The Gradio layer (app.py) only wires components to these functions (and to ``binding.views`` for a run,
``binding.lesson`` for the lesson), so everything a visitor sees can be produced and tested without a browser.
All text that comes from a visitor is escaped here.
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
from binding.methods import METHODS, TERMS, method_names
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


LIVE_PARSE_PATH = "/binding/parse"  # the app's JSON route for the page's live parse (app.live_parse)


def prompt_payload(prompt: str) -> dict:
    """``prompt_view`` as JSON for the page's live parse (``LIVE_PARSE_PATH``): each value in the form its
    component takes in the browser (the pairs as a Dataframe's ``{headers, data}``)."""
    view = prompt_view(prompt)
    return {"parse_html": view.parse_html, "pairs": {"headers": PAIR_HEADERS, "data": view.rows, "metadata": None},
            "tokens_html": view.tokens_html, "notice": view.notice, "analysis": view.analysis.to_dict()}


STALE_NOTICE = ('<div class="stale">The pictures below are for <b>{prompt}</b>; press Generate for the new prompt.'
                "</div>")  # {prompt}: the generated prompt, HTML-escaped


def stale_notice(shown: str | None, prompt: str | None) -> str:
    """Said while the pictures on the page are for another prompt than the one typed."""
    if not shown or shown.strip() == (prompt or "").strip():
        return ""
    return STALE_NOTICE.replace("{prompt}", html_text(shown.strip()))


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
    """The example prompts that suit a model: on the teaching model the measured ones (the prompts its lesson
    method fixes most often, ``assets/shapes/examples.json``), else the preset's."""
    from binding.models import preset

    p = preset(model)
    if p is None:
        return []
    measured = shapes_table().get("examples") if p.builder == "shapes" else None
    return list(measured or p.examples)


PRESETS_ENV = "BINDING_PRESETS"  # a Space's setting: the presets a visitor may pick, comma-separated


def allowed_models() -> list[str]:
    """The presets a visitor may pick: ``$BINDING_PRESETS`` if set; else every app preset, except that on a
    Space without a GPU (``SPACE_ID`` set, no CUDA, no ZeroGPU) only the offline ones (no multi-GB download on
    a click, no SD on a CPU). A preset that needs a GPU (SDXL) is offered only where there is one."""
    import os

    import torch

    from binding.models import PRESETS

    on_gpu = torch.cuda.is_available() or bool(os.environ.get("SPACES_ZERO_GPU"))
    offered = [n for n, p in PRESETS.items() if p.in_app and (on_gpu or not p.gpu_only)]
    chosen = [n.strip().lower() for n in os.environ.get(PRESETS_ENV, "").split(",") if n.strip()]
    if chosen:
        unknown = [n for n in chosen if n not in offered]
        if unknown:
            gpu = [n for n in unknown if n in PRESETS and PRESETS[n].gpu_only]
            why = f" ({', '.join(gpu)} need(s) a GPU, and there is none)" if gpu else ""
            raise ValueError(f"{PRESETS_ENV} names presets this server cannot offer: {', '.join(unknown)}{why}; "
                             f"choose from {', '.join(offered)}")
        return chosen
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


# ---------------------------------------------------------------------- measured examples (shapes)


def shapes_table() -> dict:
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
    entry = shapes_table().get("prompts", {}).get((prompt or "").strip())
    return int(entry["seed"]) if entry and entry.get("seed") is not None else 0


def fix_rate_line(result) -> str | None:
    """How often, over the measured seeds, the method fixes this prompt's leak on the teaching model."""
    if str(result.settings.get("model")) != "shapes":
        return None
    entry = shapes_table().get("prompts", {}).get(result.prompt.strip())
    method = result.settings.get("method")
    if not entry or method not in entry.get("fixed", {}):
        return None
    fixed, leaks, n = entry["fixed"][method], entry["vanilla_unbound"], entry["seeds"]
    label = METHODS[method].label if method in METHODS else method
    return (f"Measured on this prompt: vanilla misses or leaks on {leaks} of {n} seeds; {label} fixes {fixed} of "
            f"those (at this model's default settings).")


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


def md(text) -> str:
    return _md_escape(text)


def html_text(text) -> str:
    return html.escape(str(text))


