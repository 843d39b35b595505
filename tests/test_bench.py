"""The benchmark's options and the GPU check's CPU path: what they report, and that they fail loudly."""

import math

import pytest
import torch

from binding import bench
from binding.cli import main
from binding.methods import METHODS


def test_capped_lowers_only_the_caps_it_exceeds():
    original = bench.capped(METHODS["divide-bind-original"], 3)
    assert (original.refinement_cap(0), original.refinement_cap(5)) == (3, 3)
    assert bench.capped(METHODS["attend-excite"], 30).refinement_cap(0) == 20
    assert bench.capped(METHODS["syngen"], 3) is METHODS["syngen"]  # nothing to refine
    assert bench.capped(METHODS["divide-bind"], None) is METHODS["divide-bind"]


def test_bench_at_another_size_with_capped_refinement_and_no_warmup():
    report = bench.run_benchmark("tiny", steps=2, repeats=1, size=96, warmup=False, max_refinement=1)
    s = report["settings"]
    assert (s["size"], s["grid"], s["max_refinement"], s["warmup"]) == (96, [24, 24], 1, False)
    rows = {r["name"]: r for r in report["rows"]}
    # PNDM: 3 loop indices, all guided; refinement only at index 0, here at most 1 iteration (1 more pass)
    for m in ("syngen", "divide-bind", "divide-bind-original", "attend-excite"):
        assert 3 <= rows[m]["grad_passes"] <= 4
        assert rows[m]["floor_s"] == pytest.approx(rows["vanilla (maps captured)"]["seconds"]
                                                   + rows[m]["grad_passes"] * report["unit_s"])
    assert rows["syngen"]["grad_passes"] == 3
    assert all(r["peak_mem_mb"] > 100 for r in report["rows"])  # the process's RSS, not a difference
    text = bench.format_report(report)
    assert "refinement capped at 1 iterations" in text and "no warm-up" in text and "96 px, grid 24x24" in text
    widths = {len(line) for line in text.splitlines() if line.startswith(("syngen", "vanilla", "unit"))}
    assert len(widths) == 1  # the "-" cells are padded like the numbers


def test_gpu_check_dry_run_passes(capsys):
    assert main(["bench", "--gpu-check", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for m in ("syngen", "divide-bind", "divide-bind-original", "attend-excite"):
        assert f"probe {m}: finite; UNet ['bfloat16'], loss ['float32'], update ['float32']" in out
    assert "model tiny on cpu (bfloat16" in out and "diffusers attend-excite" in out
    assert "one generation (vanilla + guided + 2 decodes)" in out and "ZeroGPU" in out
    assert "GPU check (dry run on the CPU) passed" in out


def _break_the_loss(monkeypatch, how):
    from binding import guidance

    real = guidance.compute_terms

    def broken(plan, rec, i):
        total, parts, diag = real(plan, rec, i)
        return how(total), parts, diag

    monkeypatch.setattr(guidance, "compute_terms", broken)


def test_gpu_check_fails_loudly_on_nan(monkeypatch, capsys):
    _break_the_loss(monkeypatch, lambda total: total * math.nan)
    assert main(["bench", "--gpu-check", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "GPU check (dry run on the CPU) FAILED" in err and "NaN" in err


def test_gpu_check_fails_loudly_on_a_half_precision_loss(monkeypatch, capsys):
    _break_the_loss(monkeypatch, lambda total: total.to(torch.bfloat16))
    assert main(["bench", "--gpu-check", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "must be float32" in err and "bfloat16" in err


def test_gpu_check_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--gpu-check"]) == 1
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err


def test_bench_option_errors(capsys):
    assert main(["bench", "--dry-run"]) == 2
    assert "--dry-run goes with --gpu-check" in capsys.readouterr().err
    assert main(["bench", "--max-refinement", "0"]) == 2
    assert "--max-refinement must be at least 1" in capsys.readouterr().err
