"""binding: the web app. A thin Gradio Blocks layer over the `binding` library.

Type a prompt, see its dependency parse and the modifier -> noun pairs it implies, edit them, pick a
method and run vanilla and guided Stable Diffusion from the same seed, side by side, with the per-word
cross-attention maps of both runs. Every decision lives in `binding/`; this file only wires components.

    python app.py [--host 0.0.0.0] [--port 7860] [--model NAME]
"""

from __future__ import annotations

try:  # Hugging Face ZeroGPU: `spaces` must be imported before torch.
    import spaces
except ImportError:
    spaces = None

import argparse
import os
import tempfile
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a classroom or offline machine sends nothing out

import gradio as gr

from binding import lab
from binding.analysis import load_parser
from binding.guidance import Cancelled, GuidanceError
from binding.models import PRESETS, ModelLoadError, default_model
from binding.render import display_image
from binding.settings import RANGES, defaults_for

QUEUE_SIZE = 16
N_GENERATE_OUTPUTS = 10  # images x2, summary, heatmaps, overlaps, loss plot, step slider, files, run state, seed
CSS = """
.parse-scroll svg { max-width: none !important; }
.parser-name { font-size: 0.85em; color: #666; margin-bottom: 4px; }
.tokens { display: flex; flex-wrap: wrap; gap: 4px; }
.tok { border: 1px solid #bbb; border-radius: 4px; padding: 1px 6px; font-family: monospace; font-size: 0.9em; }
.tok sub { color: #888; margin-right: 3px; }
.trunc { margin-top: 6px; padding: 6px 10px; background: #fff4e5; border-left: 4px solid #f0a020; }
.banner { padding: 8px 12px; background: #eef5ff; border-left: 4px solid #3b82f6; border-radius: 4px; }
.legend { margin: 4px 0; }
"""


# --------------------------------------------------------------------------------------------- events


def on_prompt(prompt: str):
    """Parse as the visitor types: the parse, the pairs table, the CLIP tokens, notes, and the analysis."""
    view = lab.prompt_view(prompt)
    return view.parse_html, view.rows, view.tokens_html, view.notice, view.analysis.to_dict()


def on_pairs(prompt: str, rows):
    """Re-check the edited pairs and recolour the parse and the tokens with them."""
    view = lab.prompt_view(prompt)
    bindings, problems = lab.edited_bindings(view.analysis, rows)
    return (*lab.recoloured(view.analysis, bindings), lab.problems_markdown(problems))


def on_method(label: str, model: str):
    """A preset sets its loss terms and its step size and intervention steps on this model."""
    settings = lab.method_settings(label, model)
    if settings is None:  # custom: leave everything as the visitor set it
        return gr.update(), gr.update(), gr.update()
    return settings["terms"], settings["step_size"], settings["intervention_steps"]


def on_terms(label: str, terms: list[str]):
    """Ticking terms by hand makes the method custom, unless they match the chosen preset exactly."""
    return label if lab.terms_match(label, terms) else lab.CUSTOM


def generate(prompt, rows, model, method_label, terms, steps, intervention_steps, step_size, guidance_scale, seed,
             randomize_seed, request: gr.Request = None, progress=gr.Progress()):
    """Vanilla and guided from the same seed; returns both images, the maps and the numbers."""
    cancel = _cancel_event(request, reset=True)
    try:
        job = lab.GenerationRequest.from_ui(
            prompt, rows, model, method_label, terms, steps, intervention_steps, step_size, guidance_scale, seed,
            randomize_seed,
        )
    except ValueError as exc:
        raise gr.Error(str(exc)) from None
    for warning in job.warnings:
        gr.Warning(warning)

    def report(p):
        progress(p.fraction, desc=f"{p.run} run: step {p.step}/{p.total}")

    try:
        result = _run_on_gpu(job, report, cancel)
    except Cancelled:
        gr.Warning("Generation cancelled; the results shown are from the previous run.")
        return (gr.update(),) * N_GENERATE_OUTPUTS
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
    view = lab.run_view(result, step=None, opacity=lab.DEFAULT_OPACITY)
    files = lab.downloads(result, tempfile.mkdtemp(prefix="binding-run-"))
    return (
        display_image(result.vanilla_image), display_image(result.guided_image), view.summary, view.grid,
        view.overlaps, view.loss_plot, gr.update(maximum=view.n_steps, value=view.n_steps, interactive=True), files,
        result, job.seed,
    )


def on_view(result, step, opacity):
    """Redraw the heatmaps and the overlap table for another step or opacity, without running anything."""
    if result is None:
        return gr.update(), gr.update()
    view = lab.run_view(result, step=int(step), opacity=float(opacity))
    return view.grid, view.overlaps


def on_cancel(request: gr.Request = None):
    _cancel_event(request).set()
    gr.Info("Cancelling after the current step…")


# ----------------------------------------------------------------------------------------- plumbing

_CANCEL: dict[str, threading.Event] = {}


def _cancel_event(request, reset: bool = False) -> threading.Event:
    key = getattr(request, "session_hash", None) or "default"
    if reset or key not in _CANCEL:
        _CANCEL[key] = threading.Event()
    return _CANCEL[key]


def _run(job, report, cancel):
    return lab.run_generation(job, callback=report, cancel=cancel)


if spaces is not None:  # ZeroGPU: a GPU is attached for the call's estimated duration only
    _run_on_gpu = spaces.GPU(duration=lambda job, report, cancel: lab.gpu_seconds(job))(_run)
else:
    _run_on_gpu = _run


# ------------------------------------------------------------------------------------------- layout


def build(model: str | None = None) -> gr.Blocks:
    load_parser()  # fail at start, with install instructions, rather than on the first visitor
    model = model or default_model()
    examples = lab.examples_for(model) or [""]
    first = lab.prompt_view(examples[0])
    preset = lab.method_settings(lab.DEFAULT_METHOD, model)

    def slider(name, value, **kw):
        r = RANGES[name]
        return gr.Slider(r.lo, r.hi, value=value, step=r.step, label=kw.pop("label", r.label), **kw)
    with gr.Blocks(title="binding: attribute binding lab") as demo:
        gr.Markdown(
            "# binding: attribute binding in text-to-image diffusion\n"
            "Text-to-image models give colours to the wrong object (*a red apple and a green banana* → a red "
            "banana). **SynGen**, **Divide & Bind** and **Attend-and-Excite** read the model's cross-attention "
            "maps while it draws and nudge the image so each word lands on its own object. Type a prompt, check "
            "its pairs, and compare vanilla and guided runs from the same seed."
        )
        banner = gr.HTML(lab.model_banner(model), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", value=examples[0], max_lines=3, elem_id="prompt")
                gr.Examples([[e] for e in examples], inputs=prompt, label="Examples for this model (each invites a leak)")
                parse_view = gr.HTML(first.parse_html, label="Dependency parse", elem_id="parse")
                notice = gr.Markdown(first.notice, elem_id="notice")
                tokens = gr.HTML(first.tokens_html, label="CLIP tokens", elem_id="tokens")
            with gr.Column(scale=2):
                pairs = gr.Dataframe(
                    value=first.rows, headers=lab.PAIR_HEADERS, datatype=["bool", "str", "str"], type="array",
                    column_count=3, row_count=len(first.rows) or 1, interactive=True, column_widths=["16%", "44%", "40%"],
                    label="Modifier → noun pairs (edit, switch off, add rows; name a repeated word as dog#2)",
                    elem_id="pairs",
                )
                problems = gr.Markdown(elem_id="pair-problems")
                reset = gr.Button("Reset pairs to the parse", size="sm")
                with gr.Accordion("Analysis as JSON", open=False):
                    analysis_json = gr.JSON(first.analysis.to_dict())
        with gr.Row():
            model_box = gr.Dropdown(list(PRESETS), value=model, label="Model", scale=1)
            method = gr.Radio(lab.METHOD_LABELS, value=lab.DEFAULT_METHOD, label="Method", scale=2)
        terms = gr.CheckboxGroup(lab.TERM_CHOICES, value=preset["terms"], label="Loss terms")
        with gr.Row():
            steps = slider("steps", preset["steps"], elem_id="steps")
            intervention = slider("intervention_steps", preset["intervention_steps"],
                                  label="Intervention steps (guided from the start)", elem_id="intervention")
            step_size = slider("step_size", preset["step_size"])
            guidance = slider("guidance_scale", defaults_for(model, "syngen")["guidance_scale"])
        with gr.Row():
            seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
            randomize = gr.Checkbox(value=False, label="Random seed")
            run = gr.Button("Generate", variant="primary", elem_id="generate", scale=2)
            stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
        with gr.Row():
            vanilla_img = gr.Image(label="Vanilla", type="pil", format="png", elem_id="vanilla", height=320)
            guided_img = gr.Image(label="Guided", type="pil", format="png", elem_id="guided", height=320)
        summary = gr.Markdown(elem_id="summary")
        with gr.Row():
            step_view = gr.Slider(1, 2, value=1, step=1, label="Denoising step shown", interactive=False,
                                  elem_id="step-view")
            opacity = gr.Slider(0, 1, value=lab.DEFAULT_OPACITY, step=0.05, label="Heatmap opacity", elem_id="opacity")
        heatmaps = gr.Image(label="Cross-attention per word", show_label=False, type="pil", format="png",
                            elem_id="heatmaps", buttons=["download", "fullscreen"])
        with gr.Row():
            overlaps = gr.Dataframe(headers=lab.OVERLAP_HEADERS, label=lab.OVERLAP_LABEL, elem_id="overlaps",
                                    interactive=False, scale=3)
            loss_plot = gr.Image(label="Guidance loss per step", type="pil", format="png", scale=2)
        files = gr.File(label="Downloads: both images and the run record (.zip, loadable with binding.records.load_run)",
                        file_count="multiple", elem_id="downloads")
        result_state = gr.State()

        parse_outputs = [parse_view, pairs, tokens, notice, analysis_json]
        prompt.change(on_prompt, prompt, parse_outputs, api_name="parse", trigger_mode="always_last")
        reset.click(on_prompt, prompt, parse_outputs, api_visibility="private")
        pairs.input(on_pairs, [prompt, pairs], [parse_view, tokens, problems], api_visibility="private")
        method.input(on_method, [method, model_box], [terms, step_size, intervention], api_visibility="private")
        terms.input(on_terms, [method, terms], method, api_visibility="private")
        run.click(
            generate,
            [prompt, pairs, model_box, method, terms, steps, intervention, step_size, guidance, seed, randomize],
            [vanilla_img, guided_img, summary, heatmaps, overlaps, loss_plot, step_view, files, result_state, seed],
            api_name="generate", concurrency_limit=1, concurrency_id="gpu", show_progress_on=[vanilla_img, guided_img],
        )
        model_box.change(lab.model_banner, model_box, banner, api_visibility="private")
        stop.click(on_cancel, None, None, api_visibility="private", queue=False)
        for control in (step_view, opacity):
            control.input(on_view, [result_state, step_view, opacity], [heatmaps, overlaps], api_visibility="private",
                          trigger_mode="always_last")
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo


def main() -> None:
    cli = argparse.ArgumentParser(description="binding: the attribute-binding lab (Gradio app)")
    cli.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                     help="address to listen on (0.0.0.0 to serve the network)")
    cli.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    cli.add_argument("--model", default=None, help=f"default model: one of {', '.join(PRESETS)}")
    args = cli.parse_args()
    if args.model is not None and args.model not in PRESETS:
        cli.error(f"--model must be one of {', '.join(PRESETS)}")
    build(args.model).launch(server_name=args.host, server_port=args.port, css=CSS, footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()
