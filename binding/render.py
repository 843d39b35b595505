"""Pictures for people: the dependency parse as SVG (and, later, heatmaps and plots).

Kept apart from the analysis, as spaCy keeps displacy apart from its pipeline.
"""

from __future__ import annotations

import re

from binding.analysis import Analysis

# Characters that are not allowed in XML 1.0; a prompt may contain them, an SVG may not.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


# One colour per binding, shared by every view (parse, tokens, tables) so a binding reads as one thing.
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def binding_colours(bindings) -> dict[int, str]:
    """Character start of each bound word -> its binding's colour."""
    colours = {}
    for k, b in enumerate(bindings):
        for w in (b.noun, *b.modifiers):
            colours[w.start] = PALETTE[k % len(PALETTE)]
    return colours


def parse_svg(analysis: Analysis, compact: bool = True, bindings=None) -> str:
    """The dependency parse drawn by displacy, safe to embed in a page whatever the prompt says.

    displacy escapes every word it draws; we also drop characters XML forbids, so markup or script in a
    prompt shows up as text and never as an element. The SVG is wide by design: embed it in a container
    that scrolls horizontally.
    """
    from spacy import displacy

    doc = analysis.doc
    if doc is None or not len(doc) or not analysis.prompt.strip():
        return '<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"></svg>'
    colours = binding_colours(analysis.bindings if bindings is None else bindings)
    words = [{"text": _XML_INVALID.sub("\ufffd", t.text), "tag": t.pos_} for t in doc if not t.is_space]
    starts = [t.idx for t in doc if not t.is_space]
    index = {t.i: k for k, t in enumerate(t for t in doc if not t.is_space)}
    arcs = []
    for t in doc:
        if t.is_space or t.head.i == t.i or t.head.is_space:
            continue
        a, b = index[t.i], index[t.head.i]
        arcs.append({"start": min(a, b), "end": max(a, b), "label": t.dep_, "dir": "left" if a < b else "right"})
    options = {"compact": compact, "distance": 110 if compact else 150, "offset_x": 40, "word_spacing": 30}
    svg = displacy.render({"words": words, "arcs": arcs}, style="dep", manual=True, jupyter=False, options=options)
    return _crop_top(_colour_words(svg, [colours.get(start) for start in starts]))


def _colour_words(svg: str, colours: list) -> str:
    """Paint the k-th drawn word in ``colours[k]`` (None: leave it) and make it bold."""
    parts = svg.split('<tspan class="displacy-word" fill="currentColor"')
    out = [parts[0]]
    for k, part in enumerate(parts[1:]):
        colour = colours[k] if k < len(colours) else None
        attrs = f' fill="{colour}" font-weight="bold"' if colour else ' fill="currentColor"'
        out.append('<tspan class="displacy-word"' + attrs + part)
    return "".join(out)


def _crop_top(svg: str, margin: float = 24.0) -> str:
    """Drop the empty band displacy leaves above the highest arc (its height counts unused levels)."""
    ys = [float(y) for d in re.findall(r'class="displacy-arc"[^>]* d="([^"]+)"', svg) for y in re.findall(r",([\d.]+)", d)]
    m = re.search(r'width="([\d.]+)" height="([\d.]+)"', svg)
    if not ys or not m:
        return svg
    top = max(min(ys) - margin, 0.0)
    width, height = float(m.group(1)), float(m.group(2)) - top
    svg = svg.replace(m.group(0), f'width="{width:g}" height="{height:g}" viewBox="0 {top:g} {width:g} {height:g}"', 1)
    return re.sub(r"height: [\d.]+px", f"height: {height:g}px", svg, count=1)


# ------------------------------------------------------------------------------------------ heatmaps


def heat_overlay(image, heat, opacity: float = 0.6, cmap: str = "jet"):
    """``heat`` (H, W), any scale, upsampled onto ``image`` and blended with the given opacity."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    image = image.convert("RGB")
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32))
    lo, hi = float(heat.min()), float(heat.max())
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    small = Image.fromarray((norm * 255).astype(np.uint8))
    big = np.asarray(small.resize(image.size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    colour = (colormaps[cmap](big)[..., :3] * 255).astype(np.float32)
    base = np.asarray(image, dtype=np.float32)
    opacity = float(min(max(opacity, 0.0), 1.0))
    return Image.fromarray((base * (1 - opacity) + colour * opacity).clip(0, 255).astype(np.uint8))


def heatmap_grid(rows, words, opacity: float = 0.6, cell: int = 160, cmap: str = "jet"):
    """One row per run (e.g. vanilla, guided), one column per word: the word's map over that run's image.

    ``rows`` is a sequence of ``(label, image, maps)`` with maps (H, W, T) for CLIP positions 0..T-1.
    Each cell is normalised on its own, so a faint map is still visible; compare places, not brightness.
    """
    from PIL import Image, ImageDraw

    from binding.metrics import word_map

    words = [w for w in words if w.token_indices]
    label_w, head_h, pad = 90, 30, 4
    width = label_w + max(len(words), 1) * (cell + pad)
    height = head_h + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(15)
    for c, word in enumerate(words):  # column heads: the words, once
        x = label_w + c * (cell + pad)
        text = _fit(draw, word.text, font, cell)
        draw.text((x + (cell - draw.textlength(text, font=font)) / 2, 8), text, fill="black", font=font)
    for r, (label, image, maps) in enumerate(rows):
        y = head_h + r * (cell + pad)
        draw.text((6, y + cell // 2 - 8), _fit(draw, str(label), font, label_w - 6), fill="black", font=font)
        base = image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
        for c, word in enumerate(words):
            canvas.paste(heat_overlay(base, word_map(maps, word), opacity, cmap), (label_w + c * (cell + pad), y))
    return canvas


def display_image(image, min_side: int = 256):
    """A small image scaled up for the screen with square pixels (a 64 px model's output stays readable)."""
    from PIL import Image

    if image is None or min(image.size) >= min_side:
        return image
    k = -(-min_side // min(image.size))
    return image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        try:
            return ImageFont.load_default(size)
        except TypeError:
            return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width - 4:
        return text
    while text and draw.textlength(text + "…", font=font) > width - 4:
        text = text[:-1]
    return text + "…"


def loss_plot(losses: dict, title: str = "guidance loss per step"):
    """A small line plot of each loss term against the denoising step, as a PIL image."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(6, 2.6), dpi=100)
    drawn = False
    colours: dict[str, str] = {}
    for name, values in losses.items():
        steps = [i + 1 for i, v in enumerate(values) if v is not None]
        if not steps:
            continue
        # "run: term" keys: one colour per term, vanilla dashed, so the same term of both runs pairs up.
        run, _, term = name.rpartition(": ")
        colour = colours.setdefault(term, f"C{len(colours) % 10}")
        style = "--" if run == "vanilla" else "-"
        ax.plot(steps, [values[i - 1] for i in steps], style, color=colour, marker="o" if style == "-" else None,
                markersize=3, label=name)
        drawn = True
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no guidance loss (vanilla run)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
