"""What the app shows of a run, as plain functions: the summary, the maps as evidence, the scorer's reading drawn
on the pictures, the compare-all row, the numbers and the downloads."""

from __future__ import annotations

from dataclasses import dataclass

from binding.analysis import Analysis, analyze
from binding.lab import _md_escape, binding_legend, fix_rate_line, md
from binding.methods import DIAGNOSTICS, METHODS

DEFAULT_OPACITY = 0.55
OVERLAP_HEADERS = ["pair", "other noun", "vanilla: own", "vanilla: other", "guided: own", "guided: other"]
OVERLAP_LABEL = ("Where each modifier's attention lies: overlap with its own noun's map vs the closest other noun's "
                 "(0 = apart, 1 = same place; at the step shown). Binding works when own goes up and other down.")


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


def guided_passes(result, n_steps: int) -> int:
    """How many of a run's ``n_steps`` recorded passes were guided (the span of the "guided steps" view)."""
    return max(1, min(int(result.settings.get("intervention_steps") or n_steps), n_steps))


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
    guided_n = guided_passes(result, n_steps)
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
