"""Evaluation: every (prompt, method, seed) of a prompt set, its metrics, and a report with paired intervals.

Why this shape. A comparison of guidance methods is only fair on the same initial latents, so every method is
paired with vanilla by (prompt, seed): vanilla runs once per (prompt, seed) and each method's item names the
vanilla item it is compared with. The grid is long (276 prompts x 64 seeds x 4 methods in the papers), so
every item is written atomically as soon as it is made, a rerun skips what is on disk, and under
``accelerate launch`` the items are split across processes with accelerate's own ``split_between_processes``.
The report is computed from the files on disk only, so a merged multi-process run and a single-process run
give the same report.

On disk (``DIR``)::

    eval_config.json      the settings; a rerun with other settings is refused (use another DIR)
    prompts.json          the set: index, text, group, bindings, nouns
    items/p0003-s5-syngen/
        run/              the run record (``binding.records.save_run``): guided.png (vanilla.png for vanilla)...
        metrics.json      this item's metrics, its pairing (``paired_with``) and what was skipped and why
    report.md, summary.json, plots/*.png, grids/p0003.png

An item folder is built in a hidden temporary folder and renamed into place, so it exists only complete.

Metrics (pure functions, each of one image or one map stack):

- attention (``attention_metrics``), no extra model: per (modifier, noun) pair, the overlap of the modifier's
  map with its own noun's map and with the closest other noun's (``binding.metrics.binding_overlaps``);
  ``attn_leakage`` = other / (own + other) (0: all on its own noun, 0.5: as much on another); and each noun's
  peak after A&E's renormalisation over the text tokens (``attn_min_peak``: the most neglected noun). Maps are
  the item's run averaged over all steps (DAAM-style).
- CLIP (``clip_scores``): cosine similarity of the image with the full prompt and the minimum over the prompt's
  parts split on " and " / " with " (A&E's full-prompt and min-object similarity). Needs CLIP weights
  (``--clip`` hub id or folder); without them the report says why it skipped them.
- shapes (``shapes_scores``): the teaching world's exact scorer (every object present, every object in its own
  colour, a colour leak), for prompts in the world's grammar; meaningful on the shapes model only.

Statistics (``summarize``): per group and method the mean of each metric with a 95% percentile bootstrap
interval, and for each method the mean paired difference from vanilla over the (prompt, seed) pairs both have,
with its bootstrap interval. The bootstrap resamples whole prompts (images of one prompt share its difficulty,
so they are not independent), 2000 resamples from ``numpy.random.default_rng(0)``: the same rows give the
same intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from binding.metrics import binding_overlaps, word_map
from binding.stats import bootstrap_ci

__all__ = [
    "ClipScorer",
    "ClipUnavailable",
    "DEFAULT_CLIP",
    "EVAL_METHODS",
    "Item",
    "METRICS",
    "add_eval_command",
    "attention_metrics",
    "bootstrap_ci",
    "clip_scores",
    "clip_similarities",
    "collect_rows",
    "format_summary",
    "load_clip",
    "noun_peaks",
    "plan_items",
    "prompt_grid",
    "prompt_parts",
    "run_eval",
    "shapes_scores",
    "summarize",
    "write_report",
]

EVAL_METHODS = ("vanilla", "syngen", "divide-bind", "attend-excite")
DEFAULT_CLIP = "openai/clip-vit-base-patch16"  # the papers' ViT-B/16
GRID_SEEDS = 8  # columns of a prompt's grid image
GRID_CELL = 128  # pixels per image in a grid

# name -> (what it measures, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "attn_own": ("overlap of each modifier's map with its noun's", True),
    "attn_leakage": ("share of a modifier's overlap that falls on another noun", False),
    "attn_margin": ("own - other overlap", True),
    "attn_min_peak": ("peak attention of the most neglected noun", True),
    "clip_full": ("CLIP cosine, image vs full prompt", True),
    "clip_min": ("CLIP cosine, image vs its worst prompt part", True),
    "shapes_present_all": ("every object's shape present (scorer)", True),
    "shapes_bound_all": ("every object present in its own colour (scorer)", True),
    "shapes_leak_any": ("some object in another object's colour (scorer)", False),
}


# -------------------------------------------------------------------------------------------- metrics


def noun_peaks(maps: np.ndarray, nouns) -> dict[str, float]:
    """Each noun's highest attention, A&E-style: the text tokens (SOT and EOT excluded) renormalised per
    pixel to sum 1, so a peak reads as "this noun wins that pixel" whatever SOT absorbs."""
    m = np.asarray(maps, dtype=np.float64).copy()
    inner = np.clip(m[..., 1:-1], 0, None)
    total = inner.sum(-1, keepdims=True)
    m[..., 1:-1] = np.divide(inner, total, out=np.zeros_like(inner), where=total > 0)
    return {f"{n.text}@{n.start}": float(word_map(m, n).max()) for n in nouns}


def attention_metrics(maps: np.ndarray, bindings, nouns) -> dict:
    """Leakage and neglect read off one (H, W, n_tokens) map stack; None where the prompt has nothing to read
    (no modifier: no leakage; no noun: no peak) - a missing value, never a made-up 0."""
    pairs = binding_overlaps(maps, bindings, nouns)
    leak = [p.other / (p.own + p.other) if p.own + p.other > 0 else None for p in pairs]
    leak = [x for x in leak if x is not None]
    peaks = noun_peaks(maps, nouns)
    return {
        "attn_own": float(np.mean([p.own for p in pairs])) if pairs else None,
        "attn_leakage": float(np.mean(leak)) if leak else None,
        "attn_margin": float(np.mean([p.margin for p in pairs])) if pairs else None,
        "attn_min_peak": min(peaks.values()) if peaks else None,
        "pairs": [
            {"modifier": p.modifier, "noun": p.noun, "own": p.own, "other": p.other, "other_noun": p.other_noun}
            for p in pairs
        ],
        "peaks": peaks,
    }


def prompt_parts(prompt: str) -> list[str]:
    """The prompt split on " and " / " with " (A&E's min-object similarity scores each part)."""
    parts = [p.strip(" ,.") for p in re.split(r"\s+(?:and|with)\s+", prompt.strip())]
    return [p for p in parts if p]


def _features(out):
    """transformers 5 returns a model output from get_*_features; 4.x returned the tensor itself."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_similarities(model, processor, tokenizer, image, texts: Sequence[str]) -> np.ndarray:
    """Cosine similarity of one image with each text under a ``CLIPModel``."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        pixels = processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"].to(device)
        tok = tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = _features(model.get_image_features(pixel_values=pixels.to(model.dtype))).float()
        txt = _features(
            model.get_text_features(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))
        ).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (txt @ img.T)[:, 0].cpu().numpy().astype(np.float64)


def clip_scores(model, processor, tokenizer, image, prompt: str) -> dict:
    """``clip_full`` (image vs the prompt) and ``clip_min`` (the worst of its parts; the full prompt when it
    has one part)."""
    parts = prompt_parts(prompt)
    texts = [prompt] + (parts if len(parts) > 1 else [])
    sims = clip_similarities(model, processor, tokenizer, image, texts)
    return {"clip_full": float(sims[0]), "clip_min": float(sims[1:].min()) if len(sims) > 1 else float(sims[0])}


def shapes_scores(image, prompt: str) -> dict | None:
    """The shapes scorer's verdicts as 0/1 numbers; None for a prompt outside the world's grammar."""
    from binding import world
    from binding.scorer import score_image

    try:
        objects = world.parse_caption(prompt)
    except ValueError:
        return None
    s = score_image(image, objects)
    return {
        "shapes_present_all": float(s["present_all"]),
        "shapes_bound_all": float(s["bound_all"]),
        "shapes_leak_any": float(s["leak_any"]),
    }


class ClipUnavailable(RuntimeError):
    """No CLIP weights: the message says why, and the report shows it."""


@dataclass
class ClipScorer:
    model: object
    processor: object
    tokenizer: object
    name: str

    def __call__(self, image, prompt: str) -> dict:
        return clip_scores(self.model, self.processor, self.tokenizer, image, prompt)


def load_clip(spec: str | None, device=None) -> ClipScorer:
    """A ``ClipScorer`` from a hub id (cache first) or a local folder; ``ClipUnavailable`` when it cannot load.

    ``spec`` "none" (or empty) turns CLIP off on purpose.
    """
    if spec is None or str(spec).strip().lower() in ("", "none", "off"):
        raise ClipUnavailable("turned off (--clip none)")
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    spec = str(spec)
    is_dir = os.path.isdir(os.path.expanduser(spec))
    source = os.path.expanduser(spec) if is_dir else spec
    offline = is_dir or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    last = None
    for local_only in (True,) if offline else (True, False):
        try:
            model = CLIPModel.from_pretrained(source, local_files_only=local_only).eval()
            processor = CLIPImageProcessor.from_pretrained(source, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            if device is not None:
                model = model.to(device)
            return ClipScorer(model, processor, tokenizer, spec)
        except Exception as exc:  # any failure means the same thing to the report: no CLIP score
            last = exc
    first_line = str(last).strip().splitlines()[0] if str(last).strip() else type(last).__name__
    raise ClipUnavailable(f"cannot load CLIP weights {spec!r} ({first_line[:200]})")


# ---------------------------------------------------------------------------------------------- items


@dataclass(frozen=True, order=True)
class Item:
    """One image of the grid: a prompt (by index in its set), a seed and a method."""

    prompt: int
    seed: int
    method: str

    @property
    def key(self) -> str:
        return f"p{self.prompt:04d}-s{self.seed}-{self.method}"

    @property
    def side(self) -> str:
        """Which run of the sampler this item is: the vanilla run, or a method's guided run."""
        return "vanilla" if self.method == "vanilla" else "guided"

    @property
    def baseline(self) -> "Item":
        return Item(self.prompt, self.seed, "vanilla")


def plan_items(n_prompts: int, seeds: Sequence[int], methods: Sequence[str]) -> list[Item]:
    """Every item, vanilla first for each (prompt, seed) and exactly once whatever ``methods`` lists."""
    methods = list(dict.fromkeys(["vanilla", *methods]))
    return [Item(p, int(s), m) for p in range(n_prompts) for s in seeds for m in methods]


def _item_dir(out: Path, item: Item) -> Path:
    return out / "items" / item.key


def _write_item(out: Path, item: Item, result, record: dict) -> Path:
    """Run record + metrics into a hidden folder, then one rename: the item exists complete or not at all."""
    from binding.records import save_run

    target = _item_dir(out, item)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{item.key}.", suffix=".tmp", dir=target.parent))
    try:
        save_run(result, tmp / "run")
        (tmp / "metrics.json").write_text(json.dumps(record, indent=1, allow_nan=False), encoding="utf-8")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def item_record(item: Item, prompt, result, clip: ClipScorer | None, clip_skipped: str | None) -> dict:
    """metrics.json of one item: identity, pairing, metrics, and what was skipped and why."""
    image = result.image(item.side)
    record = {
        "item": item.key,
        "prompt_index": item.prompt,
        "prompt": prompt.text,
        "group": prompt.group,
        "seed": item.seed,
        "method": item.method,
        "paired_with": None if item.method == "vanilla" else item.baseline.key,
        "metrics": {},
        "skipped": {},
        "details": {},
    }
    maps = result.mean_maps(item.side)
    if maps is not None:
        att = attention_metrics(maps, prompt.bindings, prompt.nouns)
        record["details"]["attention"] = {"pairs": att.pop("pairs"), "peaks": att.pop("peaks")}
        record["metrics"].update(att)
    else:
        record["skipped"]["attention"] = "no attention maps were recorded"
    if image is None:
        record["skipped"]["clip"] = record["skipped"]["shapes"] = "the run was not decoded"
    else:
        if clip is not None:
            record["metrics"].update(clip(image, prompt.text))
        else:
            record["skipped"]["clip"] = clip_skipped or "no CLIP model"
        sh = shapes_scores(image, prompt.text)  # None outside the world's grammar: not a metric there
        if sh is not None:
            record["metrics"].update(sh)
    timings = (result.timings or {}).get(item.side, {})
    record["time_s"] = timings.get("total_s")
    return _clean(record)


# --------------------------------------------------------------------------------------------- runner


def _settings_kwargs(settings: dict) -> dict:
    kw = {"steps": settings["steps"], "guidance_scale": settings["guidance_scale"]}
    for key in ("intervention_steps", "step_size", "height", "width"):
        if settings.get(key) is not None:
            kw[key] = settings[key]
    return kw


def _load_model(model: str | None, device):
    """A preset (``shapes``, ``tiny``, ``sd-1.4``...) or a local diffusers folder."""
    from binding.models import load_pipeline

    return load_pipeline(model, device=device)


def _use_cpu(device: str | None) -> bool:
    """accelerate's ``PartialState`` sets up CPU processes (gloo) only when asked: ``--cpu``'s environment flag,
    an explicit cpu device, or a machine without CUDA (``accelerate launch --multi_gpu`` on a CPU machine)."""
    import torch
    from accelerate.utils import parse_flag_from_env

    if device is not None:
        return str(device).startswith("cpu")
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def run_eval(
    prompt_set: str,
    out: str | Path,
    methods: Sequence[str] = EVAL_METHODS,
    seeds: Sequence[int] = range(8),
    model: str | None = "tiny",
    steps: int = 50,
    guidance_scale: float = 7.5,
    intervention_steps: int | None = None,
    step_size: float | None = None,
    size: int | None = None,
    device: str | None = None,
    clip: str | None = DEFAULT_CLIP,
    limit: int | None = None,
    report: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Run (or finish) the grid in ``out`` and, on the main process, write the report; returns its summary
    (None on other processes). Works alone or under ``accelerate launch``: items are split with
    ``PartialState.split_between_processes`` and each process writes its own."""
    from accelerate import PartialState

    from binding.guidance import resolve_method
    from binding.prompts import load_prompt_set

    state = PartialState(cpu=_use_cpu(device))
    out = Path(out)
    methods = list(dict.fromkeys(["vanilla", *(resolve_method(m).name for m in methods)]))
    seeds = [int(s) for s in seeds]
    pset = load_prompt_set(prompt_set, limit=limit)
    settings = {
        "set": pset.name, "n_prompts": len(pset), "methods": methods, "seeds": seeds, "model": str(model),
        "steps": int(steps), "guidance_scale": float(guidance_scale), "intervention_steps": intervention_steps,
        "step_size": step_size, "height": size, "width": size, "clip": clip,
    }
    cfg_path = out / "eval_config.json"
    # What decides the pixels must match a DIR's earlier run; methods, seeds and CLIP may grow between runs.
    fixed = ("set", "model", "steps", "guidance_scale", "intervention_steps", "step_size", "height", "width")
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
        diff = [k for k in fixed if old.get(k) != settings[k]]
        if (out / "prompts.json").is_file():
            before = [p["text"] for p in json.loads((out / "prompts.json").read_text(encoding="utf-8"))["prompts"]]
            if any(a != b for a, b in zip(before, pset.texts)):
                diff.append("prompt texts")
        if diff:
            raise ValueError(f"{out} holds an evaluation with other settings ({', '.join(diff)}); use another --out")
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_config.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
        (out / "prompts.json").write_text(
            json.dumps({"set": pset.name, "prompts": [p.to_dict() for p in pset]}, indent=1), encoding="utf-8"
        )
    items = plan_items(len(pset), seeds, methods)
    todo = [it for it in items if not _item_dir(out, it).is_dir()]
    state.wait_for_everyone()  # every process lists the same todo before anyone writes
    if state.is_main_process:
        log(f"{pset.name}: {len(pset)} prompts x {len(seeds)} seeds x {len(methods)} methods = {len(items)} items, "
            f"{len(items) - len(todo)} done, {len(todo)} to run on {state.num_processes} process(es)")
    with state.split_between_processes(todo) as mine:
        mine = list(mine)
        if mine:
            _run_items(
                pset, mine, out, settings, model, device or state.device, clip, progress and state.is_main_process,
                state.process_index,
            )
    state.wait_for_everyone()
    if not (report and state.is_main_process):
        return None
    return write_report(out, log=log)


def _run_items(
    pset, items: list[Item], out: Path, settings: dict, model, device, clip_spec, progress: bool, process: int = 0
) -> None:
    from tqdm.auto import tqdm

    from binding.guidance import GuidedSampler

    pipe = _load_model(model, device)
    sampler = GuidedSampler(pipe)
    try:
        clip, clip_skipped = load_clip(clip_spec, device=device), None
    except ClipUnavailable as exc:
        clip, clip_skipped = None, f"CLIP score skipped: {exc}"
    kw = _settings_kwargs(settings)
    bar = tqdm(total=len(items), desc="eval", unit="item", disable=not progress, dynamic_ncols=True)
    try:
        for item in items:
            if _item_dir(out, item).is_dir():  # done by an earlier run since the listing
                bar.update(1)
                continue
            prompt = pset[item.prompt]
            bar.set_postfix_str(item.key, refresh=False)
            (result,) = sampler(prompt.text, [item.seed], item.method, runs=(item.side,), analysis=prompt.analysis, **kw)
            record = item_record(item, prompt, result, clip, clip_skipped)
            record["process"] = process  # which process made it (not part of the result)
            _write_item(out, item, result, record)
            bar.update(1)
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------- statistics


def collect_rows(out: str | Path) -> list[dict]:
    """Every finished item's metrics.json in ``out``, in item order."""
    rows = []
    for path in sorted(Path(out, "items").glob("*/metrics.json")):
        rows.append(json.loads(path.read_text(encoding="utf-8")))
    return rows


def _num(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def summarize(rows: Sequence[dict], methods: Sequence[str] | None = None, baseline: str = "vanilla") -> dict:
    """{group: {method: {metric: {n, mean, ci, and vs the baseline: paired_n, diff, diff_ci}}}}, group "all"
    first. A metric a row lacks (skipped, or nothing to measure) leaves that row out of that metric only."""
    methods = list(methods or dict.fromkeys(r["method"] for r in rows))
    groups = ["all"] + sorted({r["group"] for r in rows if r.get("group")})
    index = {(r["method"], r["prompt_index"], r["seed"]): r for r in rows}
    metrics = [m for m in METRICS if any(_num(r["metrics"].get(m)) is not None for r in rows)]
    out: dict = {}
    for group in groups:
        out[group] = {}
        for method in methods:
            mine = [r for r in rows if r["method"] == method and (group == "all" or r["group"] == group)]
            entry: dict = {"items": len(mine)}
            for metric in metrics:
                have = [(r, _num(r["metrics"].get(metric))) for r in mine]
                have = [(r, x) for r, x in have if x is not None]
                vals = np.array([x for _, x in have])
                cl = np.array([r["prompt_index"] for r, _ in have])
                e = {"n": len(vals), "mean": float(vals.mean()) if len(vals) else None,
                     "ci": list(bootstrap_ci(vals, cl)) if len(vals) else None}
                if method != baseline:
                    pairs = []
                    for r, x in have:
                        b = index.get((baseline, r["prompt_index"], r["seed"]))
                        y = _num(b["metrics"].get(metric)) if b is not None else None
                        if y is not None:
                            pairs.append((r["prompt_index"], x - y))
                    d = np.array([p[1] for p in pairs])
                    e["paired_n"] = len(pairs)
                    e["diff"] = float(d.mean()) if len(d) else None
                    e["diff_ci"] = list(bootstrap_ci(d, np.array([p[0] for p in pairs]))) if len(d) else None
                entry[metric] = e
            out[group][method] = entry
    return _clean(out)


def _cell(e: dict | None, diff: bool = False) -> str:
    if not e:
        return "-"
    mean, ci = (e.get("diff"), e.get("diff_ci")) if diff else (e.get("mean"), e.get("ci"))
    if mean is None:
        return "-"
    sign = "+" if diff else ""
    return f"{mean:{sign}.3f} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]"


def format_summary(summary: dict, groups: Sequence[str] | None = None) -> str:
    """Markdown tables: per group, the means per method, then the paired differences from vanilla."""
    lines = []
    for group in groups or list(summary):
        per_method = summary.get(group, {})
        metrics = [m for m in METRICS if any(m in e for e in per_method.values())]
        if not metrics:
            continue
        for diff in (False, True):
            rows = [(m, e) for m, e in per_method.items() if not diff or any("diff" in e.get(k, {}) for k in metrics)]
            if not rows:
                continue
            title = "paired difference from vanilla, by (prompt, seed)" if diff else "mean [95% bootstrap interval]"
            lines.append(f"**{group}** ({title})")
            lines.append("")
            arrows = [f"{k} {'↑' if METRICS[k][1] else '↓'}" for k in metrics]
            lines.append("| method | items | " + " | ".join(arrows) + " |")
            lines.append("|---|---:|" + "---|" * len(metrics))
            for m, e in rows:
                lines.append(f"| {m} | {e['items']} | " + " | ".join(_cell(e.get(k), diff) for k in metrics) + " |")
            lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- figures


def plot_summary(summary: dict, path: Path, diff: bool = False) -> Path | None:
    """One panel per metric, a bar per method with its interval (``diff``: paired differences from vanilla)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_method = summary.get("all", {})
    metrics = [m for m in METRICS if any(m in e for e in per_method.values())]
    if not metrics:
        return None
    methods = [m for m in per_method if not diff or m != "vanilla"]
    if not methods:
        return None
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        means, errs = [], [[], []]
        for m in methods:
            e = per_method[m].get(metric, {})
            mean, ci = (e.get("diff"), e.get("diff_ci")) if diff else (e.get("mean"), e.get("ci"))
            mean = np.nan if mean is None else mean
            lo, hi = (mean, mean) if ci is None or ci[0] is None else ci
            means.append(mean)
            errs[0].append(max(0.0, mean - lo) if np.isfinite(mean) else 0.0)
            errs[1].append(max(0.0, hi - mean) if np.isfinite(mean) else 0.0)
        ax.bar(range(len(methods)), means, yerr=errs, capsize=4, color="#4c78a8")
        if diff:
            ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize=8)
        ax.set_title(f"{metric} {'↑' if METRICS[metric][1] else '↓'}", fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("paired difference from vanilla (95% bootstrap)" if diff else "mean (95% bootstrap)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def prompt_grid(out: str | Path, prompt_index: int, methods: Sequence[str], seeds: Sequence[int], title: str = ""):
    """A PIL image: one row per method, one column per seed (the first ``GRID_SEEDS``), same seed = same
    column = same initial latents. A missing item is a grey cell."""
    from PIL import Image, ImageDraw

    seeds = list(seeds)[:GRID_SEEDS]
    label_w, head_h, c, gap = 96, 30, GRID_CELL, 4
    step = c + gap  # a white gap between cells, so neighbouring images do not run together
    grid = Image.new("RGB", (label_w + step * len(seeds), head_h + step * len(methods)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), title[:120], fill="black")
    for j, s in enumerate(seeds):
        draw.text((label_w + j * step + 4, 16), f"seed {s}", fill="black")
    for i, m in enumerate(methods):
        draw.text((4, head_h + i * step + c // 2 - 6), m, fill="black")
        for j, s in enumerate(seeds):
            item = Item(prompt_index, int(s), m)
            png = _item_dir(Path(out), item) / "run" / f"{item.side}.png"
            box = (label_w + j * step, head_h + i * step)
            if png.is_file():
                with Image.open(png) as im:
                    grid.paste(im.convert("RGB").resize((c, c)), box)
            else:
                draw.rectangle([box, (box[0] + c - 1, box[1] + c - 1)], fill=(200, 200, 200))
    return grid


def write_report(out: str | Path, log: Callable[[str], None] = print) -> dict:
    """report.md, summary.json, plots/ and grids/ from the items on disk; prints the summary; returns it."""
    out = Path(out)
    cfg = json.loads((out / "eval_config.json").read_text(encoding="utf-8"))
    prompts = json.loads((out / "prompts.json").read_text(encoding="utf-8"))["prompts"]
    rows = collect_rows(out)
    methods = [m for m in cfg["methods"] if any(r["method"] == m for r in rows)]
    summary = summarize(rows, methods)
    skipped = sorted({f"{k}: {v}" for r in rows for k, v in r.get("skipped", {}).items()})
    times = {m: [r["time_s"] for r in rows if r["method"] == m and r.get("time_s") is not None] for m in methods}
    times = {m: t for m, t in times.items() if t}
    (out / "summary.json").write_text(json.dumps({"settings": cfg, "summary": summary, "skipped": skipped}, indent=1))
    plots = [p for p in (plot_summary(summary, out / "plots" / "means.png"),
                         plot_summary(summary, out / "plots" / "paired_diffs.png", diff=True)) if p]
    grids = []
    for p in prompts:
        if any(r["prompt_index"] == p["index"] for r in rows):
            g = out / "grids" / f"p{p['index']:04d}.png"
            g.parent.mkdir(parents=True, exist_ok=True)
            prompt_grid(out, p["index"], methods, cfg["seeds"], title=f"{p['index']}: {p['text']}").save(g)
            grids.append((p, g))
    n_expected = cfg["n_prompts"] * len(cfg["seeds"]) * len(cfg["methods"])
    head = [
        f"# Evaluation: {cfg['set']}",
        "",
        f"Model `{cfg['model']}`, {cfg['steps']} steps, guidance scale {cfg['guidance_scale']}, intervention steps "
        f"{cfg['intervention_steps'] if cfg['intervention_steps'] is not None else 'method default'}; "
        f"{cfg['n_prompts']} prompts, seeds {cfg['seeds'][0]}..{cfg['seeds'][-1]} ({len(cfg['seeds'])}), "
        f"methods {', '.join(cfg['methods'])}.",
        f"Items: {len(rows)} of {n_expected} done"
        + ("; seconds per item (generation, mean): " + ", ".join(f"{m} {np.mean(t):.2f}" for m, t in times.items())
           + "." if times else "."),
        "",
        "Intervals: 95% percentile bootstrap over prompts (2000 resamples, seed 0); differences are paired by "
        "(prompt, seed) with vanilla (same initial latents). ↑/↓: which way is better.",
        "",
    ]
    notes = [f"- {s}" for s in skipped]
    if any(r["metrics"].get("shapes_bound_all") is not None for r in rows) and cfg["model"] != "shapes":
        notes.append("- shapes scores come from the teaching world's scorer; they mean something on the shapes model only.")
    body = format_summary(summary)
    md = head + (["## Notes", "", *notes, ""] if notes else []) + ["## Tables", "", body, "## Plots", ""]
    md += [f"![{p.stem}](plots/{p.name})" for p in plots] + ["", "## Grids (rows: methods, columns: seeds)", ""]
    md += [f"- [{p['index']}: {p['text']}](grids/{g.name})" for p, g in grids]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    log("\n".join(head[2:4]) + "\n" + "\n".join(notes) + "\n\n" + format_summary(summary, ["all"]))
    log(f"report: {out / 'report.md'}")
    return summary


# ------------------------------------------------------------------------------------------------ CLI


def _cmd_eval(args) -> int:
    from binding.analysis import ParserNotFound
    from binding.models import ModelLoadError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        run_eval(
            args.set, args.out, methods=[m.strip() for m in args.methods.split(",") if m.strip()], seeds=args.seeds,
            model=args.model, steps=args.steps, guidance_scale=args.guidance, intervention_steps=args.intervention_steps,
            step_size=args.step_size, size=args.size, device=args.device, clip=args.clip, limit=args.limit,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, ModelLoadError, ParserNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_eval_command(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an argparse subparsers object (``binding.cli`` wires it in)."""
    from binding.cli import parse_seeds
    from binding.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS

    e = subparsers.add_parser(
        "eval", help="run a prompt set x methods x seeds, score every image, write a report (resumable; "
                     "splits across processes under accelerate launch)")
    e.add_argument("--set", required=True,
                   help="ae, dvmp (dvmp:N:SEED), db, shapes, or a prompt file (.txt one per line, .csv with a prompt column)")
    e.add_argument("--methods", default=",".join(EVAL_METHODS), help="comma-separated; vanilla is always run (the pairing)")
    e.add_argument("--seeds", type=parse_seeds, default=list(range(8)), help="0-7, 0,3,7 ... (default 0-7)")
    e.add_argument("--model", default=None, help="preset (tiny, sd-1.4, ...), a local diffusers folder, or shapes")
    e.add_argument("--out", required=True, help="folder for the items and the report; rerun to resume")
    e.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    e.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE_SCALE})")
    e.add_argument("--intervention-steps", type=int, default=None, help="guided steps from the start (method default: 25)")
    e.add_argument("--step-size", type=float, default=None, help="gradient step size (method default: 20)")
    e.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    e.add_argument("--device", default=None, help="default: accelerate's device for this process")
    e.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP weights: hub id or folder (default {DEFAULT_CLIP}); none to skip")
    e.add_argument("--limit", type=int, default=None, help="only the first N prompts of the set")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_eval)
    return e


def main(argv: list[str] | None = None) -> int:
    """``python -m binding.evaluation eval ...`` (and ``accelerate launch -m binding.evaluation eval ...``)
    until ``python -m binding eval`` is wired in."""
    from binding.cli import quiet_libraries

    parser = argparse.ArgumentParser(prog="python -m binding.evaluation")
    add_eval_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    quiet_libraries()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
