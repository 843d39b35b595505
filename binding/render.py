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


def heat_overlay(image, heat, opacity: float = 0.6, cmap: str = "magma", vmin: float | None = None,
                 vmax: float | None = None):
    """``heat`` (H, W) upsampled onto a greyed copy of ``image``, scaled from ``vmin`` to ``vmax`` (by default its
    own min and max): where the heat is high its colour covers the picture (up to ``opacity``), where it is
    zero the picture shows through, so a map reads as "where the word is"."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    image = image.convert("RGB")
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32))
    lo = float(heat.min()) if vmin is None else float(vmin)
    hi = float(heat.max()) if vmax is None else float(vmax)
    heat = heat.clip(lo, hi)
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    small = Image.fromarray((norm * 255).astype(np.uint8))
    big = np.asarray(small.resize(image.size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    colour = (colormaps[cmap](big)[..., :3] * 255).astype(np.float32)
    grey = np.asarray(image.convert("L").convert("RGB"), dtype=np.float32) * 0.8 + 40
    alpha = float(min(max(opacity, 0.0), 1.0)) * (0.25 + 0.75 * big[..., None])
    return Image.fromarray((grey * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8))


def latent_previews(previews, final_latents, final_image, size: int | None = None) -> list:
    """Each step's predicted final latents as an approximate picture, without a VAE: a per-run linear map from
    latent channels to RGB, fitted by least squares on the final latents against the final image (what
    latent previews in SD front ends do, but fitted to whatever model made the run)."""
    import numpy as np
    from PIL import Image

    size = size or final_image.width
    z = np.asarray(final_latents, dtype=np.float64)[0]  # (C, h, w)
    c, h, w = z.shape
    target = np.asarray(final_image.convert("RGB").resize((w, h), Image.Resampling.BOX), dtype=np.float64) / 255.0
    design = np.concatenate([z.reshape(c, -1).T, np.ones((h * w, 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, target.reshape(-1, 3), rcond=None)
    out = []
    for x0 in np.asarray(previews, dtype=np.float64):
        rgb = np.concatenate([x0.reshape(c, -1).T, np.ones((h * w, 1))], axis=1) @ coef
        img = Image.fromarray((rgb.reshape(h, w, 3).clip(0, 1) * 255).astype(np.uint8))
        out.append(img.resize((size, size * h // w), Image.Resampling.BILINEAR))
    return out


def colour_bar(vmin: float, vmax: float, height: int, cmap: str = "magma", width: int = 58, label: str = ""):
    """A vertical colour bar with its end values, for heatmaps drawn on a shared scale."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    bar = np.linspace(1, 0, max(height - 24, 8))[:, None].repeat(14, 1)
    colours = (colormaps[cmap](bar)[..., :3] * 255).astype(np.uint8)
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(Image.fromarray(colours), (4, 12))
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    draw.text((20, 6), f"{vmax:.3g}", fill="black", font=font)
    draw.text((20, height - 22), f"{vmin:.3g}", fill="black", font=font)
    if label:
        draw.text((20, height // 2 - 6), label, fill="#555", font=font)
    return canvas


def evidence_grid(rows, words, *, scale: str = "row", mask: bool = False, opacity: float = 0.6, cell: int = 160,
                  cmap: str = "magma", threshold: float = 0.5):
    """One row per run, one column per word: each word's map over that row's picture, on a colour scale that
    can be compared (``scale="row"``: one per row, ``"shared"``: one for the whole grid), with a colour bar.

    ``rows``: ``(label, image, maps)`` with maps (H, W, T) of attention probability. ``mask=True`` draws the
    thresholded map instead (cells above ``threshold`` x the cell's own peak: where the word "is").
    """
    from PIL import Image, ImageDraw

    from binding.metrics import word_map

    if scale not in ("row", "shared"):
        raise ValueError(f"scale must be 'row' or 'shared', not {scale!r}")
    words = [w for w in words if w.token_indices]
    heats = [[word_map(maps, w) for w in words] for _, _, maps in rows]
    peaks = [max((float(h.max()) for h in row), default=0.0) for row in heats]
    shared = max(peaks, default=0.0)
    label_w, head_h, pad, bar_w = 90, 30, 4, 58
    width = label_w + max(len(words), 1) * (cell + pad) + (0 if mask else bar_w)
    height = head_h + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(15)
    for c, word in enumerate(words):
        x = label_w + c * (cell + pad)
        text = _fit(draw, word.text, font, cell)
        draw.text((x + (cell - draw.textlength(text, font=font)) / 2, 8), text, fill="black", font=font)
    for r, (label, image, _) in enumerate(rows):
        y = head_h + r * (cell + pad)
        draw.text((6, y + cell // 2 - 8), _fit(draw, str(label), font, label_w - 6), fill="black", font=font)
        base = image.convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR)
        vmax = shared if scale == "shared" else peaks[r]
        for c, heat in enumerate(heats[r]):
            if mask:
                tile = mask_overlay(base, heat >= threshold * float(heat.max()) if heat.max() > 0 else heat > 1,
                                    opacity)
            else:
                tile = heat_overlay(base, heat, opacity, cmap, vmin=0.0, vmax=vmax)
            canvas.paste(tile, (label_w + c * (cell + pad), y))
        if not mask and (scale == "row" or r == 0):
            bar_h = cell if scale == "row" else len(rows) * (cell + pad) - pad
            canvas.paste(colour_bar(0.0, vmax, bar_h, cmap, bar_w), (width - bar_w, y))
    return canvas


def mask_overlay(image, mask, opacity: float = 0.6, colour=(255, 200, 0)):
    """``mask`` (h, w) bool upsampled onto ``image``: inside tinted, outside dimmed, the edge outlined."""
    import numpy as np
    from PIL import Image, ImageFilter

    m = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)
    inside = np.asarray(m, dtype=np.float32)[..., None] / 255.0
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    tint = np.array(colour, dtype=np.float32)
    out = base * (1 - inside * opacity * 0.5) + tint * inside * opacity * 0.5
    out = out * (1 - (1 - inside) * opacity * 0.6)
    edge = np.asarray(m.filter(ImageFilter.FIND_EDGES), dtype=np.float32)[..., None] / 255.0
    out = out * (1 - edge) + tint * edge
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


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


LOSS_NOTE = {
    "syngen_negative": "negative by design: minus distances to other words",
    "divide_bind": "negative by design: -TV + binding divergence",
}


def loss_plot(losses: dict, title: str = "guidance loss per denoising pass"):
    """Each loss term in its own panel against the denoising pass, the guided run solid and the same term
    measured on the vanilla run dashed and drawn on top (lower is better), as a PIL image."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from PIL import Image

    terms: dict[str, dict[str, list]] = {}
    for name, values in losses.items():
        run, _, term = name.rpartition(": ")
        if any(v is not None for v in values):
            terms.setdefault(term, {})[run or "guided"] = values
    n = max(len(terms), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 2.7), dpi=100, squeeze=False)
    if not terms:
        axes[0, 0].text(0.5, 0.5, "no guidance loss (vanilla run)", ha="center", va="center",
                        transform=axes[0, 0].transAxes)
        axes[0, 0].set_axis_off()
    for ax, (term, runs) in zip(axes[0], terms.items()):
        for run, style, colour, z in (("guided", "-", "#d62728", 2), ("vanilla", "--", "#1f77b4", 3)):
            values = runs.get(run)
            if values is None:
                continue
            steps = [i + 1 for i, v in enumerate(values) if v is not None]
            ax.plot(steps, [values[i - 1] for i in steps], style, color=colour, lw=1.6, zorder=z,
                    marker="o" if run == "guided" else None, markersize=2.5, label=run)
        ax.set_title(term + ("\n" + LOSS_NOTE[term] if term in LOSS_NOTE else ""), fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("denoising pass", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("loss (lower is better)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
