"""What a Hugging Face Space needs to accept the push and to serve a class: large and binary files in LFS
patterns, the preset limit a Space sets, and the Space's front matter."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from binding import lab

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def _lfs(paths: list[Path]) -> dict[Path, bool]:
    rel = [str(p.relative_to(ROOT)) for p in paths]
    out = subprocess.run(["git", "check-attr", "filter", "--", *rel], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    flags = {line.split(": ")[0]: line.endswith(": lfs") for line in out.splitlines()}
    return {p: flags[str(p.relative_to(ROOT))] for p in paths}


def _binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def test_every_file_the_hub_would_refuse_is_an_lfs_pattern():
    files = _tracked()
    assert any(p.suffix == ".safetensors" for p in files)  # the shipped teaching model is there to check
    need = [p for p in files if p.stat().st_size > 10 * MIB or (p.stat().st_size > MIB and _binary(p))]
    lfs = _lfs(need)
    assert need and all(lfs.values()), [str(p.relative_to(ROOT)) for p, ok in lfs.items() if not ok]
    text = [p for p in files if p.suffix in (".py", ".md", ".json", ".txt")]
    assert not any(_lfs(text).values())  # code and text stay plain


def test_a_space_can_limit_the_presets(monkeypatch):
    monkeypatch.setenv(lab.PRESETS_ENV, "shapes")
    assert lab.allowed_models() == ["shapes"]
    assert "This server offers shapes" in lab.model_banner("shapes")
    with pytest.raises(ValueError, match="not offered here"):
        lab.GenerationRequest.from_ui("a red cat", [], "tiny", "SynGen", ["syngen_positive"], 4, 2, 5, 7.5, 0)
    monkeypatch.setenv(lab.PRESETS_ENV, "shapes,sd-9")
    with pytest.raises(ValueError, match="sd-9"):
        lab.allowed_models()


def test_a_cpu_space_offers_only_the_offline_presets(monkeypatch):
    import torch

    monkeypatch.delenv(lab.PRESETS_ENV, raising=False)
    monkeypatch.setenv("SPACE_ID", "someone/binding")
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lab.allowed_models() == ["shapes", "tiny"]
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert "sd-1.4" in lab.allowed_models()


def test_the_front_matter_is_a_gradio_space():
    head = (ROOT / "README.md").read_text(encoding="utf-8").split("---")[1]
    meta = dict(line.split(": ", 1) for line in head.strip().splitlines())
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    import gradio

    assert meta["sdk_version"] == gradio.__version__  # the Space runs the Gradio the tests ran
