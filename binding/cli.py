"""`python -m binding ...`: the command line, thin. Every option is argparse here and nowhere else; every
command calls the library and turns its errors into one line on stderr and an exit code (2: bad input or
setting, 3: out of memory, 130: interrupted)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


class CommandError(Exception):
    """A failure the user can act on: printed as ``error: ...``, exit code 2."""


# --------------------------------------------------------------------------------------------- parse


def _print_analysis(analysis, as_json: bool) -> None:
    if as_json:
        print(json.dumps(analysis.to_dict(), ensure_ascii=False), flush=True)
        return
    print(f"prompt:  {analysis.prompt}")
    print(f"parser:  {analysis.parser}")
    pieces = " ".join(f"{k}:{t}" for k, t in enumerate(analysis.tokens))
    print(f"tokens:  {pieces}")
    if analysis.bindings:
        print("bindings:")
        for b in analysis.bindings:
            mods = ", ".join(f"{m.text} {list(m.token_indices)}" for m in b.modifiers)
            print(f"  {b.noun.text} {list(b.noun.token_indices)} <- {mods}")
    else:
        print("bindings: none")
    for note in analysis.notes:
        print(f"note:    {note}")
    print(flush=True)


def cmd_parse(args) -> int:
    from binding.analysis import ParserNotFound, PromptError, analyze, load_parser
    from binding.tokenizer import load_tokenizer

    try:
        nlp = load_parser(args.parser)
    except ParserNotFound as exc:
        raise CommandError(str(exc)) from None
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = _stdin_lines() if args.prompt == "-" else [(1, args.prompt, None)]
    status = 0
    for line, prompt, problem in prompts:
        try:
            if problem:
                raise PromptError(problem)
            _print_analysis(analyze(prompt, nlp, tokenizer), args.json)
        except PromptError as exc:
            status = 1
            if args.json:
                shown = prompt[:200].encode("utf-8", "backslashreplace").decode("utf-8")
                print(json.dumps({"line": line, "prompt": shown, "error": str(exc)}, ensure_ascii=False), flush=True)
            else:
                print(f"error: line {line}: {exc}" if args.prompt == "-" else f"error: {exc}", file=sys.stderr)
    return status


def _stdin_lines():
    """(line number, text, problem) for each line of standard input, as bytes decoded one by one, so a line
    that is not UTF-8 is reported and the rest go on."""
    for n, raw in enumerate(sys.stdin.buffer, 1):
        raw = raw.rstrip(b"\r\n")
        try:
            yield n, raw.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            yield n, raw.decode("utf-8", "replace"), (f"line {n} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                                                       f"position {exc.start})")


# ------------------------------------------------------------------------------------------ arguments


def parse_seeds(text: str) -> list[int]:
    """'0', '0,3,7' or '0-7' (inclusive) -> a list of seeds."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                seeds.extend(range(int(lo), int(hi) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must look like 0, 0,3,7 or 0-7, not {text!r}") from None
    if not seeds or any(s < 0 or s >= 2**63 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be non-negative integers, not {text!r}")
    return seeds


def _pair(text: str) -> tuple[str, str]:
    """'dark blue:car' -> ('dark blue', 'car')."""
    if ":" not in text:
        raise argparse.ArgumentTypeError(f"a pair is MODIFIERS:NOUN (e.g. 'red:apple' or 'small:dog#2'), not {text!r}")
    mods, noun = text.rsplit(":", 1)
    return mods.strip(), noun.strip()


def _methods(text: str) -> list[str]:
    from binding.methods import resolve_method

    try:
        return [resolve_method(m.strip()).name for m in text.split(",") if m.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_run_settings(p: argparse.ArgumentParser, size: bool = True) -> None:
    """The generation settings every running command shares; ranges and meaning from ``binding.settings``.
    Left out, each takes the model's default for the method, else the papers' (``settings.defaults_for``)."""
    from binding.settings import RANGES

    for name, flag, kind in (("steps", "--steps", int), ("intervention_steps", "--intervention-steps", int),
                             ("step_size", "--step-size", float), ("guidance_scale", "--guidance", float)):
        r = RANGES[name]
        p.add_argument(flag, type=kind, default=None, dest=name,
                       help=f"{r.help}, {r.lo:g}..{r.hi:g} (default: the model's for the method, else the paper's)")
    if size:
        p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


# ------------------------------------------------------------------------------------------- generate


def cmd_generate(args) -> int:
    from binding.analysis import analyze, bindings_from_pairs
    from binding.guidance import GuidedSampler
    from binding.models import load_pipeline
    from binding.records import RUN_BYTES, check_run_target, save_run
    from binding.storage import check_writable

    analysis = analyze(args.prompt)
    if not args.prompt.strip():
        raise CommandError("the prompt is empty")
    bindings = None
    if args.pair:
        bindings, problems = bindings_from_pairs(analysis, args.pair)
        if problems:
            raise CommandError("; ".join(str(p) for p in problems))
    out = Path(args.out)
    targets = [out] if len(args.seed) == 1 else [out / f"seed-{s}" for s in args.seed]
    for t in targets:  # before any work: refusing costs nothing, and nothing of the user's is replaced
        check_run_target(t, args.overwrite)
    check_writable(out, need_bytes=RUN_BYTES * len(targets))
    pipe = load_pipeline(args.model, device=args.device)
    results = GuidedSampler(pipe)(
        args.prompt, args.seed, args.method, steps=args.steps, guidance_scale=args.guidance_scale,
        height=args.height or args.size, width=args.width or args.size,
        intervention_steps=args.intervention_steps, step_size=args.step_size,
        terms=args.terms.split(",") if args.terms else None, bindings=bindings, analysis=analysis,
        negative_prompt=args.negative_prompt, progress=not args.json,
    )
    for target, result in zip(targets, results):
        save_run(result, target, overwrite=True)
        if args.json:
            print(json.dumps(result.to_json(), ensure_ascii=False), flush=True)
        else:
            for note in result.notes:
                print(f"note: {note}")
            print(f"seed {result.seed}: wrote {target}/vanilla.png, guided.png, run.json, run.npz")
    return 0


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
           "bf16": "bfloat16"}


def _dtype(text: str):
    import torch

    if text.lower() not in _DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(_DTYPES)}, not {text!r}")
    return getattr(torch, _DTYPES[text.lower()])


def cmd_bench(args) -> int:
    from binding.bench import format_report, run_benchmark

    _threads(args)
    for flag in ("steps", "size", "max_refinement"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise CommandError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.repeats < 1:
        raise CommandError("--repeats must be at least 1")
    if args.gpu_check:
        return _gpu_check(args)
    if args.dry_run:
        raise CommandError("--dry-run goes with --gpu-check")
    report = run_benchmark(args.model_given or "tiny", steps=args.steps or 50, repeats=args.repeats, prompt=args.prompt,
                           device=args.device, size=args.size, dtype=args.dtype, warmup=not args.no_warmup,
                           max_refinement=args.max_refinement, diffusers_ae=not args.no_diffusers_ae)
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    return 0


def _gpu_check(args) -> int:
    """Exit 0 when every stage ran finite and in the right dtypes, 1 (with the reason on stderr) otherwise."""
    from binding.bench import CheckFailed, format_generations, gpu_check
    from binding.guidance import GuidanceError

    what = "GPU check (dry run on the CPU)" if args.dry_run else "GPU check"
    overrides = {k: v for k, v in (("model", args.model_given), ("size", args.size), ("dtype", args.dtype),
                                   ("device", args.device)) if v is not None}
    try:
        check = gpu_check(dry_run=args.dry_run, steps=args.steps, log=lambda m: print(m, flush=True), **overrides)
    except (CheckFailed, GuidanceError, RuntimeError, TypeError) as exc:  # NaN, dtype or device errors
        print(f"{what} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    print(format_generations(check), flush=True)
    if args.json:
        print(json.dumps(check, default=str), flush=True)
    print(f"{what} passed in {check['seconds']:.0f} s: no NaN, UNet in {check['bench']['settings']['dtype']}, "
          "loss and update in float32", flush=True)
    return 0


def cmd_loadtest(args) -> int:
    from binding.loadtest import format_report, run_loadtest

    report = run_loadtest(args.clients, args.parses, args.model, args.steps, args.url, args.timeout,
                          log=lambda m: print(m, flush=True))
    print(format_report(report), flush=True)
    bad = [o for o in report.outcomes if o.status == "failed"]
    return 1 if bad else 0


# ----------------------------------------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    from binding.evaluation.report import write_report
    from binding.evaluation.runner import run_eval

    _threads(args)
    done = run_eval(
        args.set, args.out, methods=args.methods, seeds=args.seeds, model=args.model, steps=args.steps,
        guidance_scale=args.guidance_scale, intervention_steps=args.intervention_steps, step_size=args.step_size,
        size=args.size, device=args.device, clip=args.clip, limit=args.limit, progress=not args.no_progress,
    )
    if done is not None:  # the main process, once all are done
        write_report(done)
    return 0


# ---------------------------------------------------------------------------------------------- teach


def cmd_teach_train(args) -> int:
    from binding.shapes.model import ShapesConfig
    from binding.shapes.train import TRAIN_OPTIONS, train

    _threads(args)
    overrides = {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}
    out = Path(args.out)
    if (out / "config.json").is_file():
        stored = ShapesConfig.from_dict(json.loads((out / "config.json").read_text())["config"])
        cfg = dataclasses.replace(stored, **overrides)
    else:
        cfg = ShapesConfig(**overrides)
    trainer = train(out, cfg, device=args.device, max_steps=args.max_steps, max_minutes=args.max_minutes,
                    log=lambda m: print(m, flush=True))
    if args.export and trainer.phase == "diffusion" and trainer.step > 0:
        print(f"exported {trainer.export(args.export)}")
    return 0


def cmd_teach_export(args) -> int:
    import torch

    from binding.shapes.train import Trainer

    trainer = Trainer(args.run, device="cpu", log=lambda m: print(m, flush=True))
    if args.checkpoint:
        trainer.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=False))
    elif not trainer.resume():
        raise CommandError(f"{args.run} has no checkpoint")
    try:
        print(f"exported {trainer.export(args.to)}")
    except RuntimeError as exc:
        raise CommandError(str(exc)) from None
    return 0


def cmd_teach_score(args) -> int:
    from binding.evaluation.report import SHAPES_GRID_SEEDS, format_rates, picture_grid, rows_from_eval, shapes_rates
    from binding.evaluation.runner import run_eval

    _threads(args)
    if not args.from_eval:
        if not args.out:
            raise CommandError("give --out DIR (the evaluation grid to write) or --from-eval DIR")
        run_eval(args.prompts or "shapes", args.out, methods=args.methods, seeds=args.seeds, model=args.model,
                 steps=args.steps, guidance_scale=args.guidance_scale, intervention_steps=args.intervention_steps,
                 step_size=args.step_size, device=args.device, clip="none", progress=False,
                 log=lambda m: None)
    source = args.from_eval or args.out
    rows = rows_from_eval(source)
    present = list(dict.fromkeys(["vanilla", *[m for m in args.methods if any(r["method"] == m for r in rows)]]))
    summary = shapes_rates(rows, present)
    if args.grid:
        seeds = sorted({r["seed"] for r in rows})[:SHAPES_GRID_SEEDS]
        picture_grid(source, args.grid_prompts or [0, 1, 2], seeds, present).save(args.grid)
        print(f"picture grid: {args.grid}", flush=True)
    print(json.dumps(summary) if args.json else format_rates(summary), flush=True)
    return 0


def cmd_teach_examples(args) -> int:
    from binding.evaluation.report import rows_from_eval, shapes_examples
    from binding.storage import atomic_write_text

    rows = rows_from_eval(args.from_eval)
    methods = [m for m in args.methods if m != "vanilla" and any(r["method"] == m for r in rows)]
    if args.lesson_method not in methods:
        raise CommandError(f"{args.from_eval} has no {args.lesson_method} items to choose the lesson from")
    table = shapes_examples(rows, methods, args.lesson_method)
    atomic_write_text(args.to, json.dumps(table, indent=1))
    print(f"wrote {args.to}: examples {table['examples']}; lesson {table['lesson']}")
    return 0


def cmd_teach_check_scorer(args) -> int:
    """The scorer's accuracy on ground-truth renders (clean and degraded) and on the shapes model's VAE round
    trips: how far its verdicts can be trusted, and the ceiling of any score the model can get."""
    from binding.models import ModelLoadError, load_pipeline
    from binding.shapes.scorer import DEGRADATIONS, accuracy, vae_reader

    _threads(args)
    print(f"{'renders':<26} {'objects right':>16} {'images exact':>13}  commonest errors")
    readers = [(kind, None) for kind in DEGRADATIONS]
    try:
        readers.append((f"{args.model} VAE round trip", vae_reader(load_pipeline(args.model, device="cpu").vae)))
    except ModelLoadError as exc:
        print(f"(no VAE round trip: {exc})")
    for kind, reader in readers:
        a = accuracy(args.n, "clean" if reader else kind, seed=0, reader=reader)
        errs = ", ".join(f"{c} {s} {what} x{k}" for ((c, s), what), k in a["errors"].most_common(3)) or "none"
        print(f"{kind:<26} {a['objects_right']:>6}/{a['objects']:<5} {a['object_accuracy']:>5.1%}"
              f" {a['image_accuracy']:>12.1%}  {errs}", flush=True)
    return 0


def cmd_teach_check_maps(args) -> int:
    from binding.models import load_pipeline
    from binding.shapes.maps import check_maps, format_check

    _threads(args)
    pipe = load_pipeline(args.model, device=args.device)
    result = check_maps(pipe, n_layouts=args.layouts, ablation_seeds=args.ablation_seeds,
                        ablation=not args.no_ablation)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(format_check(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from binding.evaluation.metrics import DEFAULT_CLIP
    from binding.evaluation.runner import EVAL_METHODS
    from binding.methods import METHODS, TERMS

    parser = argparse.ArgumentParser(
        prog="python -m binding",
        description="Attribute binding for text-to-image diffusion: analyse prompts, run guided generation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("parse", help="show a prompt's bindings (noun <- modifiers) and CLIP positions")
    p.add_argument("prompt", help="the prompt, or - to read one prompt per line from standard input")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--parser", default=None, help="spaCy pipeline to use (default: $BINDING_SPACY_MODEL or the best installed)")
    p.add_argument("--tokenizer", default=None, help="folder with a CLIP tokenizer (default: the shipped one)")
    p.set_defaults(func=cmd_parse)

    g = sub.add_parser("generate", help="run vanilla and guided generation from the same seed and save both")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="a preset (shapes, tiny, sd-1.4, ...) or a local diffusers folder")
    g.add_argument("--method", default="syngen", choices=[*METHODS, "custom"])
    g.add_argument("--terms", default=None, help=f"with --method custom: comma-separated loss terms from {', '.join(TERMS)}")
    g.add_argument("--seed", type=parse_seeds, default=[0], help="a seed, a list 0,3,7 or a range 0-7 (one folder per seed)")
    _add_run_settings(g)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--pair", action="append", type=_pair, metavar="MODS:NOUN",
                   help="use these bindings instead of the parse's (repeatable), e.g. --pair red:apple --pair 'small:dog#2'")
    g.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when available)")
    g.add_argument("--out", required=True, help="folder for vanilla.png, guided.png, run.json and run.npz")
    g.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    g.add_argument("--json", action="store_true", help="print run.json's content (one line per seed)")
    g.set_defaults(func=cmd_generate)

    from binding.bench import DEFAULT_PROMPT

    b = sub.add_parser("bench", help="time vanilla, each method, diffusers' pipelines and each method's cost floor; "
                                     "--gpu-check: the fp16 check for a GPU machine")
    b.add_argument("--model", default=None, dest="model_given",
                   help="a preset or folder (default tiny); arch:sd-1.5 and arch:sd-2.1-base are the real "
                        "architectures with random weights")
    b.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; the GPU check's: 50, dry run 3)")
    b.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    b.add_argument("--dtype", type=_dtype, default=None, help="float32, float16 or bfloat16 (default: fp16 on CUDA, "
                                                                "fp32 on a CPU)")
    b.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds after one warm-up (median reported)")
    b.add_argument("--no-warmup", action="store_true",
                   help="no per-configuration warm-up (for 512 px on a CPU, where a pass takes tens of seconds)")
    b.add_argument("--max-refinement", type=int, default=None,
                   help="cap every refinement at this many iterations (random-weight models run to the caps)")
    b.add_argument("--no-diffusers-ae", action="store_true",
                   help="leave out diffusers' Attend-and-Excite (it materialises every layer's attention)")
    b.add_argument("--prompt", default=DEFAULT_PROMPT)
    b.add_argument("--device", default=None)
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is best on a shared machine)")
    b.add_argument("--gpu-check", action="store_true",
                   help="arch:sd-1.5 at 512 px, fp16 UNet, every method: probes that fail on NaN or a dtype error, the "
                        "bench table, peak CUDA memory, time against the ZeroGPU reservation; exit 1 on a failure")
    b.add_argument("--dry-run", action="store_true", help="with --gpu-check: the same path on tiny on the CPU")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser(
        "eval", help="run a prompt set x methods x seeds, score every image, write a report (resumable; "
                     "splits across processes under accelerate launch)")
    e.add_argument("--set", required=True,
                   help="ae, dvmp (dvmp:N:SEED), db, shapes, shapes-calibration, or a prompt file (.txt one per "
                        "line, .csv with a prompt column)")
    e.add_argument("--methods", type=_methods, default=list(EVAL_METHODS),
                   help="comma-separated; vanilla is always run (the pairing)")
    e.add_argument("--seeds", type=parse_seeds, default=list(range(8)), help="0-7, 0,3,7 ... (default 0-7)")
    e.add_argument("--model", default=None, help="preset (tiny, sd-1.4, ...), a local diffusers folder, or shapes")
    e.add_argument("--out", required=True, help="folder for the items and the report; rerun to resume")
    _add_run_settings(e)
    e.add_argument("--device", default=None, help="default: accelerate's device for this process")
    e.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP weights: hub id or folder (default {DEFAULT_CLIP}); none to skip")
    e.add_argument("--limit", type=int, default=None, help="only the first N prompts of the set")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    lt = sub.add_parser("loadtest", help="many visitors at once against the app, on this machine only: served, "
                                         "refused, failed, waits, server memory")
    lt.add_argument("--clients", type=int, default=40, help="concurrent generations (default 40)")
    lt.add_argument("--parses", type=int, default=200, help="concurrent parses sent while they queue (default 200)")
    lt.add_argument("--model", default="tiny", help="the app's model (default tiny)")
    lt.add_argument("--steps", type=int, default=10, help="steps per generation (default 10)")
    lt.add_argument("--url", default=None, help="a running app on a loopback address (default: start one)")
    lt.add_argument("--timeout", type=float, default=900.0, help="seconds any one request may take (default 900)")
    lt.set_defaults(func=cmd_loadtest)

    _add_teach(sub)
    return parser


def _add_teach(sub) -> None:
    from binding.evaluation.runner import EVAL_METHODS
    from binding.shapes.model import ShapesConfig
    from binding.shapes.train import TRAIN_OPTIONS

    t = sub.add_parser("teach", help="the teaching model: train it on the shapes world, check and score it")
    tsub = t.add_subparsers(dest="teach_command", metavar="TEACH_COMMAND", required=True)

    tr = tsub.add_parser("train", help="train (or resume) the shapes model; checkpoints and exports go to --out")
    tr.add_argument("--out", required=True, help="run folder (checkpoints/, pipeline/, log.jsonl); run again to resume")
    defaults = ShapesConfig()
    for name, help_text in TRAIN_OPTIONS.items():
        default = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            tr.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                            help=f"{help_text} (default {'on' if default else 'off'})")
        else:
            kind = str if default is None else type(default)
            tr.add_argument(flag, type=kind, default=None, help=f"{help_text} (default {default})")
    tr.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this call (checkpointed)")
    tr.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes in this call (checkpointed)")
    tr.add_argument("--device", default=None, help="cuda, cpu (default: CUDA when available)")
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is best on a shared machine)")
    tr.add_argument("--export", default=None, metavar="DIR",
                    help="also export the EMA model to DIR at the end (e.g. assets/shapes)")
    tr.set_defaults(func=cmd_teach_train)

    ex = tsub.add_parser("export", help="export a run's EMA model as a diffusers folder with its model card")
    ex.add_argument("--run", required=True, help="the run folder given to teach train --out")
    ex.add_argument("--to", required=True, help="destination folder, e.g. assets/shapes")
    ex.add_argument("--checkpoint", default=None, help="a checkpoint file (default: the latest)")
    ex.set_defaults(func=cmd_teach_export)

    sc = tsub.add_parser("score", help="presence and colour binding per method on the held-out prompts: rates with "
                                       "Wilson intervals, paired with vanilla (Newcombe)")
    sc.add_argument("--model", default="shapes", help="a shapes model folder or a preset (default: shapes)")
    sc.add_argument("--methods", type=_methods, default=list(EVAL_METHODS), help="comma-separated")
    sc.add_argument("--seeds", type=parse_seeds, default=list(range(8)), help="e.g. 0-7 (default) or 0,3,7")
    sc.add_argument("--prompts", default=None,
                    help="a prompt set or file of captions in the world's grammar (default: shapes, the held-out list)")
    _add_run_settings(sc, size=False)
    sc.add_argument("--from-eval", default=None, metavar="DIR",
                    help="no generation: read an eval run's shapes scores (eval --set shapes --model shapes --out DIR)")
    sc.add_argument("--out", default=None, help="the evaluation grid to write (resumable) when not --from-eval")
    sc.add_argument("--grid", default=None, metavar="PNG", help="a picture grid of methods x seeds")
    sc.add_argument("--grid-prompts", type=parse_seeds, default=None, help="prompt indices for --grid (default 0-2)")
    sc.add_argument("--device", default=None)
    sc.add_argument("--threads", type=int, default=None)
    sc.add_argument("--json", action="store_true", help="print the summary as JSON")
    sc.set_defaults(func=cmd_teach_score)

    exm = tsub.add_parser("examples", help="the app's measured examples and lesson from a held-out evaluation")
    exm.add_argument("--from-eval", required=True, metavar="DIR", help="eval --set shapes --model shapes --out DIR")
    exm.add_argument("--methods", type=_methods, default=list(EVAL_METHODS), help="comma-separated")
    exm.add_argument("--lesson-method", default="syngen", help="the method the lesson shows (default syngen)")
    exm.add_argument("--to", default="assets/shapes/examples.json", help="where to write (default: beside the model)")
    exm.set_defaults(func=cmd_teach_examples)

    ck = tsub.add_parser("check-scorer", help="the scorer's accuracy on ground-truth renders and on the model's VAE")
    ck.add_argument("--n", type=int, default=1000, help="scenes per condition (default 1000)")
    ck.add_argument("--model", default="shapes", help="whose VAE round trips to read (default: shapes)")
    ck.add_argument("--threads", type=int, default=None)
    ck.set_defaults(func=cmd_teach_check_scorer)

    cm = tsub.add_parser("check-maps", help="whether the words carry the caption: each word's own-object share "
                                            "teacher-forced, and the padding ablation")
    cm.add_argument("--model", default="shapes", help="a shapes model folder or preset (default: shapes)")
    cm.add_argument("--layouts", type=int, default=4, help="layouts per held-out prompt (default 4: 112 scenes)")
    cm.add_argument("--ablation-seeds", type=parse_seeds, default=[0, 1], help="seeds per ablation prompt (default 0,1)")
    cm.add_argument("--no-ablation", action="store_true", help="map separation only")
    cm.add_argument("--device", default=None)
    cm.add_argument("--threads", type=int, default=None)
    cm.add_argument("--json", action="store_true")
    cm.set_defaults(func=cmd_teach_check_maps)


def quiet_libraries() -> None:
    """Keep the libraries' notices (deprecations, torchvision fallbacks, safety-checker text) off the terminal."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    from binding.analysis import ParserNotFound, PromptError
    from binding.guidance import Cancelled, GuidanceError
    from binding.models import ModelLoadError
    from binding.storage import OutputError

    args = build_parser().parse_args(argv)
    if args.command != "parse":
        quiet_libraries()
    try:
        return args.func(args)
    except (CommandError, PromptError, ParserNotFound, ModelLoadError, GuidanceError, ValueError,
            FileNotFoundError, FileExistsError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "out of memory" not in str(exc).lower():
            raise
        print(f"error: out of memory ({str(exc).splitlines()[0][:200]}); try a smaller --size, fewer --seed values "
              "at once, or another --device", file=sys.stderr)
        return 3
