"""The evaluation grid: every (prompt, method, seed) of a prompt set, run once, written atomically, resumable.

Why this shape. A comparison of guidance methods is only fair on the same initial latents, so every method is
paired with vanilla by (prompt, seed): vanilla runs once per (prompt, seed) and each method's item names the
vanilla item it is compared with. The grid is long (276 prompts x 64 seeds x 4 methods in the papers), so
every item is written atomically as soon as it is made, a rerun skips what is on disk, and under
``accelerate launch`` the items are split across processes with accelerate's own ``split_between_processes``.
The report (``binding.evaluation.report``) is computed from the files on disk only, so a merged multi-process
run and a single-process run give the same report.

On disk (``DIR``)::

    eval_config.json      the settings; a rerun with other settings is refused (use another DIR)
    prompts.json          the set: index, text, group, bindings, nouns
    items/p0003-s5-syngen/
        run/              the run record (``binding.records.save_run``): guided.png (vanilla.png for vanilla)...
        metrics.json      this item's metrics, its pairing (``paired_with``) and what was skipped and why
    report.md, summary.json, plots/*.png, grids/p0003.png

An item folder is built in a hidden temporary folder and renamed into place, so it exists only complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from binding.evaluation.metrics import (
    DEFAULT_CLIP,
    ClipScorer,
    ClipUnavailable,
    attention_metrics,
    load_clip,
    shapes_scores,
)
from binding.storage import atomic_write_text, check_writable, clean_stale

__all__ = ["EVAL_METHODS", "Item", "collect_rows", "item_dir", "item_record", "plan_items", "run_eval"]

EVAL_METHODS = ("vanilla", "syngen", "divide-bind", "attend-excite")
ITEM_BYTES = 1 << 20  # room to ask for per item before a grid starts (a 512 px item is ~0.5 MB)

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


def item_dir(out: Path, item: Item) -> Path:
    return out / "items" / item.key


def _write_item(out: Path, item: Item, result, record: dict) -> Path:
    """Run record + metrics into a hidden folder, then one rename: the item exists complete or not at all."""
    from binding.records import save_run

    target = item_dir(out, item)
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


def clean(x):
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
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
    return clean(record)



# --------------------------------------------------------------------------------------------- runner


def _settings_kwargs(settings: dict) -> dict:
    kw = {}
    for key in ("steps", "guidance_scale", "intervention_steps", "step_size", "height", "width"):
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); this folder's evaluation is damaged: use another --out "
                         "or delete the file to start the settings afresh (the items stay)") from None


def run_eval(
    prompt_set: str,
    out: str | Path,
    methods: Sequence[str] = EVAL_METHODS,
    seeds: Sequence[int] = range(8),
    model: str | None = "tiny",
    steps: int | None = None,
    guidance_scale: float | None = None,
    intervention_steps: int | None = None,
    step_size: float | None = None,
    size: int | None = None,
    device: str | None = None,
    clip: str | None = DEFAULT_CLIP,
    limit: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path | None:
    """Run (or finish) the grid in ``out``; returns ``out`` on the main process once every process is done
    (None on the others), for ``binding.evaluation.report.write_report``. Works alone or under
    ``accelerate launch``: items are split with ``PartialState.split_between_processes`` and each process
    writes its own."""
    from accelerate import PartialState

    from binding.evaluation.prompts import load_prompt_set
    from binding.methods import resolve_method

    state = PartialState(cpu=_use_cpu(device))
    out = Path(out)
    methods = list(dict.fromkeys(["vanilla", *(resolve_method(m).name for m in methods)]))
    seeds = [int(s) for s in seeds]
    pset = load_prompt_set(prompt_set, limit=limit)
    settings = {
        "set": pset.name, "n_prompts": len(pset), "methods": methods, "seeds": seeds, "model": str(model),
        "steps": steps, "guidance_scale": guidance_scale, "intervention_steps": intervention_steps,
        "step_size": step_size, "height": size, "width": size, "clip": clip,
    }
    cfg_path = out / "eval_config.json"
    # What decides the pixels must match a DIR's earlier run; methods, seeds and CLIP may grow between runs.
    fixed = ("set", "model", "steps", "guidance_scale", "intervention_steps", "step_size", "height", "width")
    if cfg_path.is_file():
        old = _read_json(cfg_path)
        diff = [k for k in fixed if old.get(k) != settings[k]]
        if (out / "prompts.json").is_file():
            before = [p["text"] for p in _read_json(out / "prompts.json")["prompts"]]
            if any(a != b for a, b in zip(before, pset.texts)):
                diff.append("prompt texts")
        if diff:
            raise ValueError(f"{out} holds an evaluation with other settings ({', '.join(diff)}); use another --out")
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise FileExistsError(f"{out} holds files that are not an evaluation of ours; choose another --out "
                              "(nothing was written or deleted)")
    check_writable(out, need_bytes=ITEM_BYTES * len(pset) * len(seeds) * len(methods))
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale(out / "items")  # hidden folders of items a killed run was writing
        atomic_write_text(out / "eval_config.json", json.dumps(settings, indent=1))
        atomic_write_text(out / "prompts.json",
                          json.dumps({"set": pset.name, "prompts": [p.to_dict() for p in pset]}, indent=1))
    items = plan_items(len(pset), seeds, methods)
    todo = [it for it in items if not item_dir(out, it).is_dir()]
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
    return out if state.is_main_process else None


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
            if item_dir(out, item).is_dir():  # done by an earlier run since the listing
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
        if path.parent.name.startswith("."):  # an item a killed run left half-made: not an item
            continue
        rows.append(json.loads(path.read_text(encoding="utf-8")))
    return rows
