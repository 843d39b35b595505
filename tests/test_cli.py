"""The command line, as a user runs it."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from binding import analysis as A
from binding.cli import main


def run_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "binding", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0 and "parse" in out.stdout


def test_parse_json_schema():
    out = run_cli("parse", "--json", "a dog and a small dog")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"prompt", "parser", "tokens", "truncated", "bindings"}
    assert result["tokens"][0] == "<|startoftext|>" and result["tokens"][-1] == "<|endoftext|>"
    (b,) = result["bindings"]
    assert b["noun"] == {"text": "dog", "start": 18, "end": 21, "token_indices": [6]}
    assert b["modifiers"] == [{"text": "small", "start": 12, "end": 17, "token_indices": [5]}]
    assert result["parser"].startswith("en_core_web")


def test_parse_readable():
    out = run_cli("parse", "a red and blue bird")
    assert out.returncode == 0
    assert "bird [5] <- red [2], blue [4]" in out.stdout and "parser:" in out.stdout


def test_parse_stdin_loads_parser_once(monkeypatch, capsys):
    calls = []
    real = A.load_parser

    def counting(name=None):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(A, "load_parser", counting)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a red apple\n\nred and blue\na café\n"))
    assert main(["parse", "-", "--json"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [json.loads(line)["prompt"] for line in lines] == ["a red apple", "", "red and blue", "a café"]
    assert len(calls) == 1


def test_parse_errors_are_messages_not_tracebacks():
    out = run_cli("parse", "a red car", "--parser", "no_such_pipeline")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no_such_pipeline" in out.stderr and "pip install" in out.stderr
    out = run_cli("parse", "-", "--json", stdin="a red car\n" + "x" * (A.MAX_PROMPT_CHARS + 5) + "\n")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    first, second = (json.loads(line) for line in out.stdout.strip().split("\n"))
    assert first["bindings"] and "characters long" in second["error"]
