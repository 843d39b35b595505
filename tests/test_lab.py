"""What the app shows, without a browser: prompt views, edited pairs, request checks, run views."""

from __future__ import annotations

import pytest

from binding import lab, views


def request(**kw):
    args = dict(prompt="a red apple and a green banana", rows=[[True, "red", "apple"], [True, "green", "banana"]],
                model="tiny", method_label="SynGen", terms=["syngen_positive", "syngen_negative"], steps=6,
                intervention_steps=3, step_size=20, guidance_scale=7.5, seed=1, randomize_seed=False)
    args.update(kw)
    return lab.GenerationRequest.from_ui(**args)


def test_prompt_view_escapes_and_colours():
    view = lab.prompt_view("<b>x</b> a red apple")
    assert "<b>x" not in view.parse_html and "<b>x" not in view.tokens_html
    assert view.rows == [[True, "red", "apple"]]
    assert "font-weight:bold" in view.tokens_html  # bound words stand out


def test_truncation_notice():
    view = lab.prompt_view(" ".join(["a red car and"] * 30))
    assert "longer than CLIP reads" in view.tokens_html
    assert "77-token limit" in view.notice


def test_edited_rows_switched_off_and_problems():
    analysis = lab.prompt_view("a dog and a small dog").analysis
    rows = [[False, "small", "dog"], [True, "small", "dog#1"], ["true", "", "dog#2"]]
    bindings, problems, notes = lab.edited_bindings(analysis, rows)
    assert [(b.noun.start, b.modifiers[0].text) for b in bindings] == [(2, "small")]
    assert problems == ["row 3: no modifier given for 'dog#2'"] and notes == []
    # a row added through the table's menu has no tick yet: it is used, not ignored silently
    bindings, problems, _ = lab.edited_bindings(analysis, [[None, "small", "dog#2"]])
    assert [b.noun.start for b in bindings] == [18] and not problems
    # two rows onto one noun merge, and say so
    a = lab.prompt_view("a red and green apple").analysis
    bindings, problems, notes = lab.edited_bindings(a, [[True, "red", "apple"], [True, "green", "apple"]])
    assert [m.text for m in bindings[0].modifiers] == ["red", "green"] and not problems
    assert notes == ["rows 1, 2 all bind 'apple': their modifiers are merged (red, green)"]
    assert "<" not in lab.problems_markdown(["row 1: '<script>' is not a word"]).replace("&lt;", "")


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"prompt": "  "}, "prompt is empty"),
        ({"model": "sd-9"}, "Model 'sd-9' is not offered here"),
        ({"model": "arch:sd-1.5"}, "is not offered here"),  # random weights: benchmarks only
        ({"method_label": "Magic"}, "Unknown method"),
        ({"terms": ["telepathy"]}, "Unknown loss term"),
        ({"steps": 0}, "inference steps must be from 1 to"),
        ({"steps": float("nan")}, "inference steps must be a whole number"),
        ({"step_size": -1}, "step size"),
        ({"guidance_scale": 99}, "guidance scale"),
        ({"rows": [[True, "purple", "apple"]]}, "'purple' is not a word of the prompt"),
        ({"intervention_steps": -2}, "intervention steps must be from 0"),
    ],
)
def test_bad_requests_say_what_is_wrong(kw, message):
    with pytest.raises(ValueError, match="(?i)" + message):
        request(**kw)


def test_request_warnings_and_clamping():
    job = request(intervention_steps=50, rows=[], terms=["syngen_positive"])
    assert job.intervention_steps == job.steps == 6
    assert any("exceed" in w for w in job.warnings) and any("nothing to bind" in w for w in job.warnings)
    assert any("vanilla" in w for w in request(terms=[]).warnings)
    seeds = {request(randomize_seed=True).seed for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)


def test_method_presets_and_custom():
    s = lab.method_settings("Attend-and-Excite")
    assert s["terms"] == ["ae_excite"] and s["step_size"] == 20.0 and s["intervention_steps"] == 25
    assert lab.method_settings(lab.CUSTOM) is None
    assert lab.terms_match("SynGen", ["syngen_negative", "syngen_positive"])
    assert not lab.terms_match("SynGen", ["syngen_positive"])


def test_shapes_verdict_names_leaks_and_misses():
    from binding.shapes.world import layout_scene

    right = layout_scene([("red", "circle"), ("blue", "square")], 1).array()
    v = views.shapes_verdict(right, "a red circle and a blue square")
    assert v.startswith("sees ") and "red circle" in v and "blue square" in v
    assert v.endswith("→ every object in its own colour ✓")
    leak = layout_scene([("red", "circle"), ("red", "square")], 1).array()
    v = views.shapes_verdict(leak, "a red circle and a blue square")
    assert "the square took another object's colour (leak)" in v and v.endswith("✗")
    miss = layout_scene([("red", "circle")], 1).array()
    assert "no square" in views.shapes_verdict(miss, "a red circle and a blue square")
    wrong = layout_scene([("red", "circle"), ("green", "square")], 1).array()
    assert "the square is not blue" in views.shapes_verdict(wrong, "a red circle and a blue square")
    assert views.shapes_verdict(right, "a red apple and a green banana") is None  # outside the world: no verdict


def test_run_view_end_to_end():
    from binding.serving import run_job

    job = request()
    results = {e.method: e.result for e in run_job(job.job()) if e.kind == "result"}
    result = lab.pair_result(results, job.method)
    assert result.vanilla_image is results["vanilla"].vanilla_image and result.guided_image is not None
    view = views.run_view(result, step=2, opacity=0.3)
    assert view.n_steps == 7  # PNDM runs steps + 1
    assert [row[0] for row in view.overlaps] == ["red → apple", "green → banana"]
    assert all(0 <= row[2] <= 1 and 0 <= row[4] <= 1 for row in view.overlaps)
    assert view.grid.size[0] > 500
    maps = views.maps_view(result, step=2, view="step", scale="shared")
    assert "Pass 2 of 7" in maps.caption and "one colour scale for all" in maps.caption
    content = views.display_words(result_analysis := lab.prompt_view(result.prompt).analysis)
    assert [w.text for w in content] == ["red", "apple", "green", "banana"]  # no "a", "and"
    assert len(views.display_words(result_analysis, function_words=True)) == 7
    layers = result.settings["read_layers"]
    one = views.maps_view(result, step=2, layers=layers[:1])
    assert f"1 of {len(layers)} read layers" in one.caption
    image, rows = views.compare_view({"vanilla": results["vanilla"], "syngen": results["syngen"]}, result.prompt)
    assert [r[0] for r in rows] == ["Vanilla", "SynGen"] and image.width > 2 * 192


def test_measured_examples_drive_the_shapes_examples_seeds_and_fix_rates(monkeypatch, tmp_path):
    """The teaching model's examples, their seeds and the "fixes k of n" line all come from one measured table
    (``teach examples`` output); without it the preset's examples stand."""
    import json
    from types import SimpleNamespace

    from binding.evaluation.report import shapes_examples
    from binding.models import PRESETS
    from binding.shapes import model as shapes_model

    monkeypatch.setattr(shapes_model, "SHAPES_DIR", tmp_path)
    assert lab.examples_for("shapes") == list(PRESETS["shapes"].examples)
    rows = []
    # prompt A: vanilla leaks on seeds 0-3, SynGen binds seeds 1 and 2; prompt B: SynGen fixes nothing
    for prompt, fixed in (("a red star and a blue circle", {1, 2}), ("a pink square and a green star", set())):
        for seed in range(4):
            rows.append({"method": "vanilla", "prompt": prompt, "seed": seed, "bound_all": False, "leak_any": True})
            rows.append({"method": "syngen", "prompt": prompt, "seed": seed, "bound_all": seed in fixed,
                         "leak_any": seed not in fixed})
    table = shapes_examples(rows, ["syngen"], "syngen", n_examples=1)
    (tmp_path / "examples.json").write_text(json.dumps(table), encoding="utf-8")
    assert lab.examples_for("shapes") == ["a red star and a blue circle"]
    assert lab.examples_for("tiny") == list(PRESETS["tiny"].examples)
    assert lab.example_seed("shapes", "a red star and a blue circle") == 1
    assert lab.example_seed("tiny", "a red star and a blue circle") == 0
    run = SimpleNamespace(prompt="a red star and a blue circle", settings={"model": "shapes", "method": "syngen"})
    assert "leaks on 4 of 4 seeds" in lab.fix_rate_line(run) and "fixes 2 of those" in lab.fix_rate_line(run)


def test_lesson_sentences_say_what_the_run_measured():
    """The lesson's "why" and "fix" sentences are read off the run's maps (the least well-placed colour word, its
    overlaps before and after) and the measured table's totals, never a fixed claim."""
    from types import SimpleNamespace

    import numpy as np

    from binding import lesson
    from binding.analysis import analyze

    a = analyze("a yellow star and a blue triangle")
    pos = {w.text: w.token_indices[0] for b in a.bindings for w in (b.noun, *b.modifiers)}
    left, right = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32)
    left[:, :2], right[:, 2:] = 1, 1

    def maps(yellow_on):  # star on the left, triangle on the right; "blue" on the triangle
        m = np.zeros((3, 4, 4, 77), np.float32)
        for word, where in (("star", left), ("triangle", right), ("blue", right), ("yellow", yellow_on)):
            m[..., pos[word]] = where
        return m

    runs = {"vanilla": maps(right), "guided": maps(left)}
    r = SimpleNamespace(maps=runs.get, bindings=a.bindings, subjects=list(a.nouns), settings={"intervention_steps": 2})
    why = lesson._where_maps_lie(r, "vanilla")
    assert "*yellow* lies on the triangle (overlap 1.00) more than on its own star (0.00)" in why
    assert "overlaps its star 1.00 (was 0.00) and the triangle 0.00 (was 1.00)" in lesson._how_maps_moved(r)
    assert "already lies mostly on its own star" in lesson._where_maps_lie(r, "guided")
    table = {"prompts": {"p": {"seeds": 8, "vanilla_unbound": 5, "fixed": {"syngen": 3}},
                         "q": {"seeds": 8, "vanilla_unbound": 2, "fixed": {"syngen": 0}}}}
    assert "over the 2 held-out prompts x 8 seeds, SynGen fixed 3 of the 7 pictures" in lesson._measured_rate(
        table, "syngen", "SynGen")
    assert lesson._measured_rate({}, "syngen", "SynGen") == ""
