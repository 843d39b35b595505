"""The app through its named API endpoints (gradio_client), as a script or another program uses it."""

from __future__ import annotations

import json
import zipfile

import pytest
from gradio_client import Client

from apphelpers import running_app
from binding.records import load_run
from binding.settings import RANGES

pytestmark = pytest.mark.slow  # a real server (and a browser)

@pytest.fixture(scope="module")
def client():
    with running_app("tiny") as (url, served_s):
        print(f"app served after {served_s:.1f} s")
        yield Client(url, verbose=False)


def test_parse_endpoint(client):
    parse_html, pairs, tokens_html, notice, analysis, problems, stale = client.predict("a dog and a small dog",
                                                                                     api_name="/parse")
    assert "displacy" in parse_html and "en_core_web" in parse_html
    assert pairs["data"] == [[True, "small", "dog#2"]]
    assert analysis["bindings"][0]["noun"]["start"] == 18
    assert ">6<" in tokens_html.replace("<sub>", ">").replace("</sub>", "<")  # token positions shown
    assert problems == "" and stale == ""


def test_parse_endpoint_shows_markup_as_text_and_refuses_non_text(client):
    parse_html, _, tokens_html, _, _, _, _ = client.predict('<script>alert("x")</script> a red car', api_name="/parse")
    assert "<script" not in parse_html and "<script" not in tokens_html
    assert "&lt;" in parse_html
    _, pairs, _, notice, _, _, _ = client.predict("x" * 10_001, api_name="/parse")
    assert "cannot be used" in notice and "characters long" in notice and pairs["data"] in ([], [[None, None, None]],
                                                                                           [["", "", ""]])


def test_live_parse_route_answers_as_the_parse_event_does(client):
    """The page's live parse (a JSON route outside Gradio's events): the same view as /parse, in the form the
    browser's components take; a bad body is refused with the reason, not a trace."""
    import httpx

    from binding.lab import LIVE_PARSE_PATH

    url = client.src.rstrip("/") + LIVE_PARSE_PATH
    r = httpx.post(url, json={"prompt": "a dog and a small dog"})
    assert r.status_code == 200
    live = r.json()
    parse_html, pairs, tokens_html, notice, analysis, _, _ = client.predict("a dog and a small dog", api_name="/parse")
    assert live["pairs"]["data"] == pairs["data"] == [[True, "small", "dog#2"]]
    assert live["pairs"]["headers"] == pairs["headers"]
    assert live["analysis"] == analysis and live["notice"] == notice and live["tokens_html"] == tokens_html
    assert live["parse_html"].split("<svg")[0] == parse_html.split("<svg")[0] and "displacy" in live["parse_html"]
    for body, status, reason in ((b"not json", 400, "JSON"), (b'{"prompt": 3}', 400, "JSON"),
                                 (b'{"prompt": "\xff"}', 400, "UTF-8"),
                                 (b'{"prompt": "' + b"a" * 70_000 + b'"}', 413, "bytes")):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and reason in r.json()["error"], (body[:20], r.status_code, r.text[:200])
    r = httpx.post(url, content=b'{"prompt": "\\ud800 a red car"}')  # a lone surrogate: a notice, not a trace
    assert r.status_code == 200 and "cannot be used" in r.json()["notice"]


def test_api_output_names_are_short(client):
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/parse", "/generate", "/compare"):
        labels = [r["label"] for r in info[name]["returns"]]
        assert all(len(label) <= 20 and not label.startswith("value_") for label in labels), (name, labels)


def generate(client, prompt="a red apple and a green banana", rows=None, method="SynGen", terms=None, steps=8,
             intervention=4, step_size=20, guidance=7.5, seed=3, randomize=False, api_name="/generate"):
    terms = ["syngen_positive", "syngen_negative"] if terms is None else terms
    data = rows if rows is not None else [[True, "red", "apple"], [True, "green", "banana"]]
    rows = {"headers": ["use", "modifiers", "noun"], "data": data}
    return client.predict(prompt, rows, "tiny", method, terms, steps, intervention, step_size, guidance, seed, randomize,
                          api_name=api_name)


def test_generate_endpoint(client, tmp_path):
    vanilla, guided, summary, maps, caption, overlaps, loss_plot, files, seed, problems, stale = generate(client)
    assert seed == 3 and "seed 3" in summary and "syngen" in summary and "Pass 9 of 9" in caption
    assert [r[0] for r in overlaps["data"]] == ["red → apple", "green → banana"]
    names = sorted(f.rsplit("/", 1)[-1] for f in files)
    assert names == ["guided-seed3.png", "run-seed3.zip", "side-by-side-seed3.png", "vanilla-seed3.png"]
    archive = next(f for f in files if f.endswith(".zip"))
    with zipfile.ZipFile(archive) as z:
        assert {"run.json", "run.npz", "vanilla.png", "guided.png"} <= set(z.namelist())
        meta = json.loads(z.read("run.json"))
    assert meta["seed"] == 3 and meta["settings"]["steps"] == 8
    record = load_run(archive)
    assert record.guided_latents is not None and record.vanilla_maps.shape[0] == 9  # PNDM: steps + 1 loop steps
    assert record.vanilla_layer_maps.shape[:2] == (9, len(meta["settings"]["read_layers"]))
    assert abs(record.guided_latents - record.vanilla_latents).max() > 0  # the guidance changed the run


def test_compare_endpoint_runs_every_method_from_one_seed(client):
    image, table, seed = client.predict("a red apple and a green banana", api_name="/compare")
    assert seed == 0 and [r[0] for r in table["data"]] == ["Vanilla", "SynGen", "Divide & Bind", "Attend-and-Excite"]
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("  ", api_name="/compare")
    with pytest.raises(Exception, match="Inference steps"):
        client.predict("a red apple", {"headers": ["use", "modifiers", "noun"], "data": []}, "tiny", 0, 7.5, 0,
                       False, api_name="/compare")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"rows": [[True, "purple", "apple"]]}, "'purple' is not a word of the prompt"),
        ({"steps": 500}, f"Inference steps: Value 500 is greater than maximum value {RANGES['steps'].hi:g}"),
        ({"step_size": None}, "Step size must be a number"),
        ({"intervention": 9, "steps": 4, "method": "Bogus"}, "Bogus"),
    ],
)
def test_generate_refuses_bad_input_with_a_message_naming_the_field(client, kwargs, message):
    with pytest.raises(Exception, match=message):
        generate(client, **kwargs)
