"""The app's GPU entry point survives ZeroGPU's process boundary: through a stand-in ``spaces`` that pickles the
call and every yielded value and runs the work in a forked process (``tests/zerogpu.py``), a generation gives
its progress and its results, and a cancel stops the worker."""

from __future__ import annotations

import importlib
import sys
import time

import pytest
import zerogpu

pytestmark = pytest.mark.slow  # forks worker processes


@pytest.fixture(scope="module")
def app_on_zerogpu():
    zerogpu.install()
    sys.modules.pop("app", None)
    module = importlib.import_module("app")
    assert module.spaces is sys.modules["spaces"]
    yield module
    sys.modules.pop("spaces", None)
    sys.modules.pop("app", None)


class Progress:
    def __init__(self):
        self.calls = []

    def __call__(self, fraction, desc=""):
        self.calls.append((fraction, desc))


ROWS = {"headers": ["use", "modifiers", "noun"], "data": [[True, "red", "apple"], [True, "green", "banana"]]}
ARGS = ("a red apple and a green banana", ROWS, "tiny", "SynGen", ["syngen_positive", "syngen_negative"])


def test_a_generation_crosses_the_process_boundary(app_on_zerogpu):
    progress = Progress()
    outputs = list(app_on_zerogpu.generate(*ARGS, 3, 2, 5.0, 7.5, 4, False, progress=progress))
    final = outputs[-1]
    assert final[8] == 4 and "seed 4" in final[2]  # the seed and the summary of the finished run
    assert final[0] is not None and final[1] is not None
    assert len(progress.calls) >= 8 and progress.calls[-1][0] <= 1.0  # every step of both runs reported
    duration, name = zerogpu.GPU.calls[-1]
    assert name == "run_job" and duration > 10


def test_cancel_reaches_the_worker(app_on_zerogpu):
    progress = Progress()
    gen = app_on_zerogpu.generate(*ARGS, 150, 25, 5.0, 7.5, 4, False, progress=progress)
    for _ in range(4):
        next(gen)
    started = len(progress.calls)
    t0 = time.monotonic()
    gen.close()  # Gradio closes it on Cancel, on a client's job.cancel(), or when the visitor leaves
    assert started < 2 * 151  # stopped long before the end...
    # ...and close() returned only once the worker process had stopped (the stand-in joins it)
    assert time.monotonic() - t0 < 30


def test_the_old_entry_point_would_not_pickle():
    """What app.py passed before: a local progress closure and a threading.Event."""
    import pickle
    import threading

    def report(p):
        return p

    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps((report, threading.Event()))
