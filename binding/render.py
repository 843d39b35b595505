"""Pictures for people: the dependency parse as SVG (and, later, heatmaps and plots).

Kept apart from the analysis, as spaCy keeps displacy apart from its pipeline.
"""

from __future__ import annotations

import re

from binding.analysis import Analysis

# Characters that are not allowed in XML 1.0; a prompt may contain them, an SVG may not.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def parse_svg(analysis: Analysis, compact: bool = True) -> str:
    """The dependency parse drawn by displacy, safe to embed in a page whatever the prompt says.

    displacy escapes every word it draws; we also drop characters XML forbids, so markup or script in a
    prompt shows up as text and never as an element. The SVG is wide by design: embed it in a container
    that scrolls horizontally.
    """
    from spacy import displacy

    doc = analysis.doc
    if doc is None or not len(doc) or not analysis.prompt.strip():
        return '<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"></svg>'
    words = [{"text": _XML_INVALID.sub("\ufffd", t.text), "tag": t.pos_} for t in doc if not t.is_space]
    index = {t.i: k for k, t in enumerate(t for t in doc if not t.is_space)}
    arcs = []
    for t in doc:
        if t.is_space or t.head.i == t.i or t.head.is_space:
            continue
        a, b = index[t.i], index[t.head.i]
        arcs.append({"start": min(a, b), "end": max(a, b), "label": t.dep_, "dir": "left" if a < b else "right"})
    options = {"compact": compact, "distance": 110 if compact else 150, "offset_x": 40, "word_spacing": 30}
    return displacy.render({"words": words, "arcs": arcs}, style="dep", manual=True, jupyter=False, options=options)
