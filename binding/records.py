"""A run as data: everything one seed produced, saved and loaded atomically.

``RunResult`` holds one seed's vanilla and guided runs side by side: settings, the bindings and subjects that
were guided, images, per-step attention maps, per-step losses, notes, timings and counters, final latents.
On disk a run is a folder::

    vanilla.png, guided.png   the images (absent when the run was not decoded)
    run.json                  settings, bindings, subjects, tokens, losses, notes, timings, counters (no arrays)
    run.npz                   vanilla_latents, guided_latents, vanilla_maps, guided_maps, each read layer's
                              maps and each step's prediction of the final latents

``save_run`` writes into a hidden temporary folder beside the target and renames it into place, so a reader
never sees a half-written run and a failure leaves nothing behind. ``save_run_archive`` puts the same files in
one .zip (for downloads), also atomically; ``load_run`` reads either.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from binding.analysis import Binding, Word
from binding.storage import clean_stale, recover_dir, replace_dir

__all__ = ["RUNS", "RunResult", "load_run", "save_run", "save_run_archive"]

RUNS = ("vanilla", "guided")
FORMAT_VERSION = 1


@dataclass
class RunResult:
    """One seed: the vanilla and the guided run from the same initial latents."""

    prompt: str
    seed: int
    settings: (
        dict  # JSON-able: model, method, terms, steps, intervention_steps, step_size, guidance_scale, size, grid...
    )
    bindings: list[Binding]
    subjects: list[Word]  # the A&E / D&B subjects (objects)
    grid: tuple[int, int]  # (H, W) of the attention maps
    tokens: list[str]  # CLIP tokens 0..n_tokens-1 (SOT ... EOT): the last axis of the maps
    vanilla_image: object = None  # PIL.Image or None when not decoded
    guided_image: object = None
    vanilla_maps: np.ndarray | None = (
        None  # (steps, H, W, n_tokens) float16, conditional branch, after each step's update
    )
    guided_maps: np.ndarray | None = None
    # run -> quantity -> one value per loop step (None where not computed). "vanilla"/"guided": the active loss
    # terms on each step's conditional maps; "guided_before_update": what the guidance pass optimised at that step.
    losses: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # run -> {"total_s", "denoise_s", "decode_s", "steps_s": [...]}
    counters: dict = field(
        default_factory=dict
    )  # run -> {"grad_passes", "backward_passes", "refinement_iterations", ...}
    vanilla_latents: np.ndarray | None = None  # (1, C, h, w) float32
    guided_latents: np.ndarray | None = None
    # Each read layer's head-averaged maps, for views that choose which layers to average:
    # (steps, layers, H, W, n_tokens) float16, in the order of ``settings["read_layers"]``.
    vanilla_layer_maps: np.ndarray | None = None
    guided_layer_maps: np.ndarray | None = None
    # Each step's prediction of the final latents (x0), (steps, C, h, w) float16: what the picture looked like
    # to the model at that step, for drawing that step's maps over it.
    vanilla_previews: np.ndarray | None = None
    guided_previews: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def guided_equals_vanilla(self) -> bool:
        """True when the guided side is the vanilla run itself (nothing was guided)."""
        return bool(self.settings.get("guided_is_vanilla", False))

    def maps(self, run: str) -> np.ndarray | None:
        """Per-step maps of ``run`` ("vanilla" or "guided")."""
        _check_run(run)
        return self.vanilla_maps if run == "vanilla" else self.guided_maps

    def final_maps(self, run: str) -> np.ndarray | None:
        """(H, W, n_tokens) maps of the last step of ``run``."""
        m = self.maps(run)
        return None if m is None or len(m) == 0 else m[-1]

    def mean_maps(self, run: str, steps: slice | None = None) -> np.ndarray | None:
        """(H, W, n_tokens) maps of ``run`` averaged over ``steps`` (all by default), in fp32 (DAAM-style)."""
        m = self.maps(run)
        return None if m is None or len(m) == 0 else m[steps or slice(None)].astype(np.float32).mean(0)

    def layer_maps(self, run: str) -> np.ndarray | None:
        _check_run(run)
        return self.vanilla_layer_maps if run == "vanilla" else self.guided_layer_maps

    def previews(self, run: str) -> np.ndarray | None:
        _check_run(run)
        return self.vanilla_previews if run == "vanilla" else self.guided_previews

    def image(self, run: str):
        _check_run(run)
        return self.vanilla_image if run == "vanilla" else self.guided_image

    def to_json(self) -> dict:
        """Everything but images and arrays, JSON-able."""
        return {
            "format": FORMAT_VERSION,
            "prompt": self.prompt,
            "seed": int(self.seed),
            "settings": _jsonable(self.settings),
            "bindings": [b.to_dict() for b in self.bindings],
            "subjects": [w.to_dict() for w in self.subjects],
            "grid": list(self.grid),
            "tokens": list(self.tokens),
            "losses": _jsonable(self.losses),
            "notes": list(self.notes),
            "timings": _jsonable(self.timings),
            "counters": _jsonable(self.counters),
        }


def _check_run(run: str) -> None:
    if run not in RUNS:
        raise ValueError(f"run must be one of {RUNS}, not {run!r}")


def _jsonable(x):
    """Plain JSON types; NaN/inf become None (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if x is None or isinstance(x, str):
        return x
    return str(x)


_ARRAYS = ("vanilla_latents", "guided_latents", "vanilla_maps", "guided_maps", "vanilla_layer_maps",
           "guided_layer_maps", "vanilla_previews", "guided_previews")


def _write_files(result: RunResult, folder: Path) -> None:
    for run in RUNS:
        img = result.image(run)
        if img is not None:
            img.save(folder / f"{run}.png", format="PNG")
    (folder / "run.json").write_text(json.dumps(result.to_json(), indent=1, allow_nan=False), encoding="utf-8")
    arrays = {k: getattr(result, k) for k in _ARRAYS if getattr(result, k) is not None}
    with open(folder / "run.npz", "wb") as f:
        np.savez_compressed(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


RUN_FILES = frozenset({"run.json", "run.npz", "vanilla.png", "guided.png"})
RUN_BYTES = 8 << 20  # room to ask for before writing one run at SD's 512 px (its maps make most of it)


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run written by ``save_run``: its run.json and nothing but a run's files."""
    p = Path(path)
    if not (p / "run.json").is_file():
        return False
    return all(f.name in RUN_FILES for f in p.iterdir())


def check_run_target(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Where a run may go: a new or empty folder, or (``overwrite``) an earlier run; never a folder of other
    files (``FileExistsError`` saying so). Called before any work, so nothing is lost by refusing."""
    target = Path(directory)
    recover_dir(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; give a folder for the run")
    if target.is_dir() and any(target.iterdir()):
        if not is_run_folder(target):
            raise FileExistsError(f"{target} holds files that are not a run of ours; choose another folder "
                                  "(nothing was written or deleted)")
        if not overwrite:
            raise FileExistsError(f"{target} already holds a run; pass --overwrite (overwrite=True) to replace it")
    return target


def save_run(result: RunResult, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``result`` to ``directory`` atomically: a hidden temporary folder beside it, then one atomic
    exchange of names (``binding.storage.replace_dir``), so a kill leaves the old run or the new one.

    An existing run is replaced only with ``overwrite=True``; a folder of other files never (``check_run_target``).
    """
    target = check_run_target(directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _write_files(result, tmp)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_run_archive(result: RunResult, path: str | os.PathLike) -> Path:
    """The same files as ``save_run`` in one .zip (for downloads), written atomically; ``load_run`` reads it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        folder = Path(tmp) / "run"
        folder.mkdir()
        _write_files(result, folder)
        partial = Path(tmp) / "run.zip"
        with zipfile.ZipFile(partial, "w") as z:
            for f in sorted(folder.iterdir()):  # PNG and npz are compressed already; deflate only the JSON
                z.write(f, f.name, compress_type=zipfile.ZIP_DEFLATED if f.suffix == ".json" else zipfile.ZIP_STORED)
        os.replace(partial, target)
    return target


def load_run(path: str | os.PathLike) -> RunResult:
    """The ``RunResult`` saved in a folder by ``save_run`` or in a .zip by ``save_run_archive``."""
    p = Path(path)
    if p.is_file() and zipfile.is_zipfile(p):
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(p) as z:
            names = {"run.json", "run.npz"} | {f"{run}.png" for run in RUNS}
            for name in z.namelist():
                if name in names:  # only the run's own files, never a path out of the folder
                    (Path(tmp) / name).write_bytes(z.read(name))
            return _load_folder(Path(tmp), p)
    return _load_folder(p, p)


def _load_folder(d: Path, where: Path) -> RunResult:
    from PIL import Image

    meta_path = d / "run.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{where} holds no run (no run.json)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    arrays: dict[str, np.ndarray] = {}
    if (d / "run.npz").is_file():
        with np.load(d / "run.npz") as z:
            arrays = {k: z[k] for k in z.files}
    images = {}
    for run in RUNS:
        p = d / f"{run}.png"
        if p.is_file():
            with Image.open(p) as im:
                images[run] = im.copy()
    return RunResult(
        prompt=meta["prompt"],
        seed=int(meta["seed"]),
        settings=meta["settings"],
        bindings=[Binding.from_dict(b) for b in meta["bindings"]],
        subjects=[Word.from_dict(w) for w in meta["subjects"]],
        grid=tuple(meta["grid"]),
        tokens=list(meta["tokens"]),
        vanilla_image=images.get("vanilla"),
        guided_image=images.get("guided"),
        vanilla_maps=arrays.get("vanilla_maps"),
        guided_maps=arrays.get("guided_maps"),
        losses=meta.get("losses", {}),
        notes=list(meta.get("notes", [])),
        timings=meta.get("timings", {}),
        counters=meta.get("counters", {}),
        vanilla_latents=arrays.get("vanilla_latents"),
        guided_latents=arrays.get("guided_latents"),
        **{k: arrays.get(k) for k in _ARRAYS[4:]},
    )
