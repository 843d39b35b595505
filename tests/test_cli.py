"""The command line, as a user runs it."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from binding import analysis as A
from binding.cli import main


def run_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "binding", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow  # a subprocess per call
def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0 and "parse" in out.stdout


@pytest.mark.slow  # a subprocess per call
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


@pytest.mark.slow  # a subprocess per call
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
    stdin = io.TextIOWrapper(io.BytesIO("a red apple\n\nred and blue\na café\n".encode()), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["parse", "-", "--json"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [json.loads(line)["prompt"] for line in lines] == ["a red apple", "", "red and blue", "a café"]
    assert len(calls) == 1


def test_parse_batch_reports_a_bad_line_and_goes_on(monkeypatch, capsys):
    """Invalid UTF-8 and a lone surrogate (CESU bytes) are error objects; every other line is parsed."""
    data = b"a red apple\n\xff\xfe bad\na \xed\xa0\x80 cat\n" + "x".encode() * 10_001 + b"\na blue car\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert main(["parse", "-", "--json"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
    assert len(rows) == 5 and [r.get("line") for r in rows if "error" in r] == [2, 3, 4]
    assert "not UTF-8" in rows[1]["error"] and "characters long" in rows[3]["error"]
    assert rows[-1]["bindings"][0]["noun"]["text"] == "car"


@pytest.mark.slow  # a subprocess per call
def test_parse_errors_are_messages_not_tracebacks():
    out = run_cli("parse", "a red car", "--parser", "no_such_pipeline")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no_such_pipeline" in out.stderr and "pip install" in out.stderr
    out = run_cli("parse", "-", "--json", stdin="a red car\n" + "x" * (A.MAX_PROMPT_CHARS + 5) + "\n")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    first, second = (json.loads(line) for line in out.stdout.strip().split("\n"))
    assert first["bindings"] and "characters long" in second["error"]


@pytest.mark.slow  # a subprocess per call
def test_generate_writes_a_run_and_prints_json(tmp_path):
    out = run_cli("generate", "a red apple and a green banana", "--model", "tiny", "--method", "attend-excite",
                  "--seed", "0", "--steps", "4", "--intervention-steps", "2", "--out", str(tmp_path / "run"), "--json")
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"vanilla.png", "guided.png", "run.json", "run.npz"}
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == printed
    assert printed["settings"]["method"] == "attend-excite" and printed["settings"]["steps"] == 4
    assert printed["counters"]["guided"]["grad_passes"] >= 2
    again = run_cli("generate", "a red apple", "--model", "tiny", "--steps", "2", "--out", str(tmp_path / "run"))
    assert again.returncode == 2 and "--overwrite" in again.stderr  # an existing run is never silently replaced


@pytest.mark.slow  # a subprocess per call
def test_generate_seed_ranges_and_pairs(tmp_path):
    out = run_cli("generate", "a dog and a small dog", "--model", "tiny", "--seed", "0-1", "--steps", "2",
                  "--pair", "small:dog#1", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for seed in (0, 1):
        meta = json.loads((tmp_path / f"seed-{seed}" / "run.json").read_text())
        assert meta["seed"] == seed and meta["bindings"][0]["noun"]["start"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["", "--model", "tiny"], "prompt is empty"),
        (["a red cat", "--model", "no-such-model"], "Unknown model 'no-such-model'"),
        (["a red cat", "--model", "tiny", "--steps", "0"], "Inference steps must be"),
        (["a red cat", "--model", "tiny", "--pair", "blue:cat"], "'blue' is not a word of the prompt"),
        (["a red cat", "--model", "tiny", "--seed", "x"], "seeds must look like"),
        (["a red cat", "--model", "tiny", "--method", "custom"], "needs its loss terms"),
    ],
)
@pytest.mark.slow  # a subprocess per call
def test_generate_bad_input(tmp_path, args, message):
    out = run_cli("generate", *args, "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # a subprocess per call
def test_bench_prints_every_figure():
    out = run_cli("bench", "--model", "tiny", "--steps", "2", "--repeats", "1", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    names = [r["name"] for r in report["rows"]]
    assert {"syngen", "divide-bind", "attend-excite", "diffusers attend-excite", "vanilla (maps captured)"} <= set(names)
    for r in report["rows"]:
        assert r["seconds"] > 0
        if r["name"] in {"syngen", "divide-bind", "attend-excite"}:
            assert r["grad_passes"] >= 2 and r["floor_s"] > 0 and r["vs_floor"] > 0
    assert "capture_overhead" in report and report["ae_vs_diffusers"] > 0


def test_bench_leaves_the_pipeline_processors_as_they_were(monkeypatch):
    from binding import bench, models

    loaded = []
    real = models.load_pipeline

    def keep(*a, **k):
        loaded.append(real(*a, **k))
        return loaded[-1]

    monkeypatch.setattr(models, "load_pipeline", keep)
    bench.run_benchmark("tiny", steps=2, repeats=1)
    names = {type(p).__name__ for p in loaded[0].unet.attn_processors.values()}
    assert names == {"AttnProcessor2_0"}  # diffusers' A&E pipeline installs its own; the bench must undo that


def test_generate_out_of_memory_is_a_message(monkeypatch, tmp_path, capsys):
    import torch

    from binding import guidance

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(guidance.GuidedSampler, "__call__", oom)
    assert main(["generate", "a red cat", "--model", "tiny", "--out", str(tmp_path / "x")]) == 3
    err = capsys.readouterr().err
    assert "out of memory" in err and "--size" in err and not (tmp_path / "x").exists()
