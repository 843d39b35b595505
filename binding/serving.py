"""Running generations for the app: picklable jobs, progress as events, cancellation across processes.

Why this shape. On Hugging Face ZeroGPU the GPU work runs in a forked worker process: ``spaces.GPU`` pickles
the decorated call's arguments and, for a generator, each value it yields. So the GPU entry point
(``run_job``) takes one ``Job`` of plain data and yields ``Event``s of plain data (PIL images and numpy
arrays, never CUDA tensors), and cancellation is a flag that crosses any process boundary on the machine: a
file named by the job's token (``request_cancel``), checked between denoising steps. The same code runs
in-process when there is no ZeroGPU. A visitor who leaves, or a client's ``job.cancel()``, closes the app's
generator; its ``finally`` raises the flag, so the worker stops within a step instead of running on.

Models are loaded once per process and kept (``pipeline``): at start-up in the app, so a GPU slice is spent on
generating, not loading (``gpu_seconds`` has no allowance for a load).
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

__all__ = ["Event", "Job", "cancel_requested", "gpu_seconds", "new_token", "pipeline", "request_cancel", "run_job"]

_CANCEL_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else \
    Path(tempfile.gettempdir())


@dataclass(frozen=True)
class Job:
    """One click: a prompt, its pairs, the model, the methods to run from one seed, and the settings."""

    prompt: str
    model: str
    methods: tuple[str, ...]  # "vanilla" first when wanted; each other one is a guided run from the same seed
    bindings: tuple | None = None  # binding.analysis.Binding (frozen dataclasses: picklable); None: the parse's
    terms: tuple[str, ...] | None = None  # for a "custom" method
    steps: int = 50
    intervention_steps: int | None = None
    step_size: float | None = None
    guidance_scale: float = 7.5
    seed: int = 0
    token: str = field(default_factory=lambda: new_token())


@dataclass(frozen=True)
class Event:
    """What ``run_job`` yields: ``kind`` "progress" (fraction, text) or "result" (method, RunResult)."""

    kind: str
    fraction: float = 0.0
    text: str = ""
    method: str = ""
    result: object = None


def new_token() -> str:
    return uuid.uuid4().hex


def _flag(token: str) -> Path:
    if not token or not token.isalnum():
        raise ValueError("a cancel token is letters and digits")
    return _CANCEL_DIR / f"binding-cancel-{token}"


def request_cancel(token: str) -> None:
    """Ask the job with ``token`` to stop after its current step, in whichever process it runs."""
    _flag(token).touch()


def cancel_requested(token: str) -> bool:
    return _flag(token).exists()


def clear_cancel(token: str) -> None:
    _flag(token).unlink(missing_ok=True)


def clear_stale_flags(older_than_s: float = 3600.0) -> int:
    """Remove cancel flags that no live job can be waiting on (a worker killed before it saw its flag)."""
    import time

    n = 0
    for f in _CANCEL_DIR.glob("binding-cancel-*"):
        try:
            if time.time() - f.stat().st_mtime > older_than_s:
                f.unlink()
                n += 1
        except OSError:
            pass
    return n


_PIPES: dict = {}
_PIPE_LOCK = threading.Lock()


def pipeline(model: str):
    """The loaded pipeline for a preset, kept while it is the one in use (one model in memory at a time).

    The model in use is replaced only once the new one has loaded: a failed load keeps it.
    """
    from binding.models import load_pipeline

    with _PIPE_LOCK:
        if model not in _PIPES:
            pipe = load_pipeline(model)  # raises ModelLoadError, leaving _PIPES as it was
            _PIPES.clear()
            _PIPES[model] = pipe
        return _PIPES[model]


def run_job(job: Job) -> Iterator[Event]:
    """Vanilla and each method of ``job`` from its seed; yields progress after every denoising step and each
    method's result as soon as it is done. Raises ``Cancelled`` when the job's flag is raised."""
    from binding.guidance import GuidedSampler

    pipe = pipeline(job.model)
    sampler = GuidedSampler(pipe)
    methods = list(job.methods)
    events: queue.Queue = queue.Queue()
    done = object()

    def work():
        try:
            for k, method in enumerate(methods):
                side = "vanilla" if method == "vanilla" else "guided"

                def report(p, k=k, method=method):
                    frac = (k + p.step / p.total) / len(methods)
                    events.put(Event("progress", frac, f"{method}: step {p.step} of {p.total}"))

                (result,) = sampler(
                    job.prompt, [job.seed], method, runs=(side,), terms=job.terms if method == "custom" else None,
                    steps=job.steps, intervention_steps=job.intervention_steps, step_size=job.step_size,
                    guidance_scale=job.guidance_scale, callback=report,
                    bindings=None if job.bindings is None else list(job.bindings),
                    cancel=lambda: cancel_requested(job.token),
                )
                events.put(Event("result", (k + 1) / len(methods), method=method, result=result))
        except BaseException as exc:  # handed to the consumer, raised there
            events.put(exc)
        finally:
            events.put(done)

    thread = threading.Thread(target=work, name=f"job-{job.token[:8]}", daemon=True)
    thread.start()
    try:
        while True:
            item = events.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # the consumer stopped early (cancel, a visitor gone): stop the work within a step
        if thread.is_alive():
            request_cancel(job.token)
            thread.join()
        clear_cancel(job.token)


def gpu_seconds(job: Job) -> int:
    """A ZeroGPU reservation long enough for the job on a shared A100-class GPU (SD 1.x, 512 px): per method,
    its denoising (two UNet passes a step) plus its gradient passes (refinement counted at its worst)."""
    from binding.methods import METHODS, resolve_method

    total = 10.0  # moving the model's weights onto the GPU slice and decoding
    for name in job.methods:
        m = resolve_method(name, job.terms if name == "custom" else None)
        total += 0.15 * 2 * job.steps
        if m.terms and m is not METHODS["vanilla"]:
            updates = job.intervention_steps if job.intervention_steps is not None else m.intervention_steps
            refinement = sum(m.refinement_cap(i) for i in m.threshold_map) if m.refinement else 0
            total += 0.4 * (min(updates, job.steps + 1) + refinement)
    return int(min(600, total))
