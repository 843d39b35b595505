"""The lesson for a class on the teaching model: three steps (the leak, why, the fix), each a sentence or two,
an example and a seed from the measured table (``assets/shapes/examples.json``), and its picture, computed once
per process and then shown at once."""

from __future__ import annotations

from dataclasses import dataclass

from binding.lab import allowed_models, md, pair_result, shapes_table
from binding.methods import METHODS
from binding.views import guided_passes, maps_view, shapes_verdict, side_by_side, verdict_picture

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

    measured = shapes_table()
    table = measured.get("lesson") or {}
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
        text = ("**Why.** Each word has a cross-attention map: where in the picture the model reads that word, "
                "and so where its meaning lands. " + _where_maps_lie(r, "vanilla"))
        image = maps_view(r, view="guided steps", scale="shared").image
    else:
        verdict = shapes_verdict(r.guided_image, prompt) or ""
        text = (f"**The fix.** Same seed, same model, guided by {label}: while drawing, it nudges the picture so "
                f"that each colour word's map sits on its own noun's. {_how_maps_moved(r)} The scorer now reads: "
                f"{md(verdict)}. {_measured_rate(measured, method, label)}")
        image = side_by_side(r, 256)
    return LessonStep(text, prompt, seed, image)


def _with_defaults(job, model: str, method: str):
    import dataclasses

    from binding.settings import defaults_for

    d = defaults_for(model, method)
    return dataclasses.replace(job, steps=d["steps"], intervention_steps=d["intervention_steps"],
                               step_size=d["step_size"], guidance_scale=d["guidance_scale"])


def _guided_span_overlaps(result, run: str):
    """Each pair's overlaps on ``run``'s maps averaged over the guided steps (what step 2's picture shows)."""
    from binding.metrics import binding_overlaps

    maps = result.maps(run)
    if maps is None or not len(maps) or not result.bindings:
        return []
    n = guided_passes(result, len(maps))
    return binding_overlaps(maps[:n].mean(0).astype("float32"), result.bindings, result.subjects)


def _worst(overlaps):
    """The pair whose modifier sits least on its own noun relative to the other (the telling one)."""
    return min(overlaps, key=lambda o: o.margin) if overlaps else None


def _where_maps_lie(result, run: str) -> str:
    """Step 2's sentence from the run's own maps: where the least well-placed modifier's map lies."""
    o = _worst(_guided_span_overlaps(result, run))
    if o is None or not o.other_noun:
        return "Open the Maps tab to see where each word lies."
    where = (f"Here the map of *{md(o.modifier)}* lies on the {md(o.other_noun)} (overlap {o.other:.2f}) more than "
             f"on its own {md(o.noun)} ({o.own:.2f}), so the {md(o.other_noun)} gets its colour."
             if o.other > o.own else
             f"Here the map of *{md(o.modifier)}* already lies mostly on its own {md(o.noun)} (overlap {o.own:.2f}, "
             f"{o.other:.2f} on the {md(o.other_noun)}): in this picture the maps alone do not explain the mistake, "
             "which happens too.")
    return where + " (Overlap: 1 = the same place, 0 = apart; the mean over the guided steps.)"


def _how_maps_moved(result) -> str:
    """Step 3's sentence: how the telling modifier's overlaps changed from vanilla to guided."""
    pairs = list(zip(_guided_span_overlaps(result, "vanilla"), _guided_span_overlaps(result, "guided")))  # same bindings
    if not pairs:
        return ""
    o, g = min(pairs, key=lambda p: p[0].margin)  # the pair _where_maps_lie tells of
    if not o.other_noun:
        return ""
    return (f"The map of *{md(o.modifier)}* now overlaps its {md(o.noun)} {g.own:.2f} (was {o.own:.2f}) and the "
            f"{md(g.other_noun)} {g.other:.2f} (was {o.other:.2f}).")


def _measured_rate(table: dict, method: str, label: str) -> str:
    """How often the method fixed the held-out pictures vanilla got wrong, summed from the measured table."""
    prompts = [e for e in (table.get("prompts") or {}).values() if method in e.get("fixed", {})]
    wrong = sum(int(e["vanilla_unbound"]) for e in prompts)
    if not prompts or not wrong:
        return ""
    fixed = sum(int(e["fixed"][method]) for e in prompts)
    seeds = max(int(e["seeds"]) for e in prompts)
    return (f"Not every time: over the {len(prompts)} held-out prompts x {seeds} seeds, {label} fixed {fixed} of the "
            f"{wrong} pictures vanilla got wrong.")


def side_by_side_single(image, prompt: str, label: str, size: int = 320):
    from PIL import Image, ImageDraw

    from binding.render import _font

    pic = verdict_picture(image, prompt, size).resize((size, size))
    canvas = Image.new("RGB", (size + 16, size + 36), "white")
    canvas.paste(pic, (8, 30))
    ImageDraw.Draw(canvas).text((8, 6), label, fill="black", font=_font(18))
    return canvas


