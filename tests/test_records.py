"""Runs on disk: a complete round trip, and no partial folder when writing fails."""

import json

import numpy as np
import pytest
from PIL import Image

from binding import records
from binding.analysis import Binding, Word
from binding.records import RunResult, load_run, save_run


def _result(**overrides) -> RunResult:
    rng = np.random.default_rng(0)
    cat, red = Word("cat", 6, 9, (3,)), Word("red", 2, 5, (2,))
    fields = dict(
        prompt="a red cat",
        seed=7,
        settings={
            "model": "tiny",
            "method": "syngen",
            "terms": ["syngen_positive"],
            "steps": 2,
            "grid": [4, 4],
            "thresholds": {"0": 0.05},
            "negative_prompt": None,
        },
        bindings=[Binding(cat, (red,))],
        subjects=[cat],
        grid=(4, 4),
        tokens=["<|startoftext|>", "a</w>", "red</w>", "cat</w>", "<|endoftext|>"],
        vanilla_image=Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
        guided_image=Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
        vanilla_maps=rng.random((3, 4, 4, 5)).astype(np.float16),
        guided_maps=rng.random((3, 4, 4, 5)).astype(np.float16),
        losses={"guided": {"syngen_positive": [0.5, float("nan"), None]}},
        notes=["a note"],
        timings={"vanilla": {"total_s": 1.5, "steps_s": [0.5, 0.5, 0.5]}},
        counters={"guided": {"grad_passes": np.int64(2), "refinement": {"0": 1}}},
        vanilla_latents=rng.standard_normal((1, 4, 2, 2)).astype(np.float32),
        guided_latents=rng.standard_normal((1, 4, 2, 2)).astype(np.float32),
    )
    fields.update(overrides)
    return RunResult(**fields)


def test_round_trip(tmp_path):
    r = _result()
    path = save_run(r, tmp_path / "run")
    assert sorted(p.name for p in path.iterdir()) == ["guided.png", "run.json", "run.npz", "vanilla.png"]
    assert sorted(np.load(path / "run.npz").files) == [
        "guided_latents",
        "guided_maps",
        "vanilla_latents",
        "vanilla_maps",
    ]
    meta = json.loads((path / "run.json").read_text())
    assert "vanilla_maps" not in meta and meta["prompt"] == "a red cat"
    back = load_run(path)
    assert back.prompt == r.prompt and back.seed == r.seed and back.grid == (4, 4) and back.tokens == r.tokens
    assert back.settings == r.settings
    assert [b.to_dict() for b in back.bindings] == [b.to_dict() for b in r.bindings]
    assert [w.to_dict() for w in back.subjects] == [w.to_dict() for w in r.subjects]
    assert back.losses == {"guided": {"syngen_positive": [0.5, None, None]}}  # JSON has no NaN
    assert back.notes == r.notes and back.timings == r.timings
    assert back.counters == {"guided": {"grad_passes": 2, "refinement": {"0": 1}}}
    for run in ("vanilla", "guided"):
        assert np.array_equal(np.asarray(back.image(run)), np.asarray(r.image(run)))
        assert back.maps(run).dtype == np.float16 and np.array_equal(back.maps(run), r.maps(run))
    assert np.array_equal(back.vanilla_latents, r.vanilla_latents) and np.array_equal(
        back.guided_latents, r.guided_latents
    )
    assert back.final_maps("guided").shape == (4, 4, 5) and back.mean_maps("vanilla").dtype == np.float32


def test_missing_parts_round_trip(tmp_path):
    r = _result(vanilla_image=None, guided_image=None, guided_maps=None, guided_latents=None)
    back = load_run(save_run(r, tmp_path / "run"))
    assert back.guided_image is None and back.guided_maps is None and back.guided_latents is None
    assert np.array_equal(back.vanilla_maps, r.vanilla_maps)


def test_existing_folder_needs_overwrite(tmp_path):
    save_run(_result(seed=1), tmp_path / "run")
    with pytest.raises(FileExistsError):
        save_run(_result(seed=2), tmp_path / "run")
    save_run(_result(seed=2), tmp_path / "run", overwrite=True)
    assert load_run(tmp_path / "run").seed == 2
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(records.np, "savez_compressed", broken)
    with pytest.raises(OSError, match="disk full"):
        save_run(_result(), tmp_path / "run")
    assert list(tmp_path.iterdir()) == []  # no target, no temporary folder


def test_failed_overwrite_keeps_the_old_run(tmp_path, monkeypatch):
    save_run(_result(seed=1), tmp_path / "run")
    monkeypatch.setattr(records.np, "savez_compressed", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_run(_result(seed=2), tmp_path / "run", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert load_run(tmp_path / "run").seed == 1


def test_archive_round_trip_and_atomicity(tmp_path, monkeypatch):
    r = _result()
    path = records.save_run_archive(r, tmp_path / "run-seed7.zip")
    back = load_run(path)
    assert back.seed == 7 and [b.to_dict() for b in back.bindings] == [b.to_dict() for b in r.bindings]
    assert np.array_equal(back.guided_maps, r.guided_maps)
    assert np.array_equal(np.asarray(back.guided_image), np.asarray(r.guided_image))
    monkeypatch.setattr(records.np, "savez_compressed", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        records.save_run_archive(r, tmp_path / "other.zip")
    assert [p.name for p in tmp_path.iterdir()] == ["run-seed7.zip"]


def test_load_needs_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run"):
        load_run(tmp_path)


def test_real_run_round_trips(tmp_path):
    from binding.guidance import GuidedSampler
    from binding.models import load_pipeline

    (r,) = GuidedSampler(load_pipeline("tiny"))("a red cat and a blue dog", 0, "divide-bind", steps=2)
    back = load_run(save_run(r, tmp_path / "run"))
    assert back.settings == json.loads(json.dumps(r.to_json()))["settings"]
    assert back.losses.keys() == r.losses.keys()
    assert np.array_equal(back.guided_maps, r.guided_maps) and np.array_equal(back.guided_latents, r.guided_latents)
    assert back.guided_image.size == (64, 64)
