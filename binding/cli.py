"""`python -m binding ...`: a thin command line over the library."""

from __future__ import annotations

import argparse
import json
import sys


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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = (line.rstrip("\r\n") for line in sys.stdin) if args.prompt == "-" else [args.prompt]
    status = 0
    for prompt in prompts:
        try:
            _print_analysis(analyze(prompt, nlp, tokenizer), args.json)
        except PromptError as exc:
            status = 1
            if args.json:
                print(json.dumps({"prompt": prompt[:200], "error": str(exc)}, ensure_ascii=False), flush=True)
            else:
                print(f"error: {exc}", file=sys.stderr)
    return status


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


def cmd_generate(args) -> int:
    import json as _json
    from pathlib import Path

    from binding.analysis import ParserNotFound, PromptError, analyze, bindings_from_pairs
    from binding.guidance import Cancelled, GuidanceError, GuidedSampler
    from binding.models import ModelLoadError, load_pipeline
    from binding.records import save_run

    try:
        analysis = analyze(args.prompt)
        if not args.prompt.strip():
            raise PromptError("the prompt is empty")
        bindings = None
        if args.pair:
            bindings, problems = bindings_from_pairs(analysis, args.pair)
            if problems:
                raise PromptError("; ".join(str(p) for p in problems))
        out = Path(args.out)
        targets = [out] if len(args.seed) == 1 else [out / f"seed-{s}" for s in args.seed]
        taken = [t for t in targets if (t / "run.json").exists()]
        if taken and not args.overwrite:
            raise FileExistsError(f"{taken[0]} already holds a run; pass --overwrite to replace it")
        pipe = load_pipeline(args.model, device=args.device)
        sampler = GuidedSampler(pipe)
        results = sampler(
            args.prompt, args.seed, args.method, steps=args.steps, guidance_scale=args.guidance,
            height=args.height or args.size, width=args.width or args.size,
            intervention_steps=args.intervention_steps, step_size=args.step_size,
            terms=args.terms.split(",") if args.terms else None, bindings=bindings, analysis=analysis,
            negative_prompt=args.negative_prompt, progress=not args.json,
        )
    except (PromptError, ParserNotFound, ModelLoadError, GuidanceError, ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "out of memory" not in str(exc).lower():
            raise
        print(f"error: out of memory ({str(exc).splitlines()[0][:200]}); try a smaller --size, fewer --seed values "
              "at once, or another --device", file=sys.stderr)
        return 3
    for target, result in zip(targets, results):
        save_run(result, target, overwrite=True)
        if args.json:
            print(_json.dumps(result.to_json(), ensure_ascii=False), flush=True)
        else:
            for note in result.notes:
                print(f"note: {note}")
            print(f"seed {result.seed}: wrote {target}/vanilla.png, guided.png, run.json, run.npz")
    return 0


def cmd_bench(args) -> int:
    from binding.bench import format_report, run_benchmark
    from binding.models import ModelLoadError

    if args.steps < 1 or args.repeats < 1:
        print("error: --steps and --repeats must be at least 1", file=sys.stderr)
        return 2
    try:
        report = run_benchmark(args.model, steps=args.steps, repeats=args.repeats, prompt=args.prompt, device=args.device)
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
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

    from binding.guidance import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, METHODS, TERMS

    g = sub.add_parser("generate", help="run vanilla and guided generation from the same seed and save both")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="preset (tiny, sd-1.4, sd-1.5, sd-2.1-base) or a local diffusers folder")
    g.add_argument("--method", default="syngen", choices=[*METHODS, "custom"])
    g.add_argument("--terms", default=None, help=f"with --method custom: comma-separated loss terms from {', '.join(TERMS)}")
    g.add_argument("--seed", type=parse_seeds, default=[0], help="a seed, a list 0,3,7 or a range 0-7 (one folder per seed)")
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    g.add_argument("--intervention-steps", type=int, default=None, help="guided steps from the start (method default: 25)")
    g.add_argument("--step-size", type=float, default=None, help="gradient step size (method default: 20)")
    g.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE_SCALE})")
    g.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
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

    b = sub.add_parser("bench", help="time vanilla, each method, diffusers' pipelines and each method's cost floor")
    b.add_argument("--model", default="tiny")
    b.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    b.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds after one warm-up (median reported)")
    b.add_argument("--prompt", default=DEFAULT_PROMPT)
    b.add_argument("--device", default=None)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    from binding.evaluation import add_eval_command
    from binding.teach import add_teach_commands

    add_eval_command(sub)
    add_teach_commands(sub)
    return parser


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
    args = build_parser().parse_args(argv)
    if args.command != "parse":
        quiet_libraries()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
