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

Without ZeroGPU the app runs jobs in one ``Worker`` process of its own. Generation is CPU- and GIL-heavy; in the
app's process it would starve the event loop, and a class typing prompts would wait seconds for each parse
behind it. In a process of its own it competes only as the operating system lets it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

__all__ = [
    "Event",
    "Job",
    "Worker",
    "cancel_requested",
    "gpu_seconds",
    "new_token",
    "pipeline",
    "request_cancel",
    "run_job",
]

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


def run_job(job: Job, stop=None) -> Iterator[Event]:
    """Vanilla and each method of ``job`` from its seed; yields progress after every denoising step and each
    method's result as soon as it is done. Raises ``Cancelled`` when the job's flag is raised (or ``stop()``
    says so)."""
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
                    events.put(Event("progress", frac, f"{method}: pass {p.step} of {p.total}"))

                (result,) = sampler(
                    job.prompt, [job.seed], method, runs=(side,), terms=job.terms if method == "custom" else None,
                    steps=job.steps, intervention_steps=job.intervention_steps, step_size=job.step_size,
                    guidance_scale=job.guidance_scale, callback=report,
                    bindings=None if job.bindings is None else list(job.bindings),
                    cancel=lambda: cancel_requested(job.token) or bool(stop and stop()),
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


_DONE = "done"
_READY = "ready"


def _work_loop(jobs, events, preload: str | None, parent: int) -> None:
    """The worker process: load ``preload``, then run each job and send its events, then ``(token, _DONE)``.

    It ends when the app does (its parent gone: a killed app must not leave a worker drawing for nobody).
    """
    import torch

    def orphaned() -> bool:
        return os.getppid() != parent

    # One core is left to the web server, so pages and live parses stay quick while a class's jobs draw.
    default = max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(max(1, int(os.environ.get("BINDING_WORKER_THREADS", default))))
    if preload:
        try:
            pipeline(preload)
        except Exception:  # the first job that needs it reports why
            pass
    events.put(("", _READY))
    while not orphaned():
        try:
            job = jobs.get(timeout=1.0)
        except queue.Empty:
            continue
        if job is None:
            return
        try:
            for event in run_job(job, stop=orphaned):
                events.put((job.token, event))
            events.put((job.token, _DONE))
        except BaseException as exc:  # handed to the app, raised there
            events.put((job.token, exc))


class Worker:
    """One process that owns the model and runs one job at a time; ``run`` yields its events in the caller.

    Started once by the app (spawned, so it shares no threads or locks with the app's process); restarted if it
    dies (out of memory, a crash), and that job then fails with a message instead of hanging.
    """

    def __init__(self, preload: str | None = None, ready_timeout: float = 900.0):
        self.preload = preload
        self.ready_timeout = ready_timeout
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        """Start the process and wait until its model is loaded, so the first visitor does not wait for it."""
        ctx = mp.get_context("spawn")
        self.jobs, self.events = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_work_loop, args=(self.jobs, self.events, self.preload, os.getpid()),
                                daemon=True, name="binding-worker")
        self.proc.start()
        try:
            token, item = self.events.get(timeout=self.ready_timeout)
        except queue.Empty:
            raise RuntimeError(f"the generation worker was not ready within {self.ready_timeout:.0f} s") from None
        if item != _READY:
            raise RuntimeError(f"the generation worker sent {item!r} before it was ready")

    def _next(self, timeout: float = 1.0):
        while True:
            try:
                return self.events.get(timeout=timeout)
            except queue.Empty:
                if not self.proc.is_alive():
                    code = self.proc.exitcode
                    self._start()
                    raise RuntimeError(f"the generation worker stopped (exit code {code}; out of memory?) and was "
                                       "restarted: try again, with fewer steps or a smaller model") from None

    def run(self, job: Job) -> Iterator[Event]:
        with self._lock:
            self.jobs.put(job)
            finished = False
            try:
                while True:
                    token, item = self._next()
                    if token != job.token:
                        continue  # left over from a job whose caller went away
                    if item == _DONE:
                        finished = True
                        return
                    if isinstance(item, BaseException):
                        finished = True
                        raise item
                    yield item
            finally:
                if not finished:  # the caller stopped early: stop the job, then drain what it still sends
                    request_cancel(job.token)
                    try:
                        while True:
                            token, item = self._next(timeout=60.0)
                            if token == job.token and (item == _DONE or isinstance(item, BaseException)):
                                break
                    except RuntimeError:
                        pass

    def close(self) -> None:
        self.jobs.put(None)
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.terminate()


# A UNet pass of the SDXL family at its 1024 px against SD 1.x's at 512 px. Counted FLOPs are 8.4x (6.76 against
# 0.80 TFLOP a forward, torch's FlopCounterMode on the published configs); a CPU's time is 6.2x (the bf16 bench:
# fwd+bwd 51.6 s against 8.3 s). A GPU runs SD 1.x at 512 px far below its peak, so per-step wall time there is
# nearer 4x: public A100 figures, not measured here, give SDXL 0.12 s a step at 1024 px (30 steps in 3.7 s, plain
# diffusers) and SD 1.5 0.032 s at 512 px (31 it/s). The per-pass seconds below are 7-9x those, which covers the
# gap. Check it with `bench --gpu-check --model arch:sdxl --size 1024` on a GPU.
SDXL_COST = 3.0


def gpu_seconds(job: Job) -> int:
    """A ZeroGPU reservation long enough for the job on a shared A100-class GPU (SD 1.x at 512 px, SDXL at
    1024 px at ``SDXL_COST`` times that): per method, its denoising (two UNet passes a step) plus its gradient
    passes (refinement counted at its worst)."""
    from binding.methods import METHODS, resolve_method
    from binding.models import preset

    p = preset(job.model)
    cost = SDXL_COST if p is not None and p.family == "sdxl" and p.builder is None else 1.0
    total = 10.0 * cost  # moving the model's weights onto the GPU slice and decoding
    for name in job.methods:
        m = resolve_method(name, job.terms if name == "custom" else None)
        total += cost * 0.15 * 2 * job.steps
        if m.terms and m is not METHODS["vanilla"]:
            updates = job.intervention_steps if job.intervention_steps is not None else m.intervention_steps
            refinement = sum(m.refinement_cap(i) for i in m.threshold_map) if m.refinement else 0
            total += cost * 0.4 * (min(updates, job.steps + 1) + refinement)
    return int(min(600, total))
