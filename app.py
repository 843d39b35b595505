"""binding: the web app. A thin Gradio Blocks layer over the `binding` library.

Type a prompt, see its dependency parse and the modifier -> noun pairs it implies, edit them, pick a method
and run vanilla and guided Stable Diffusion from the same seed, side by side, or every method at once; read
the per-word cross-attention maps as evidence; follow the three-step lesson on the teaching model. Every
decision lives in `binding/` (``lab`` for what is shown, ``serving`` for running jobs); this file wires
components.

    python app.py [--host 0.0.0.0] [--port 7860] [--model NAME]
"""

from __future__ import annotations

try:  # Hugging Face ZeroGPU: `spaces` must be imported before torch.
    import spaces
except ImportError:
    spaces = None

import argparse
import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a classroom or offline machine sends nothing out

import gradio as gr

from binding import lab, lesson, serving, views
from binding.analysis import load_parser
from binding.guidance import Cancelled, GuidanceError
from binding.methods import METHODS, PAPERS
from binding.models import ModelLoadError, default_model, preset
from binding.render import display_image
from binding.settings import RANGES, defaults_for

YIELD_EVERY_S = 0.5  # how often a running job hands control back to Gradio (to be cancelled): see _events
QUEUE_SIZE = 256  # events waiting in all (a class of 40 generating, with bursts of typing): never "queue full"
CSS = """
.parse-scroll svg { max-width: none !important; }
.parser-name { font-size: 0.85em; color: #666; margin-bottom: 4px; }
.tokens { display: flex; flex-wrap: wrap; gap: 4px; }
.tok { border: 1px solid #bbb; border-radius: 4px; padding: 1px 6px; font-family: monospace; font-size: 0.9em; }
.tok sub { color: #888; margin-right: 3px; }
.trunc { margin-top: 6px; padding: 6px 10px; background: #fff4e5; border-left: 4px solid #f0a020; }
.banner { padding: 6px 12px; background: #eef5ff; border-left: 4px solid #3b82f6; border-radius: 4px; font-size: 0.92em; }
.banner .warn { color: #9a3412; font-weight: 600; }
.stale { padding: 4px 10px; background: #fff4e5; border-left: 4px solid #f0a020; }
.papers { font-size: 0.85em; color: #555; }
#images { flex-wrap: nowrap !important; gap: 8px; }
#images > div { min-width: 0 !important; }
.lesson-text { font-size: 1.05em; }
"""


def named(component):
    """The component, with out-of-range and non-number values refused in a message that names the setting
    (Gradio's own says only "Value 500 is greater than maximum value 200"). Wraps the instance's preprocess:
    a subclass would make Gradio write a stub file next to this one."""
    plain = component.preprocess

    def preprocess(payload):
        if payload is None or isinstance(payload, bool) or not isinstance(payload, (int, float)):
            raise gr.Error(f"{component.label} must be a number, not {payload!r}.")
        try:
            return plain(payload)
        except gr.Error as exc:
            raise gr.Error(f"{component.label}: {exc.message}") from None

    component.preprocess = preprocess
    return component


# --------------------------------------------------------------------------------------------- events


def on_prompt(prompt: str, state):
    """Parse as the visitor types; the pairs come back from the parse and any earlier pair problem is cleared."""
    view = lab.prompt_view(prompt)
    return (view.parse_html, view.rows, view.tokens_html, view.notice, view.analysis.to_dict(), "",
            lab.stale_notice((state or {}).get("prompt"), prompt))


def on_pairs(prompt: str, rows):
    """Re-check the edited pairs and recolour the parse and the tokens with them."""
    view = lab.prompt_view(prompt)
    bindings, problems, notes = lab.edited_bindings(view.analysis, rows)
    return (*lab.recoloured(view.analysis, bindings), lab.problems_markdown(problems + notes))


def on_method(label: str, model: str, touched):
    """A preset sets its loss terms, and the step size and intervention steps it uses on this model unless the
    visitor set them by hand."""
    settings = lab.method_settings(label, model)
    if settings is None:  # custom: leave everything as the visitor set it
        return gr.update(), gr.update(), gr.update()
    touched = touched or []
    return (settings["terms"],
            gr.update() if "step_size" in touched else settings["step_size"],
            gr.update() if "intervention_steps" in touched else settings["intervention_steps"])


def on_terms(label: str, terms: list[str]):
    """Ticking terms by hand makes the method custom, unless they match the chosen preset exactly."""
    return label if lab.terms_match(label, terms) else lab.CUSTOM


def on_model(model: str, label: str, touched):
    """The banner, the examples and the untouched settings follow the model."""
    touched = touched or []
    d = defaults_for(model, lab.METHOD_KEYS.get(label, "syngen") if label != lab.CUSTOM else "syngen")
    keep = {k: gr.update() if k in touched else d[k] for k in ("steps", "intervention_steps", "step_size",
                                                                  "guidance_scale")}
    return (lab.model_banner(model), gr.update(samples=[[e] for e in lab.examples_for(model)]), keep["steps"],
            keep["intervention_steps"], keep["step_size"], keep["guidance_scale"])


def _touch(name):
    def mark(touched):
        return sorted(set(touched or []) | {name})
    return mark


def _request(prompt, rows, model, method_label, terms, steps, intervention_steps, step_size, guidance_scale, seed,
             randomize_seed):
    try:
        job = lab.GenerationRequest.from_ui(prompt, rows, model, method_label, terms, steps, intervention_steps,
                                            step_size, guidance_scale, seed, randomize_seed)
    except ValueError as exc:
        raise gr.Error(str(exc)) from None
    for warning in job.warnings:
        gr.Warning(warning)
    return job


def _events(job, progress):
    """The job's events, run where the GPU is (another process on ZeroGPU); errors become one message each.

    When the visitor cancels or leaves, Gradio closes this generator: the job's flag then tells the worker,
    wherever it runs, to stop after its current step.
    """
    events = _run_on_gpu(job)  # a name of its own: unwinding the loop below must not close it before the flag
    last = 0.0
    try:
        for event in events:
            if event.kind == "progress":
                progress(event.fraction, desc=event.text)
                # Gradio can only close the generator (cancel) at a yield, and each yield of the callers' empty
                # updates rebuilds every output component on the event loop; so at most one per YIELD_EVERY_S.
                if time.monotonic() - last < YIELD_EVERY_S:
                    continue
                last = time.monotonic()
            yield event
    except GeneratorExit:  # closed while the job runs: flag first, then the worker's generator is closed
        serving.request_cancel(job.token)
        raise
    except Cancelled:
        return
    except ModelLoadError as exc:
        raise gr.Error(f"The model could not be loaded. {exc}") from None
    except GuidanceError as exc:
        raise gr.Error(f"{exc}. Try a smaller step size or fewer intervention steps.") from None
    except ValueError as exc:
        raise gr.Error(str(exc)) from None
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "out of memory" not in str(exc).lower():
            raise
        raise gr.Error("The machine ran out of memory for this run: try fewer steps or a smaller model.") from None


def generate(prompt, rows, model, method_label, terms, steps, intervention_steps, step_size, guidance_scale, seed,
             randomize_seed, request: gr.Request = None, progress=gr.Progress()):
    """Vanilla and the chosen method from the same seed: both images, the maps and the numbers."""
    request_ = _request(prompt, rows, model, method_label, terms, steps, intervention_steps, step_size,
                        guidance_scale, seed, randomize_seed)
    results = {}
    for event in _events(request_.job(), progress):
        if event.kind == "result":
            results[event.method] = event.result
        else:
            yield (gr.update(),) * 12
    if len(results) < 2:
        return
    result = lab.pair_result(results, request_.method)
    view = views.run_view(result)
    maps = views.maps_view(result)
    files = views.downloads(result, str(_session_dir(request, fresh=True)))
    state = {"prompt": result.prompt, "result": result, "compare": None}
    yield (display_image(views.verdict_picture(result.vanilla_image, result.prompt)),
           display_image(views.verdict_picture(result.guided_image, result.prompt)), view.summary, maps.image,
           maps.caption, view.overlaps, view.loss_plot, files, request_.seed, state, "", "")


def compare(prompt, rows, model, steps, guidance_scale, seed, randomize_seed, request: gr.Request = None,
            progress=gr.Progress()):
    """Vanilla and every method from one seed, in one row, each with the scorer's verdict and pair overlaps;
    each method at its own defaults on this model."""
    request_ = _request(prompt, rows, model, lab.DEFAULT_METHOD, sorted(METHODS["syngen"].terms), steps, None,
                        None, guidance_scale, seed, randomize_seed)
    methods = views.compare_methods(model)
    results = {}
    for event in _events(request_.job(methods), progress):
        if event.kind == "result":
            results[event.method] = event.result
            image, rows_ = views.compare_view(results, request_.prompt)
            yield image, rows_, request_.seed
    if not results:
        yield gr.update(), gr.update(), gr.update()


def on_steps_range(state):
    """After a run: the step slider spans its steps (a separate, private event, so the API returns numbers)."""
    n = 0 if not state or state.get("result") is None else views.n_steps(state["result"])
    return gr.update(minimum=1, maximum=max(n, 2), value=max(n, 1), interactive=n > 1)


def on_layers(state):
    names = [] if not state or state.get("result") is None else state["result"].settings.get("read_layers") or []
    return gr.update(choices=views.layer_choices(names), value=[])


def on_maps(state, step, view, scale, mask, function_words, layers, opacity):
    """Redraw the maps for another step, view, scale or layer choice, without running anything."""
    if not state or state.get("result") is None:
        return gr.update(), gr.update(), gr.update()
    result = state["result"]
    names = result.settings.get("read_layers") or []
    shown = views.layer_choices(names)
    chosen = [names[shown.index(c)] for c in (layers or []) if c in shown]
    mv = views.maps_view(result, int(step), view, scale, bool(mask), bool(function_words), chosen or None,
                       float(opacity))
    return mv.image, mv.caption, views.run_view(result, int(step)).overlaps


def on_animation(state, scale, mask, function_words, request: gr.Request = None):
    if not state or state.get("result") is None:
        raise gr.Error("Generate first: there are no maps to animate yet.")
    path = _session_dir(request) / f"maps-seed{state['result'].seed}.gif"
    return views.maps_animation(state["result"], str(path), scale=scale, mask=bool(mask),
                              function_words=bool(function_words))


def on_swap(prompt, old, new, rows, model, method_label, terms, steps, intervention_steps, step_size,
            guidance_scale, seed, request: gr.Request = None, progress=gr.Progress()):
    """The same seed with one word swapped: does the change land on the object it names?"""
    try:
        swapped = lab.swap_word(prompt, old, new)
    except ValueError as exc:
        raise gr.Error(f"Swap: {exc}") from None
    request_ = _request(swapped, lab.prompt_view(swapped).rows, model, method_label, terms, steps,
                        intervention_steps, step_size, guidance_scale, seed, False)
    results = {}
    for event in _events(request_.job(), progress):
        if event.kind == "result":
            results[event.method] = event.result
        else:
            yield gr.update(), gr.update(), gr.update()
    if len(results) == 2:
        r = lab.pair_result(results, request_.method)
        yield (display_image(views.verdict_picture(r.vanilla_image, swapped)),
               display_image(views.verdict_picture(r.guided_image, swapped)),
               f"**{lab.md(swapped)}** · seed {r.seed} (the same start as the run above)")


def on_lesson(k: int, model: str):
    """A lesson step: its text, its prompt and seed, and its pictures (computed once, then cached)."""
    step = lesson.lesson_step(k, model, run=_run_on_gpu)
    return step.text, step.prompt, step.seed, step.image


def on_shown(state):
    """The prompt of the pictures now on the page, for the live parse's stale notice (browser side)."""
    return (state or {}).get("prompt", "")


def on_arrive():
    """Nothing to compute: this page-load event makes Gradio build the visitor's session state as they arrive.
    Gradio builds it on its event loop (~65 ms for this page) at a session's first event; were that Generate,
    a class pressing it at once would stall every page and parse for seconds (binding.loadtest)."""


def on_cancel():
    gr.Info("Cancelled: the results shown are from the previous run.")


# The page's live parse: a plain JSON route beside Gradio's, called from the browser as the visitor types. Through
# Gradio's event machinery even a no-op costs ~15 ms of the server's one Python thread, so 200 visitors typing at
# once waited 6-13 s for their parse; this route costs the parse and little else (see binding.loadtest).
LIVE_PARSE_MAX_BYTES = 64_000  # a JSON-escaped prompt far past what CLIP reads; the parse itself is capped too


async def live_parse(request):
    """POST ``{"prompt": str}`` -> ``lab.prompt_payload``; a bad body gets a 400 with the reason."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    body = await request.body()
    if len(body) > LIVE_PARSE_MAX_BYTES:
        return JSONResponse({"error": f"the request is over {LIVE_PARSE_MAX_BYTES} bytes"}, status_code=413)
    try:
        prompt = json.loads(body)["prompt"]
        if not isinstance(prompt, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": 'send {"prompt": "..."} as UTF-8 JSON'}, status_code=400)
    return JSONResponse(await run_in_threadpool(lab.prompt_payload, prompt))


_STALE_HEAD, _STALE_TAIL = lab.STALE_NOTICE.split("{prompt}")
# Runs in the browser on every change of the prompt: the newest answer wins, a failed fetch keeps what is shown.
LIVE_PARSE_JS = r"""
async (prompt, shown, ...current) => {
  const seq = (window.__bindingParseSeq = (window.__bindingParseSeq || 0) + 1);
  const ents = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"};
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ents[c]);
  const typed = (prompt || "").trim(), made = (shown || "").trim();
  const stale = made && made !== typed ? HEAD + esc(made) + TAIL : "";
  const root = ((window.gradio_config && window.gradio_config.root) || ".").replace(/\/$/, "");
  let notice;
  try {
    const r = await fetch(root + PATH, {method: "POST", headers: {"content-type": "application/json"},
                                        body: JSON.stringify({prompt: prompt || ""})});
    const v = await r.json();
    if (!r.ok) throw new Error(v.error || ("HTTP " + r.status));
    if (seq !== window.__bindingParseSeq) return current;
    return [v.parse_html, v.pairs, v.tokens_html, v.notice, v.analysis, "", stale];
  } catch (e) {
    notice = "The parse could not be fetched (" + esc(e.message) + "): the pairs are the last ones shown.";
  }
  if (seq !== window.__bindingParseSeq) return current;
  return [current[0], current[1], current[2], notice, current[4], current[5], stale];
}
""".replace("HEAD", json.dumps(_STALE_HEAD)).replace("TAIL", json.dumps(_STALE_TAIL)).replace(
    "PATH", json.dumps(lab.LIVE_PARSE_PATH))


# ----------------------------------------------------------------------------------------- plumbing

_SESSIONS = Path(tempfile.gettempdir()) / "binding-sessions"


def _session_dir(request, fresh: bool = False) -> Path:
    """One temporary folder per visitor for downloads, emptied for each new run and removed when they leave."""
    key = "".join(c for c in str(getattr(request, "session_hash", None) or "default") if c.isalnum())[:64]
    folder = _SESSIONS / key
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def on_unload(request: gr.Request):
    shutil.rmtree(_session_dir(request), ignore_errors=True)


_WORKER: serving.Worker | None = None  # the app's generation process (started by main), when not on ZeroGPU

if spaces is not None:  # ZeroGPU: a GPU is attached for the job's estimated duration only; jobs are picklable
    _run_on_gpu = spaces.GPU(duration=serving.gpu_seconds)(serving.run_job)
else:
    def _run_on_gpu(job):
        """The job in the app's worker process, or here when none was started (the app imported by a test)."""
        return _WORKER.run(job) if _WORKER is not None else serving.run_job(job)


# ------------------------------------------------------------------------------------------- layout


def build(model: str | None = None) -> gr.Blocks:
    load_parser()  # fail at start, with install instructions, rather than on the first visitor
    allowed = lab.allowed_models()
    model = model or (default_model() if default_model() in allowed else allowed[0])
    examples = lab.examples_for(model) or [""]
    first = lab.prompt_view(examples[0])
    preset_ = lab.method_settings(lab.DEFAULT_METHOD, model)
    d = defaults_for(model, "syngen")

    def slider(name, value, **kw):
        r = RANGES[name]
        return named(gr.Slider(r.lo, r.hi, value=value, step=r.step, label=kw.pop("label", r.label), **kw))

    papers = " · ".join(f'<a href="{url}" target="_blank">{METHODS[k].label}</a> ({title.split(",")[1].strip()})'
                        for k, (title, url) in PAPERS.items())
    with gr.Blocks(title="binding: attribute binding lab") as demo:
        gr.HTML(f'<div><b style="font-size:1.35em">binding</b>: why a model gives a colour to the wrong object, '
                f'and three ways to fix it while it draws. <span class="papers">Papers: {papers}</span></div>')
        banner = gr.HTML(lab.model_banner(model), elem_id="banner")
        touched = gr.State([])
        state = gr.State()
        shown = gr.Textbox(visible=False, label="Shown")  # the pictures' prompt, for the live parse's notice
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320):
                prompt = gr.Textbox(label="Prompt (Enter generates)", value=examples[0], max_lines=2, elem_id="prompt")
                with gr.Row():
                    method = gr.Radio(lab.METHOD_LABELS, value=lab.DEFAULT_METHOD, label="Method", scale=4,
                                      elem_id="method")
                    seed = gr.Number(value=lab.example_seed(model, examples[0]), precision=0, minimum=0, label="Seed",
                                     scale=1, min_width=90, elem_id="seed")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate", scale=2)
                    compare_btn = gr.Button("Compare all methods", elem_id="compare", scale=2)
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel", scale=1, min_width=80)
                randomize = gr.Checkbox(value=False, label="Random seed", elem_id="randomize")
                example_set = gr.Dataset(components=[prompt], samples=[[e] for e in examples], label="Examples",
                                         elem_id="examples", samples_per_page=6)
            with gr.Column(scale=7, min_width=320):
                stale = gr.HTML(label="Stale", elem_id="stale")
                with gr.Row(elem_id="images"):
                    vanilla_img = gr.Image(label="Vanilla", type="pil", format="png", elem_id="vanilla", height=300,
                                           min_width=150, buttons=["download", "fullscreen"])
                    guided_img = gr.Image(label="Guided", type="pil", format="png", elem_id="guided", height=300,
                                          min_width=150, buttons=["download", "fullscreen"])
                summary = gr.Markdown(label="Summary", elem_id="summary")
        with gr.Tabs() as tabs:
            with gr.Tab("Parse & pairs", id="parse"):
                with gr.Row():
                    with gr.Column(scale=3):
                        parse_view = gr.HTML(first.parse_html, label="Dependency parse", elem_id="parse")
                        notice = gr.Markdown(first.notice, label="Notice", elem_id="notice")
                        tokens = gr.HTML(first.tokens_html, label="CLIP tokens", elem_id="tokens")
                    with gr.Column(scale=2):
                        gr.Markdown("**Modifier → noun pairs**: edit, switch off, add rows; a repeated word is "
                                    "*dog#2*, any word *@character*.")
                        pairs = gr.Dataframe(
                            value=first.rows, headers=lab.PAIR_HEADERS, datatype=["bool", "str", "str"], type="array",
                            column_count=3, row_count=len(first.rows) or 1, interactive=True,
                            column_widths=["16%", "44%", "40%"], elem_id="pairs", label="Pairs", show_label=False,
                        )
                        problems = gr.Markdown(label="Pair problems", elem_id="pair-problems")
                        reset = gr.Button("Reset pairs to the parse", size="sm")
                        with gr.Accordion("Analysis as JSON", open=False):
                            analysis_json = gr.JSON(first.analysis.to_dict(), label="Analysis")
            with gr.Tab("Maps", id="maps"):
                with gr.Row():
                    step_view = named(gr.Slider(1, 2, value=1, step=1, label="Denoising pass", interactive=False,
                                                elem_id="step-view", scale=3))
                    view_mode = gr.Radio(list(views.MAP_VIEWS), value="step", label="Show", scale=3, elem_id="view-mode")
                    scale_mode = gr.Radio(list(views.MAP_SCALES), value="row", label="Colour scale", scale=2,
                                          elem_id="scale-mode")
                with gr.Row():
                    mask = gr.Checkbox(value=False, label="Thresholded (where each word is)", elem_id="mask")
                    function_words = gr.Checkbox(value=False, label="Function words too (a, and...)")
                    layers = gr.CheckboxGroup([], label="Read layers to average (none ticked: all)", elem_id="layers")
                    opacity = gr.Slider(0, 1, value=views.DEFAULT_OPACITY, step=0.05, label="Opacity", elem_id="opacity")
                heatmaps = gr.Image(label="Maps", type="pil", format="png", elem_id="heatmaps",
                                    buttons=["download", "fullscreen"])
                maps_caption = gr.Markdown(label="Maps caption", elem_id="maps-caption")
                with gr.Row():
                    gif_btn = gr.Button("Animate the steps (GIF)", size="sm")
                    gif = gr.File(label="Animation", elem_id="gif")
            with gr.Tab("Compare all", id="compare-tab"):
                gr.Markdown("Vanilla and every method **from the same seed** (the same starting noise), each with "
                            "the scorer's reading drawn on it.")
                compare_img = gr.Image(label="Compared", type="pil", format="png", elem_id="compare-row",
                                       buttons=["download", "fullscreen"])
                compare_table = gr.Dataframe(headers=views.COMPARE_HEADERS, label="Compared numbers", interactive=False,
                                             elem_id="compare-table")
            with gr.Tab("Numbers", id="numbers"):
                gr.Markdown(views.OVERLAP_LABEL)
                with gr.Row():
                    overlaps = gr.Dataframe(headers=views.OVERLAP_HEADERS, label="Overlaps", elem_id="overlaps",
                                            interactive=False, scale=3)
                    loss_plot = gr.Image(label="Loss", type="pil", format="png", scale=2, elem_id="loss-plot")
            with gr.Tab("What if…", id="swap"):
                gr.Markdown("Swap one word and run again **from the same seed**: if the model binds, the change "
                            "lands on the object the word belongs to.")
                with gr.Row():
                    swap_old = gr.Textbox(label="Word to replace (e.g. blue, or square#2)", scale=2)
                    swap_new = gr.Textbox(label="Replace with", scale=2)
                    swap_btn = gr.Button("Run with the swap", scale=1)
                swap_caption = gr.Markdown()
                with gr.Row():
                    swap_vanilla = gr.Image(label="Vanilla (swapped)", type="pil", format="png", height=256,
                                            min_width=150)
                    swap_guided = gr.Image(label="Guided (swapped)", type="pil", format="png", height=256,
                                           min_width=150)
            with gr.Tab("Lesson", id="lesson"):
                gr.Markdown("Three steps for a class, on the teaching model. Each loads its example and seed.")
                with gr.Row():
                    lesson_btns = [gr.Button(title, size="sm") for title in lesson.LESSON_TITLES]
                lesson_text = gr.Markdown(elem_classes=["lesson-text"], elem_id="lesson-text")
                lesson_img = gr.Image(label="", type="pil", format="png", show_label=False, elem_id="lesson-image")
            with gr.Tab("Settings", id="settings"):
                with gr.Row():
                    model_box = gr.Dropdown(allowed, value=model, label="Model", scale=1, elem_id="model")
                    terms = gr.CheckboxGroup(lab.TERM_CHOICES, value=preset_["terms"], label="Loss terms", scale=3)
                with gr.Row():
                    steps = slider("steps", d["steps"], elem_id="steps")
                    intervention = slider("intervention_steps", preset_["intervention_steps"],
                                          label="Intervention steps (guided from the start)", elem_id="intervention")
                    step_size = slider("step_size", preset_["step_size"], elem_id="step-size")
                    guidance = slider("guidance_scale", d["guidance_scale"], elem_id="guidance")
            with gr.Tab("Downloads", id="downloads"):
                gr.Markdown("Both images at 512 px, both side by side for a slide, and the run record (a .zip that "
                            "`binding.records.load_run` loads).")
                files = gr.File(label="Downloads", file_count="multiple", elem_id="downloads")

        settings_in = [model_box, method, terms, steps, intervention, step_size, guidance, seed, randomize]
        gen_in = [prompt, pairs, *settings_in]
        gen_out = [vanilla_img, guided_img, summary, heatmaps, maps_caption, overlaps, loss_plot, files, seed, state,
                   problems, stale]
        parse_out = [parse_view, pairs, tokens, notice, analysis_json, problems, stale]

        # The live parse never reaches Gradio's events or queue: the browser asks lab.LIVE_PARSE_PATH itself. The same
        # parse, as an event, resets the pairs and is the API's /parse.
        prompt.change(None, [prompt, shown, *parse_out], parse_out, js=LIVE_PARSE_JS, trigger_mode="always_last",
                      show_progress="hidden")
        reset.click(on_prompt, [prompt, state], parse_out, api_name="parse", queue=False, show_progress="hidden")
        pairs.input(on_pairs, [prompt, pairs], [parse_view, tokens, problems], api_visibility="private")
        method.input(on_method, [method, model_box, touched], [terms, step_size, intervention],
                     api_visibility="private")
        terms.input(on_terms, [method, terms], method, api_visibility="private")
        for name, control in (("steps", steps), ("intervention_steps", intervention), ("step_size", step_size),
                              ("guidance_scale", guidance)):
            control.input(_touch(name), touched, touched, api_visibility="private", queue=False)
        model_box.change(on_model, [model_box, method, touched],
                         [banner, example_set, steps, intervention, step_size, guidance], api_visibility="private")
        example_set.click(lambda m, ex: (ex[0], lab.example_seed(m, ex[0])), [model_box, example_set], [prompt, seed],
                          api_visibility="private")

        gen = run.click(generate, gen_in, gen_out, api_name="generate", concurrency_limit=1,
                        concurrency_id="gpu", show_progress_on=[vanilla_img, guided_img])
        sub = prompt.submit(generate, gen_in, gen_out, api_visibility="private", concurrency_limit=1,
                            concurrency_id="gpu", show_progress_on=[vanilla_img, guided_img])
        for event in (gen, sub):
            event.then(on_shown, state, shown, api_visibility="private", queue=False, show_progress="hidden")
            event.then(on_steps_range, state, step_view, api_visibility="private").then(
                on_layers, state, layers, api_visibility="private")
        compare_btn.click(lambda: gr.Tabs(selected="compare-tab"), None, tabs, api_visibility="private", queue=False)
        cmp = compare_btn.click(compare, [prompt, pairs, model_box, steps, guidance, seed, randomize],
                                [compare_img, compare_table, seed], api_name="compare", concurrency_limit=1,
                                concurrency_id="gpu", show_progress_on=[compare_img])
        stop.click(on_cancel, None, None, cancels=[gen, sub, cmp], api_visibility="private", concurrency_limit=None)
        maps_in = [state, step_view, view_mode, scale_mode, mask, function_words, layers, opacity]
        for control in (step_view, view_mode, scale_mode, mask, function_words, layers, opacity):
            control.input(on_maps, maps_in, [heatmaps, maps_caption, overlaps], api_visibility="private",
                          trigger_mode="always_last")
        gif_btn.click(on_animation, [state, scale_mode, mask, function_words], gif, api_visibility="private")
        swap_btn.click(on_swap, [prompt, swap_old, swap_new, pairs, *settings_in[:-2], seed],
                       [swap_vanilla, swap_guided, swap_caption], api_visibility="private", concurrency_limit=1,
                       concurrency_id="gpu")
        for k, btn in enumerate(lesson_btns):
            btn.click(lambda m, k=k: on_lesson(k, m), model_box, [lesson_text, prompt, seed, lesson_img],
                      api_visibility="private", concurrency_limit=1, concurrency_id="gpu")
        demo.load(on_arrive, None, None, api_name="arrive", api_visibility="undocumented", queue=False,
                  show_progress="hidden")
        demo.unload(on_unload)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo


def main() -> None:
    cli = argparse.ArgumentParser(description="binding: the attribute-binding lab (Gradio app)")
    cli.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                     help="address to listen on (0.0.0.0 to serve the network)")
    cli.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    cli.add_argument("--model", default=None, help="the model selected at start (a preset this server offers)")
    args = cli.parse_args()
    allowed = lab.allowed_models()
    if args.model is not None and args.model not in allowed:
        cli.error(f"--model must be one of {', '.join(allowed)}")
    model = args.model or (default_model() if default_model() in allowed else allowed[0])
    serving.clear_stale_flags()
    if spaces is None:
        global _WORKER
        # Generation in a process of its own, the model loaded there at start-up: pages and parses never wait
        # behind it. (On ZeroGPU the `spaces` package runs each job in its own worker.)
        _WORKER = serving.Worker(preload=model if preset(model) is not None and preset(model).offline else None)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so a stopped app also stops its worker (atexit)
        atexit.register(_WORKER.close)
    elif preset(model) is not None and preset(model).offline:
        serving.pipeline(model)  # load at start-up, on the CPU: the GPU slice is spent drawing
    from starlette.routing import Route

    build(model).launch(server_name=args.host, server_port=args.port, css=CSS, footer_links=["api", "gradio"],
                        app_kwargs={"routes": [Route(lab.LIVE_PARSE_PATH, live_parse, methods=["POST"])]})


if __name__ == "__main__":
    main()
