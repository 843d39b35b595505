"""Nothing a user owns is deleted or overwritten, and a kill at any instant leaves a complete old or new result."""

from __future__ import annotations

import json
import os
from collections import namedtuple

import numpy as np
import pytest
from PIL import Image

from binding import storage
from binding.records import RunResult, check_run_target, is_run_folder, load_run, save_run
from binding.storage import OutputError, check_writable, clean_stale, recover_dir, replace_dir


def _result(seed=0, colour="red"):
    img = Image.new("RGB", (8, 8), colour)
    return RunResult(prompt="a red cat", seed=seed, settings={"model": "tiny"}, bindings=[], subjects=[], grid=(2, 2),
                     tokens=["<|startoftext|>", "a</w>", "<|endoftext|>"], vanilla_image=img, guided_image=img,
                     vanilla_latents=np.zeros((1, 4, 2, 2), np.float32))


def _folder(path, files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_replace_dir_swaps_atomically_and_leaves_nothing_behind(tmp_path):
    old = _folder(tmp_path / "run", {"a": "old"})
    new = _folder(tmp_path / "new", {"a": "new"})
    replace_dir(new, old)
    assert (tmp_path / "run" / "a").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["run"]


def test_a_kill_between_the_fallback_renames_is_recovered(tmp_path, monkeypatch):
    """Without the atomic exchange the old folder is moved aside first; a kill right then loses nothing."""
    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    target = _folder(tmp_path / "run", {"a": "old"})
    new = _folder(tmp_path / "new", {"a": "new"})
    calls = []
    real = os.replace

    def killed_after_first(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill lands between the two renames
        return real(src, dst)

    monkeypatch.setattr(storage.os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, target)
    monkeypatch.setattr(storage.os, "replace", real)
    assert not target.exists()
    recover_dir(target)
    assert (target / "a").read_text() == "old"


def test_save_run_never_replaces_a_users_folder(tmp_path):
    mine = _folder(tmp_path / "photos", {"holiday.jpg": "precious"})
    with pytest.raises(FileExistsError, match="not a run of ours"):
        save_run(_result(), mine, overwrite=True)
    assert (mine / "holiday.jpg").read_text() == "precious" and sorted(os.listdir(mine)) == ["holiday.jpg"]
    save_run(_result(colour="red"), tmp_path / "run")
    assert is_run_folder(tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds a run"):
        save_run(_result(), tmp_path / "run")
    save_run(_result(seed=5, colour="blue"), tmp_path / "run", overwrite=True)
    assert load_run(tmp_path / "run").seed == 5
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_run_target(empty) == empty  # an empty folder is free to use


def test_cli_generate_refuses_a_non_run_folder_before_any_work(tmp_path, capsys, monkeypatch):
    from binding import models
    from binding.cli import main

    mine = _folder(tmp_path / "docs", {"notes.txt": "keep me"})
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("no model may load"))
    assert main(["generate", "a red cat", "--model", "tiny", "--out", str(mine)]) == 2
    assert "not a run of ours" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep me"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["generate", "a red cat", "--model", "tiny", "--out", str(blocker / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_check_writable_finds_a_full_or_blocked_output_first(tmp_path, monkeypatch):
    assert check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # it creates nothing
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: usage(100, 99, 1000))
    with pytest.raises(OutputError, match="MB free"):
        check_writable(tmp_path, need_bytes=10_000_000)


def test_clean_stale_removes_only_old_hidden_temporaries(tmp_path):
    old = _folder(tmp_path / ".p0001-s0-syngen.abc.tmp", {"x": "1"})
    fresh = _folder(tmp_path / ".p0002-s0-syngen.def.tmp", {"x": "1"})
    kept = _folder(tmp_path / "p0003-s0-syngen", {"metrics.json": "{}"})
    os.utime(old, (0, 0))
    assert clean_stale(tmp_path) == 1
    assert not old.exists() and fresh.exists() and kept.exists()


def test_eval_counts_only_complete_items_and_names_a_damaged_config(tmp_path):
    from binding.evaluation.runner import collect_rows, run_eval

    out = tmp_path / "eval"
    half = _folder(out / "items" / ".p0000-s0-syngen.x.tmp", {"metrics.json": json.dumps({"item": "half"})})
    done = _folder(out / "items" / "p0000-s0-vanilla", {"metrics.json": json.dumps({"item": "p0000-s0-vanilla"})})
    assert [r["item"] for r in collect_rows(out)] == ["p0000-s0-vanilla"]
    (out / "eval_config.json").write_text('{"set": "sha')  # what a kill mid-write used to leave
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    with pytest.raises(ValueError, match="eval_config.json cannot be read"):
        run_eval(str(prompts), out, methods=["syngen"], seeds=[0], model="tiny", steps=2, clip="none",
                 progress=False, log=lambda m: None)
    assert half.exists() and done.exists()  # nothing deleted
    users = _folder(tmp_path / "thesis", {"chapter1.tex": "..."})
    with pytest.raises(FileExistsError, match="not an evaluation of ours"):
        run_eval(str(prompts), users, methods=["syngen"], seeds=[0], model="tiny", steps=2, clip="none",
                 progress=False, log=lambda m: None)
    assert sorted(os.listdir(users)) == ["chapter1.tex"]
