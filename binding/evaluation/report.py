"""Reports from an evaluation grid's files: means with prompt-clustered bootstrap intervals, paired with vanilla;
rates with Wilson/Newcombe intervals for the shapes scorer; tables, plots and picture grids.

Statistics (``summarize``): per group and method the mean of each metric with a 95% percentile bootstrap
interval, and for each method the mean paired difference from vanilla over the (prompt, seed) pairs both have,
with its bootstrap interval. The bootstrap resamples whole prompts (images of one prompt share its difficulty,
so they are not independent), 2000 resamples from ``numpy.random.default_rng(0)``: the same rows give the
same intervals. The shapes scorer's verdicts are 0/1 per image, so ``shapes_rates`` gives them as rates with
Wilson intervals and the paired difference in "bound" with Newcombe's interval.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from binding.evaluation.metrics import METRICS
from binding.evaluation.runner import Item, clean, collect_rows, item_dir
from binding.evaluation.stats import bootstrap_ci, bootstrap_paired, newcombe_paired, wilson

__all__ = [
    "format_rates",
    "format_summary",
    "picture_grid",
    "plot_summary",
    "prompt_grid",
    "rows_from_eval",
    "shapes_examples",
    "shapes_rates",
    "summarize",
    "write_report",
]

GRID_SEEDS = 8  # columns of a prompt's grid image
GRID_CELL = 128  # pixels per image in a grid
SHAPES_METRICS = ("present_all", "bound_all", "leak_any")  # the scorer's verdicts, per image
SHAPES_GRID_SEEDS = 6  # columns of the shapes picture grid

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
    return clean(out)


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
            png = item_dir(Path(out), item) / "run" / f"{item.side}.png"
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




# ---------------------------------------------------------------------------- the shapes scorer's rates


def shapes_rates(rows: Sequence[dict], methods: Sequence[str] | None = None, baseline: str = "vanilla") -> dict:
    """Per method and prompt group: rates with Wilson intervals, and differences from ``baseline`` paired by
    (prompt, seed) with Newcombe's and a prompt-clustered bootstrap interval."""
    methods = list(methods or dict.fromkeys(r["method"] for r in rows))
    groups = ["all"] + sorted({r["group"] for r in rows})
    index = {(r["method"], r["prompt"], r["seed"]): r for r in rows}
    out: dict = {}
    for group in groups:
        out[group] = {}
        for m in methods:
            mine = [r for r in rows if r["method"] == m and (group == "all" or r["group"] == group)]
            entry: dict = {"n": len(mine)}
            for metric in SHAPES_METRICS:
                x = sum(bool(r[metric]) for r in mine)
                entry[metric] = {"rate": x / len(mine) if mine else float("nan"), "ci": list(wilson(x, len(mine)))}
            if m != baseline:
                pairs = [(r, index.get((baseline, r["prompt"], r["seed"]))) for r in mine]
                pairs = [(r, v) for r, v in pairs if v is not None]
                entry["paired_n"] = len(pairs)
                for metric in SHAPES_METRICS:
                    g = np.array([bool(r[metric]) for r, _ in pairs])
                    v = np.array([bool(vr[metric]) for _, vr in pairs])
                    a, b = int((g & v).sum()), int((g & ~v).sum())
                    c, d = int((~g & v).sum()), int((~g & ~v).sum())
                    diff, lo, hi = newcombe_paired(a, b, c, d)
                    boot = (
                        bootstrap_paired(g, v, np.array([r["prompt"] for r, _ in pairs])) if pairs else (0.0, 0.0)
                    )
                    entry[metric]["vs_" + baseline] = {
                        "diff": diff, "newcombe_ci": [lo, hi], "bootstrap_ci": list(boot),
                        "only_method": b, "only_baseline": c,
                    }
            out[group][m] = entry
    return out


def format_rates(summary: dict) -> str:
    lines = []
    for group, per_method in summary.items():
        lines.append(f"[{group}]")
        lines.append(
            f"{'method':<14} {'n':>5}  {'present_all':<22} {'bound_all':<22} {'leak_any':<22} "
            f"{'d bound vs vanilla (Newcombe | prompt bootstrap)'}"
        )
        for m, e in per_method.items():
            cells = [f"{e[k]['rate']:.3f} [{e[k]['ci'][0]:.3f}, {e[k]['ci'][1]:.3f}]" for k in SHAPES_METRICS]
            line = f"{m:<14} {e['n']:>5}  " + " ".join(f"{c:<22}" for c in cells)
            vs = e["bound_all"].get("vs_vanilla")
            if vs:
                line += (f" {vs['diff']:+.3f} [{vs['newcombe_ci'][0]:+.3f}, {vs['newcombe_ci'][1]:+.3f}] | "
                         f"[{vs['bootstrap_ci'][0]:+.3f}, {vs['bootstrap_ci'][1]:+.3f}]  "
                         f"(+{vs['only_method']} / -{vs['only_baseline']})")
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def rows_from_eval(out: str | Path) -> list[dict]:
    """The scorer's verdicts from an evaluation grid on the shapes set (``python -m binding eval --set shapes
    --model shapes``), as ``score``'s rows: one generation serves both reports."""
    rows = []
    for r in collect_rows(out):
        m = r.get("metrics", {})
        if m.get("shapes_bound_all") is None:
            continue
        rows.append({"method": r["method"], "prompt": r["prompt"], "group": r["group"], "seed": r["seed"],
                     "present_all": bool(m["shapes_present_all"]), "bound_all": bool(m["shapes_bound_all"]),
                     "leak_any": bool(m["shapes_leak_any"])})
    if not rows:
        raise ValueError(f"{out} holds no shapes scores: run `python -m binding eval --set shapes --model shapes "
                         f"--out {out}` first")
    return rows


def shapes_examples(rows: Sequence[dict], methods: Sequence[str], lesson_method: str, n_examples: int = 6) -> dict:
    """The teaching model's measured examples for the app (``assets/shapes/examples.json``).

    For each prompt: over its seeds, how often vanilla misses or leaks, and how many of those each method fixes
    (bound where vanilla was not), and a telling seed (one the lesson method fixes, else a vanilla leak). The
    ``examples`` are the prompts the lesson method fixes most often; the ``lesson`` is the first of them, on a
    seed where vanilla leaked a colour and the method bound every object.
    """
    index = {(r["method"], r["prompt"], r["seed"]): r for r in rows}
    prompts: dict[str, dict] = {}
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        seeds = sorted({r["seed"] for r in rows if r["prompt"] == prompt and r["method"] == "vanilla"})
        unbound = [s for s in seeds if not index[("vanilla", prompt, s)]["bound_all"]]
        fixed = {m: [s for s in unbound if index.get((m, prompt, s), {}).get("bound_all")] for m in methods}
        leaks = [s for s in seeds if index[("vanilla", prompt, s)]["leak_any"]]
        telling = [s for s in fixed.get(lesson_method, []) if s in leaks] or fixed.get(lesson_method) or leaks or seeds
        prompts[prompt] = {"seeds": len(seeds), "vanilla_unbound": len(unbound),
                           "fixed": {m: len(v) for m, v in fixed.items()}, "seed": telling[0] if telling else 0}
    ranked = sorted(prompts, key=lambda p: (-prompts[p]["fixed"].get(lesson_method, 0), p))
    examples = ranked[:n_examples]
    def shows_the_fix(p: str) -> bool:  # its telling seed leaks in vanilla and is bound by the method
        s = prompts[p]["seed"]
        return bool(index.get((lesson_method, p, s), {}).get("bound_all") and index[("vanilla", p, s)]["leak_any"])

    lesson = next((p for p in ranked if shows_the_fix(p)), examples[0] if examples else None)
    return {"method": lesson_method, "examples": examples, "prompts": prompts,
            "lesson": {"prompt": lesson, "seed": prompts[lesson]["seed"] if lesson else 0, "method": lesson_method}}


def picture_grid(eval_out: str | Path, prompts: Sequence[int], seeds: Sequence[int], methods: Sequence[str]):
    """One PIL image: for each prompt (index in the set) a block of rows per method and columns per seed, from
    an evaluation grid's items: the same seed in a column is the same start."""
    from PIL import Image

    texts = {r["prompt_index"]: r["prompt"] for r in collect_rows(eval_out)}
    blocks = [prompt_grid(eval_out, i, methods, seeds, title=texts.get(i, f"prompt {i}")) for i in prompts]
    grid = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks) + 12 * len(blocks)), "white")
    y = 0
    for b in blocks:
        grid.paste(b, (0, y))
        y += b.height + 12
    return grid

