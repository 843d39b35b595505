"""binding: the web app (Gradio Blocks). A thin layer over the `binding` library.

For now it shows the prompt analysis: the dependency parse, the bindings and the CLIP tokens. Guided
generation joins it once the engine lands.
"""

from __future__ import annotations

import argparse
import html

import gradio as gr

from binding.analysis import analyze, load_parser
from binding.render import parse_svg

EXAMPLES = [
    "a red apple and a green banana",
    "a yellow flamingo and a pink sunflower",
    "a checkered bowl on a red and blue table",
    "a horned lion and a spotted monkey",
]


def parse(prompt: str):
    result = analyze(prompt or "")
    svg = f'<div style="overflow-x:auto">{parse_svg(result)}</div>'
    rows = [[" ".join(m.text for m in b.modifiers), b.noun.text] for b in result.bindings]
    notes = "\n".join(f"- {html.escape(n)}" for n in result.notes)
    header = f"Parser: `{result.parser}`\n\n{notes}"
    tokens = " ".join(f"`{k}:{html.escape(t)}`" for k, t in enumerate(result.tokens))
    return svg, rows, header, tokens


def build() -> gr.Blocks:
    load_parser()
    with gr.Blocks(title="binding") as demo:
        gr.Markdown("# binding: attribute binding in text-to-image diffusion")
        prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0])
        gr.Examples(EXAMPLES, inputs=prompt)
        info = gr.Markdown()
        svg = gr.HTML()
        pairs = gr.Dataframe(headers=["modifiers", "noun"], label="Bindings (modifiers -> noun)")
        tokens = gr.Markdown()
        outputs = [svg, pairs, info, tokens]
        prompt.change(parse, prompt, outputs, api_name="parse")
        demo.load(parse, prompt, outputs)
    return demo


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="binding web app")
    cli.add_argument("--host", default="127.0.0.1")
    cli.add_argument("--port", type=int, default=7860)
    args = cli.parse_args()
    build().launch(server_name=args.host, server_port=args.port)
