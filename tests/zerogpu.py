"""A stand-in for Hugging Face's ``spaces`` package (ZeroGPU), strict where the real one is: ``spaces.GPU``
pickles the decorated call's arguments, runs the function in a forked worker process, and pickles every value
a generator yields back to the caller. Closing the caller's generator stops reading and ends the worker, as a
visitor who leaves does. Anything that would not cross the real process boundary fails here, in CI."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import types

_DONE = "__done__"


def _worker(fn, payload, out):
    args, kwargs = pickle.loads(payload)
    try:
        result = fn(*args, **kwargs)
        if isinstance(result, types.GeneratorType):
            for value in result:
                out.put(pickle.dumps(("value", value)))
        else:
            out.put(pickle.dumps(("return", result)))
        out.put(pickle.dumps((_DONE, None)))
    except BaseException as exc:  # noqa: BLE001 - handed to the caller, as the real worker does
        out.put(pickle.dumps(("error", exc)))


class GPU:
    calls: list = []  # (duration asked, function name) of every call, for tests

    def __init__(self, fn=None, duration=60):
        self.duration = duration
        self.fn = fn

    def __call__(self, *args, **kwargs):
        if self.fn is None:  # used as @GPU(duration=...)
            return GPU(args[0], self.duration)
        return self._run(*args, **kwargs)

    def _run(self, *args, **kwargs):
        duration = self.duration(*args, **kwargs) if callable(self.duration) else self.duration
        GPU.calls.append((duration, self.fn.__name__))
        payload = pickle.dumps((args, kwargs))  # raises for closures, locks, events...
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(self.fn, payload, out), daemon=True)
        proc.start()
        return self._read(proc, out)

    @staticmethod
    def _read(proc, out):
        try:
            while True:
                kind, value = pickle.loads(out.get(timeout=300))
                if kind == _DONE:
                    return
                if kind == "error":
                    raise value
                if kind == "return":
                    yield value
                    return
                yield value
        finally:
            # The worker ends on its own once told to stop (the job's cancel flag); what it still sends is read
            # and dropped, or it could not exit (a queue's feeder waits for its pipe to empty).
            import queue
            import time

            deadline = time.monotonic() + 30
            while proc.is_alive() and time.monotonic() < deadline:
                try:
                    out.get(timeout=0.1)
                except queue.Empty:
                    pass
            if proc.is_alive():
                proc.terminate()
                raise RuntimeError("the GPU worker did not stop within 30 s of its caller going away")


def install():
    """Put the stand-in where ``import spaces`` finds it; returns the module."""
    import sys

    module = types.ModuleType("spaces")
    module.GPU = GPU
    sys.modules["spaces"] = module
    return module
