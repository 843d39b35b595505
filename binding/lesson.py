"""The lesson for a class on the teaching model: three steps (the leak, why, the fix), each a sentence or two,
an example and a seed from the measured table (``assets/shapes/examples.json``), and its picture, computed once
per process and then shown at once."""

from __future__ import annotations

from dataclasses import dataclass

from binding.lab import allowed_models, md, pair_result, shapes_table
from binding.methods import METHODS
from binding.views import maps_view, shapes_verdict, side_by_side, verdict_picture

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

    table = shapes_table().get("lesson") or {}
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
                f"that each colour word's map sits on its own noun's. Compare the two pictures: what changed? (On this "
                "model the guidance more often rescues a missing object than moves a colour; the README's table says "
                "how often each happens.) "
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


