"""Jobs for the app: progress as events, each method's result as soon as it is done, a cancel that crosses
process boundaries, a failed model load that keeps the model in use, and the ZeroGPU duration estimate."""

from __future__ import annotations

import pickle

import pytest

from binding import serving
from binding.guidance import Cancelled
from binding.models import ModelLoadError
from binding.serving import Job, run_job


def _job(**kw):
    base = dict(prompt="a red apple and a green banana", model="tiny", methods=("vanilla", "syngen"), steps=3,
                intervention_steps=2, step_size=5.0, seed=1)
    return Job(**{**base, **kw})


def test_a_job_and_its_events_pickle():
    job = _job()
    assert pickle.loads(pickle.dumps(job)) == job
    events = list(run_job(job))
    assert [e.kind for e in events].count("result") == 2
    fractions = [e.fraction for e in events if e.kind == "progress"]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] <= 1.0
    for e in events:
        pickle.loads(pickle.dumps(e))  # what ZeroGPU sends back across its process boundary
    results = {e.method: e.result for e in events if e.kind == "result"}
    assert results["vanilla"].settings["method"] == "vanilla" and results["syngen"].settings["method"] == "syngen"


def test_closing_the_consumer_stops_the_work_within_a_step():
    job = _job(steps=200, intervention_steps=25)
    gen = run_job(job)
    seen = [next(gen) for _ in range(3)]
    assert all(e.kind == "progress" for e in seen)
    gen.close()  # what Gradio does when a visitor cancels, leaves or a client calls job.cancel()
    assert not serving.cancel_requested(job.token)  # the flag was raised, honoured, then cleared
    assert not [t for t in __import__("threading").enumerate() if t.name == f"job-{job.token[:8]}"]


def test_the_flag_stops_a_job_in_another_process_too():
    job = _job(steps=200)
    serving.request_cancel(job.token)  # as the app's process would, for a worker's job
    with pytest.raises(Cancelled):
        list(run_job(job))


def test_a_failed_model_load_keeps_the_model_in_use(monkeypatch):
    serving.pipeline("tiny")

    def broken(name):
        raise ModelLoadError(f"cannot load {name}")

    import binding.models

    monkeypatch.setattr(binding.models, "load_pipeline", broken)
    with pytest.raises(ModelLoadError):
        serving.pipeline("sd-1.4")
    assert "tiny" in serving._PIPES


def test_gpu_seconds_covers_each_method_and_its_refinement():
    one = serving.gpu_seconds(_job(methods=("vanilla", "syngen"), steps=50))
    every = serving.gpu_seconds(_job(methods=("vanilla", "syngen", "divide-bind", "attend-excite"), steps=50))
    assert 20 < one < every <= 600
    assert serving.gpu_seconds(_job(methods=("vanilla", "divide-bind-original"), steps=50)) > serving.gpu_seconds(
        _job(methods=("vanilla", "divide-bind"), steps=50))  # larger refinement caps
