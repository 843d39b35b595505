"""Evaluation: each metric on inputs with a known answer, the statistics, the resumable grid runner on the tiny
model, and the same grid split across two processes with accelerate (equal to one process)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from binding.analysis import Binding, Word
from binding.evaluation.metrics import (
    ClipUnavailable,
    attention_metrics,
    clip_scores,
    clip_similarities,
    load_clip,
    noun_peaks,
    prompt_parts,
    shapes_scores,
)
from binding.evaluation.report import summarize, write_report
from binding.evaluation.runner import Item, collect_rows, plan_items, run_eval
from binding.evaluation.stats import bootstrap_ci
from binding.records import load_run
from binding.shapes import world

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------- attention


def _w(text, start, idx):
    return Word(text, start, start + len(text), (idx,))


# "a red cat and a dog": SOT 0, a 1, red 2, cat 3, and 4, a 5, dog 6, EOT 7
RED, CAT, DOG = _w("red", 2, 2), _w("cat", 6, 3), _w("dog", 16, 6)
BIND = [Binding(CAT, (RED,))]


def _maps(red_on_cat: float, dog_peak: float = 1.0) -> np.ndarray:
    """4x4 maps: cat on the left half, dog on the right; red split between them as asked."""
    m = np.zeros((4, 4, 8), dtype=np.float32)
    m[..., 0] = 1.0  # SOT everywhere (renormalised away for peaks)
    m[:, :2, 3] = 1.0
    m[:, 2:, 6] = dog_peak
    m[:, :2, 2] = red_on_cat
    m[:, 2:, 2] = 1.0 - red_on_cat
    return m


def test_attention_leakage_and_neglect_on_known_maps():
    bound = attention_metrics(_maps(1.0), BIND, [CAT, DOG])
    assert bound["attn_own"] == pytest.approx(1.0) and bound["attn_leakage"] == pytest.approx(0.0)
    assert bound["attn_margin"] == pytest.approx(1.0)
    half = attention_metrics(_maps(0.5), BIND, [CAT, DOG])
    assert half["attn_leakage"] == pytest.approx(0.5) and half["attn_margin"] == pytest.approx(0.0)
    leaked = attention_metrics(_maps(0.0), BIND, [CAT, DOG])
    assert leaked["attn_leakage"] == pytest.approx(1.0) and leaked["pairs"][0]["other_noun"] == "dog"
    # neglect: a weak dog map loses its pixels to the red modifier after renormalisation over the text tokens
    weak = noun_peaks(_maps(0.0, dog_peak=0.1), [CAT, DOG])
    assert weak["cat@6"] == pytest.approx(1.0) and weak["dog@16"] == pytest.approx(0.1 / 1.1)
    assert attention_metrics(_maps(0.0, 0.1), BIND, [CAT, DOG])["attn_min_peak"] == pytest.approx(0.1 / 1.1)
    none = attention_metrics(_maps(1.0), [], [CAT, DOG])  # no modifier: nothing leaks, no made-up zero
    assert none["attn_leakage"] is None and none["attn_own"] is None
    assert none["attn_min_peak"] == pytest.approx(0.5)  # cat shares its pixels with red


# ------------------------------------------------------------------------------------------ CLIP


def test_prompt_parts():
    assert prompt_parts("a cat and a red backpack") == ["a cat", "a red backpack"]
    assert prompt_parts("a lion with a crown") == ["a lion", "a crown"]
    assert prompt_parts("a sliced banana and a camera and a frog") == ["a sliced banana", "a camera", "a frog"]
    assert prompt_parts("a sandwich") == ["a sandwich"]


@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from binding.tokenizer import load_tokenizer

    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, processor, load_tokenizer()


def _image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_clip_scores_full_prompt_and_min_over_parts(tiny_clip):
    model, proc, tok = tiny_clip
    img = _image()
    prompt = "a cat and a red backpack"
    s = clip_scores(model, proc, tok, img, prompt)
    sims = clip_similarities(model, proc, tok, img, [prompt, "a cat", "a red backpack"])
    assert s["clip_full"] == pytest.approx(sims[0]) and s["clip_min"] == pytest.approx(sims[1:].min())
    assert np.all(np.abs(sims) <= 1.0 + 1e-6) and len(set(np.round(sims, 6))) == 3  # texts differ, scores differ
    one = clip_scores(model, proc, tok, img, "a sandwich")
    assert one["clip_min"] == one["clip_full"]
    assert clip_scores(model, proc, tok, _image(1), prompt)["clip_full"] != pytest.approx(s["clip_full"])


def test_load_clip_from_a_folder_and_clear_skips(tiny_clip, tmp_path):
    model, proc, tok = tiny_clip
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    scorer = load_clip(str(tmp_path / "clip"))
    img = _image()
    assert scorer(img, "a cat and a dog") == pytest.approx(clip_scores(model, proc, tok, img, "a cat and a dog"), abs=1e-6)
    with pytest.raises(ClipUnavailable, match="turned off"):
        load_clip("none")
    with pytest.raises(ClipUnavailable, match="cannot load CLIP weights"):
        load_clip(str(tmp_path / "no-such-folder"))


# ---------------------------------------------------------------------------------------- shapes


def test_shapes_scores_read_the_world_exactly():
    scene = world.layout_scene([("red", "circle"), ("blue", "square")], seed=1)
    img = Image.fromarray(world.render(scene))
    good = shapes_scores(img, "a red circle and a blue square")
    assert good == {"shapes_present_all": 1.0, "shapes_bound_all": 1.0, "shapes_leak_any": 0.0}
    swapped = shapes_scores(img, "a blue circle and a red square")
    assert swapped == {"shapes_present_all": 1.0, "shapes_bound_all": 0.0, "shapes_leak_any": 1.0}
    assert shapes_scores(img, "a cat and a dog") is None


# ------------------------------------------------------------------------------------ statistics


def test_bootstrap_is_seeded_covers_the_mean_and_matches_teach():
    from binding.evaluation.stats import bootstrap_paired

    rng = np.random.default_rng(1)
    g, v = rng.normal(0.3, 1, 60), rng.normal(0, 1, 60)
    cl = np.repeat(np.arange(15), 4)
    lo, hi = bootstrap_ci(g - v, cl)
    assert (lo, hi) == bootstrap_ci(g - v, cl) and lo < np.mean(g - v) < hi
    assert (lo, hi) == pytest.approx(bootstrap_paired(g, v, cl))
    assert bootstrap_ci(np.full(10, 2.0)) == (2.0, 2.0)


def _row(method, p, s, **metrics):
    return {"method": method, "prompt_index": p, "seed": s, "group": "g" if p < 2 else "h", "metrics": metrics}


def test_summarize_pairs_by_prompt_and_seed():
    rows = [_row("vanilla", p, s, attn_leakage=0.5, clip_full=0.2) for p in range(3) for s in range(2)]
    rows += [_row("syngen", p, s, attn_leakage=0.5 - 0.1 * p, clip_full=None) for p in range(3) for s in range(2)]
    rows.append(_row("syngen", 9, 0, attn_leakage=0.0))  # no vanilla partner: in the mean, not in the difference
    out = summarize(rows, ["vanilla", "syngen"])
    e = out["all"]["syngen"]["attn_leakage"]
    assert e["n"] == 7 and e["paired_n"] == 6 and e["diff"] == pytest.approx(-0.1)
    assert e["mean"] == pytest.approx((0.5 * 2 + 0.4 * 2 + 0.3 * 2 + 0.0) / 7)
    assert e["diff_ci"][0] <= -0.1 <= e["diff_ci"][1]
    assert out["all"]["syngen"]["clip_full"]["n"] == 0 and out["all"]["syngen"]["clip_full"]["mean"] is None
    assert out["g"]["syngen"]["attn_leakage"]["diff"] == pytest.approx(-0.05)
    assert "diff" not in out["all"]["vanilla"]["attn_leakage"]


def test_plan_items_runs_vanilla_once_per_prompt_and_seed():
    items = plan_items(2, [0, 1], ["syngen", "vanilla", "attend-excite"])
    assert len(items) == 12 and items[0] == Item(0, 0, "vanilla") and items[1] == Item(0, 0, "syngen")
    assert sum(i.method == "vanilla" for i in items) == 4
    assert Item(3, 5, "syngen").key == "p0003-s5-syngen" and Item(3, 5, "syngen").baseline.key == "p0003-s5-vanilla"


# ------------------------------------------------------------------------------------ the runner

PROMPTS = "a red cat and a blue dog\na yellow apple and a green chair\n"
GRID = ["--methods", "syngen", "--seeds", "0-1", "--model", "tiny", "--steps", "2", "--clip", "none"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The 2 prompts x 2 seeds x (vanilla, syngen) grid in this process, one thread (as the 2-process run)."""
    d = tmp_path_factory.mktemp("eval")
    (d / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        logs = []
        done = run_eval(str(d / "prompts.txt"), d / "out", methods=["syngen"], seeds=[0, 1], model="tiny",
                        steps=2, clip="none", progress=False, log=logs.append)
        summary = write_report(done, log=logs.append)
    finally:
        torch.set_num_threads(threads)
    return d, summary, logs


def test_eval_writes_items_report_and_grids(single_run):
    d, summary, logs = single_run
    out = d / "out"
    rows = collect_rows(out)
    assert sorted(r["item"] for r in rows) == sorted(i.key for i in plan_items(2, [0, 1], ["syngen"]))
    r = next(r for r in rows if r["item"] == "p0000-s1-syngen")
    assert r["paired_with"] == "p0000-s1-vanilla" and r["prompt"] == "a red cat and a blue dog"
    assert r["skipped"]["clip"].startswith("CLIP score skipped: turned off")
    assert set(r["metrics"]) == {"attn_own", "attn_leakage", "attn_margin", "attn_min_peak"}
    run = load_run(out / "items" / "p0000-s1-syngen" / "run")
    assert run.guided_image is not None and run.vanilla_latents is None and run.settings["method"] == "syngen"
    report = (out / "report.md").read_text()
    assert "CLIP score skipped" in report and "| syngen | 4 |" in report and "grids/p0001.png" in report
    import re

    timing = re.search(r"seconds per item \(generation, mean\): vanilla ([\d.]+), syngen ([\d.]+)\.", report)
    assert timing and float(timing[1]) > 0 and float(timing[2]) > 0  # one figure per method
    for f in ("plots/means.png", "plots/paired_diffs.png", "grids/p0000.png", "grids/p0001.png", "summary.json"):
        assert (out / f).is_file(), f
    assert Image.open(out / "grids" / "p0000.png").size == (96 + 2 * (128 + 4), 30 + 2 * (128 + 4))  # 4 px gaps
    # SynGen pulls "red" onto "cat": the paired leakage difference has a sign, and the vanilla side has none
    assert summary["all"]["syngen"]["attn_leakage"]["paired_n"] == 4
    assert "CLIP score skipped" in "\n".join(logs)


def test_guided_item_equals_the_paired_sampler_call(single_run):
    """A method's item (guided run alone) starts from vanilla's latents: same as one paired sampler call."""
    from binding.guidance import GuidedSampler
    from binding.models import load_pipeline

    d, _, _ = single_run
    item = load_run(d / "out" / "items" / "p0000-s1-syngen" / "run")
    vanilla = load_run(d / "out" / "items" / "p0000-s1-vanilla" / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (both,) = GuidedSampler(load_pipeline("tiny"))("a red cat and a blue dog", [1], "syngen", steps=2)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(both.guided_latents, item.guided_latents)
    assert np.array_equal(both.vanilla_latents, vanilla.vanilla_latents)
    assert not np.array_equal(both.guided_latents, both.vanilla_latents)


def test_rerun_skips_done_items_and_redoes_only_the_missing_one(single_run, tmp_path):
    d, _, _ = single_run
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("items/*/metrics.json")}
    shutil.rmtree(out / "items" / "p0001-s0-syngen")  # as if interrupted while writing it
    (out / "items" / ".p0001-s0-syngen.abc.tmp").mkdir()  # the half-written leftover is not an item
    logs = []
    run_eval(str(d / "prompts.txt"), out, methods=["syngen"], seeds=[0, 1], model="tiny", steps=2, clip="none",
             progress=False, log=logs.append)
    assert "7 done, 1 to run" in logs[0]
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("items/*/metrics.json")}
    assert len(after) == 8 and all(after[k] == v for k, v in before.items() if k != "p0001-s0-syngen")
    with pytest.raises(ValueError, match="other settings.*steps"):
        run_eval(str(d / "prompts.txt"), out, methods=["syngen"], seeds=[0], model="tiny", steps=3, clip="none",
                 progress=False, log=logs.append)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_accelerate_equal_one_process(single_run):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): each process runs half of the items;
    the merged items equal the single-process run's, metrics and latents."""
    d, summary, _ = single_run
    out = d / "out2"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "binding", "eval",
           "--set", str(d / "prompts.txt"), *GRID, "--threads", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "to run on 2 process(es)" in proc.stdout
    one = {r["item"]: r for r in collect_rows(d / "out")}
    two = {r["item"]: r for r in collect_rows(out)}
    assert set(two) == set(one) and {r["process"] for r in two.values()} == {0, 1}
    strip = lambda r: {k: v for k, v in r.items() if k not in ("process", "time_s")}  # noqa: E731
    assert all(strip(two[k]) == strip(one[k]) for k in one)
    for k in one:
        a, b = load_run(d / "out" / "items" / k / "run"), load_run(out / "items" / k / "run")
        side = "vanilla" if k.endswith("vanilla") else "guided"
        assert np.array_equal(getattr(a, f"{side}_latents"), getattr(b, f"{side}_latents")), k
    assert json.loads((out / "summary.json").read_text())["summary"] == json.loads(
        (d / "out" / "summary.json").read_text())["summary"]
