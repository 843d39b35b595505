"""Pictures: the parse SVG is well-formed and shows any prompt text as text."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from binding.analysis import analyze
from binding.render import parse_svg


def elements(svg: str) -> list[str]:
    return [e.tag.rsplit("}", 1)[-1] for e in ET.fromstring(svg).iter()]


@pytest.mark.parametrize(
    "prompt",
    [
        'a <script>alert("x")</script> red car',
        "a red <img src=x onerror=alert(1)> car & a blue ]]> bird",
        "a <svg><foreignObject>bad</foreignObject></svg> red car",
        "a red\x00\x0b car",
    ],
)
def test_markup_in_prompt_renders_as_text(prompt, nlp):
    svg = parse_svg(analyze(prompt, nlp))
    tags = elements(svg)  # parses: the SVG is well-formed XML
    assert set(tags) <= {"svg", "text", "tspan", "g", "path", "textPath"}
    shown = "".join(e.text or "" for e in ET.fromstring(svg).iter() if e.tag.endswith("tspan"))
    assert "<" in shown or "\ufffd" in shown  # the markup characters are there, as text


def test_parse_svg_draws_every_word_and_arc(nlp):
    result = analyze("a checkered bowl on a red and blue table", nlp)
    root = ET.fromstring(parse_svg(result))
    words = [e.text for e in root.iter() if e.get("class") == "displacy-word"]
    labels = [e.text for e in root.iter() if e.tag.endswith("textPath")]
    assert words == [w.text for w in result.words]
    assert sorted(labels) == sorted(t.dep_ for t in result.doc if t.head.i != t.i)


def test_empty_prompt_gives_empty_svg(nlp):
    assert elements(parse_svg(analyze("", nlp))) == ["svg"]


def test_evidence_grid_places_heat_where_the_map_is_on_a_comparable_scale():
    import numpy as np
    from PIL import Image

    from binding.analysis import Word
    from binding.render import evidence_grid, heat_overlay, latent_previews, loss_plot

    maps = np.zeros((4, 4, 4), dtype=np.float32)
    maps[:, :2, 1] = 0.4  # "red" on the left half
    maps[:, :, 2] = 0.1  # "car" faint everywhere
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    tile = np.asarray(heat_overlay(grey, maps[..., 1], opacity=1.0, cmap="gray"), dtype=float)
    assert tile[:, :8].mean() > 200 and tile[:, -8:].mean() < 120  # zero heat: the picture, dimmed
    words = [Word("red", 0, 3, (1,)), Word("car", 4, 7, (2,)), Word("cut", 8, 11, ())]
    rows = [("vanilla", grey, maps), ("guided", grey, maps * 0.5)]
    grid = evidence_grid(rows, words, cell=40, scale="shared", cmap="gray", opacity=1.0)
    assert grid.size == (90 + 2 * 44 + 58, 30 + 2 * (40 + 4) + 4)  # a header, two rows, a colour bar
    g = np.asarray(grid.convert("L"), dtype=float)
    red_v, red_g = g[30:70, 90:110].mean(), g[74:114, 90:110].mean()
    assert red_v > red_g + 40  # shared scale: the guided row's half-strength map is drawn darker
    per_row = np.asarray(evidence_grid(rows, words, cell=40, scale="row", cmap="gray", opacity=1.0).convert("L"), float)
    assert abs(per_row[30:70, 90:110].mean() - per_row[74:114, 90:110].mean()) < 5  # each row on its own scale
    masked = evidence_grid(rows, words, cell=40, mask=True)
    assert masked.size[0] == 90 + 2 * 44  # no colour bar for masks
    final = Image.new("RGB", (8, 8), (200, 10, 10))
    z = np.random.default_rng(0).normal(size=(1, 4, 2, 2))
    (preview,) = latent_previews(z[None, 0], z, final, size=8)
    assert np.abs(np.asarray(preview, float) - np.asarray(final, float)).max() < 30  # the fit reproduces the end
    plot = loss_plot({"syngen": [1.0, 0.5, None]})
    assert plot.size[0] > 100 and np.asarray(plot).std() > 0
