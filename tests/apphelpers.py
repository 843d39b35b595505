"""Start app.py as a visitor meets it: a real server process on a free local port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(model: str | None = "tiny", timeout: float = 120.0):
    """Yield (url, seconds from start to a served page); stop the server afterwards. ``model=None`` starts
    the app as the README does, with no --model (the offline default)."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    artifacts = ROOT / "tests" / "artifacts"
    log = open(artifacts / f"app-{port}.log", "w") if artifacts.is_dir() else subprocess.DEVNULL
    start = time.perf_counter()
    flags = [] if model is None else ["--model", model]
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *flags],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with code {proc.returncode} before serving")
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if time.perf_counter() - start > timeout:
                    raise TimeoutError(f"app.py did not serve {url} within {timeout:.0f} s") from None
                time.sleep(0.25)
        yield url, time.perf_counter() - start
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
