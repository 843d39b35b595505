"""Shared fixtures and the two tiers.

The fast tier (plain ``pytest``) is the unit and in-process end-to-end tests. The slow tier (``-m slow``) is
what starts processes or trains: the browser and gradio_client tests against a real server, accelerate's
multi-process run, the teaching model's training runs and the CLI in subprocesses. ``bash tests/run.sh`` (CI)
runs both.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def nlp():
    from binding.analysis import load_parser

    return load_parser()


@pytest.fixture(scope="module")
def tiny():
    """The offline random-weight model (built in code, bit-identical everywhere), one per test module."""
    from binding.models import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="session")
def shapes():
    """The shipped teaching model."""
    from binding.models import load_pipeline

    return load_pipeline("shapes")


@pytest.fixture
def one_thread():
    """Small models are latency-bound: one thread is as fast and immune to OpenMP stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
