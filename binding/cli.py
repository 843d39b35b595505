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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
