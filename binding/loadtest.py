"""A class in a box: many visitors at once against the app, on this machine only (``python -m binding loadtest``).

It starts the app on a free loopback port (or takes ``--url``, which must be a loopback address), connects
``clients`` visitors (a gradio_client ``Client`` each, as a browser loads the page once), then has each send a
generation and, while they queue, the class sends ``parses`` prompt parses the way a page does as its visitor
types (the app's live-parse JSON route, outside Gradio's events and queue), all at once. It reports what each visitor
got: served, refused (the queue full), failed (any other error), whether a waiting visitor was told its place in
the queue and an estimate, the waits (p50 / p95), and the server's memory before and after. Every request is
bounded (``timeout``), so the run ends by itself.
"""

from __future__ import annotations

import concurrent.futures as cf
import ipaddress
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Outcome", "format_report", "run_loadtest"]

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("a red apple and a green banana", "a blue car and a red house", "a yellow flamingo and a pink sunflower",
           "a checkered bowl on a red and blue table", "a dog that is brown and a cat that is white")


@dataclass
class Outcome:
    kind: str  # "generate" or "parse"
    status: str  # "served", "refused", "failed"
    wait_s: float
    told_place: bool = False  # saw its rank in the queue and an estimate while waiting
    error: str = ""


@dataclass
class Report:
    settings: dict
    outcomes: list[Outcome] = field(default_factory=list)
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    wall_s: float = 0.0


def _check_loopback(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"the load test only targets this machine (127.0.0.1, localhost, [::1]), not {host!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _start_app(model: str, log) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    import tempfile

    logfile = open(Path(tempfile.gettempdir()) / f"binding-loadtest-app-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--model", model], cwd=ROOT,
                            env=env, stdout=logfile, stderr=subprocess.STDOUT)
    log(f"app log: {logfile.name}")
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with code {proc.returncode} before serving")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            log(f"app serving at {url}")
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("app.py did not serve within 180 s")


def _classify(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return "refused" if "queue is full" in text.lower() else "failed"


def _generate(client, k: int, steps: int, model: str, timeout: float) -> Outcome:
    start = time.monotonic()
    told = False
    try:
        rows = {"headers": ["use", "modifiers", "noun"], "data": []}
        job = client.submit(PROMPTS[k % len(PROMPTS)], rows, model, "SynGen", ["syngen_positive", "syngen_negative"],
                            steps, min(steps, 5), 20, 7.5, k, False, api_name="/generate")
        while not job.done():
            if time.monotonic() - start > timeout:
                job.cancel()
                return Outcome("generate", "failed", time.monotonic() - start, told, "timed out")
            st = job.status()
            if st.rank is not None and st.rank > 0 and st.queue_size:
                told = True
            time.sleep(0.25)
        job.result()
        return Outcome("generate", "served", time.monotonic() - start, told)
    except Exception as exc:  # every failure is an outcome to count
        return Outcome("generate", _classify(exc), time.monotonic() - start, told, str(exc)[:200])


async def _parse(http, url: str, k: int) -> Outcome:
    """One parse as a page sends it while its visitor types: its own JSON route (``lab.LIVE_PARSE_PATH``), over
    a kept-alive connection as a browser's."""
    from binding.lab import LIVE_PARSE_PATH

    start = time.monotonic()
    try:
        r = await http.post(urllib.parse.urljoin(url, LIVE_PARSE_PATH.lstrip("/")),
                            json={"prompt": f"{PROMPTS[k % len(PROMPTS)]} number {k}"})
        if r.status_code != 200 or "parse_html" not in r.json():
            return Outcome("parse", "failed", time.monotonic() - start, error=f"HTTP {r.status_code}: {r.text[:150]}")
        return Outcome("parse", "served", time.monotonic() - start)
    except Exception as exc:
        return Outcome("parse", _classify(exc), time.monotonic() - start, error=str(exc)[:200])


def _parses(url: str, n: int, timeout: float) -> list[Outcome]:
    """``n`` parses at once from one event loop, each from its own client (its own connection, as each visitor's
    browser has): the class's browsers are other machines, so the load generator must cost this machine little.
    200 client threads took a core of their own; one client sharing a pool of 200 connections cost 8 ms of CPU a
    request (twice the server's own cost), so the figures measured the load generator."""
    import asyncio
    import ssl

    import httpx

    async def everyone():
        tls = ssl.create_default_context()  # made once: each client would build its own (~20 ms each)
        clients = [httpx.AsyncClient(timeout=timeout, verify=tls, limits=httpx.Limits(max_connections=1))
                   for _ in range(n)]
        try:
            return await asyncio.gather(*(_parse(http, url, k) for k, http in enumerate(clients)))
        finally:
            await asyncio.gather(*(http.aclose() for http in clients))

    return list(asyncio.run(everyone())) if n else []


def _visitors(url: str, n: int, pool) -> list:
    """One gradio_client ``Client`` per visitor, made before the clock starts, each arriving as a page does (its
    load event, ``arrive``, where the app builds the visitor's session)."""
    from gradio_client import Client

    def arrive(_):
        client = Client(url, verbose=False)
        client.predict(api_name="/arrive")
        return client

    return list(pool.map(arrive, range(n)))


def run_loadtest(clients: int = 40, parses: int = 200, model: str = "tiny", steps: int = 10, url: str | None = None,
                 timeout: float = 900.0, log=print) -> Report:
    """See the module docstring. ``timeout`` bounds each request; the whole run ends within about that."""
    if clients < 0 or parses < 0 or clients + parses == 0 or clients + parses > 1000:
        raise ValueError("give between 1 and 1000 requests in all (--clients, --parses)")
    proc = None
    if url is None:
        proc, url = _start_app(model, log)
    _check_loopback(url)
    pid = proc.pid if proc else None
    report = Report({"clients": clients, "parses": parses, "model": model, "steps": steps, "url": url})
    try:
        report.rss_before_mb = _rss_mb(pid)
        with cf.ThreadPoolExecutor(max_workers=max(1, min(clients, 256))) as pool:
            people = _visitors(url, clients, cf.ThreadPoolExecutor(max_workers=8)) if clients else []
            log(f"{len(people)} visitors connected")
            t0 = time.monotonic()
            gens = [pool.submit(_generate, people[k], k, steps, model, timeout) for k in range(clients)]
            time.sleep(2.0 if clients else 0.0)  # the generations queue first, then the class types
            parses_ = _parses(url, parses, min(timeout, 120.0))
            report.outcomes = [f.result() for f in gens] + parses_
        report.wall_s = time.monotonic() - t0
        report.rss_after_mb = _rss_mb(pid)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return report


def _pct(values, q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def format_report(report: Report) -> str:
    lines = [f"load test on {report.settings['url']} ({report.settings['model']}, {report.settings['steps']} steps), "
             f"{report.wall_s:.0f} s in all"]
    lines.append(f"{'requests':<10} {'n':>5} {'served':>7} {'refused':>8} {'failed':>7} {'told place':>11} "
                 f"{'p50 wait s':>11} {'p95 wait s':>11}")
    for kind in ("generate", "parse"):
        rows = [o for o in report.outcomes if o.kind == kind]
        if not rows:
            continue
        served = [o.wait_s for o in rows if o.status == "served"]
        told = sum(o.told_place for o in rows)
        p50, p95 = _pct(served, 0.5), _pct(served, 0.95)
        lines.append(f"{kind:<10} {len(rows):>5} {len(served):>7} {sum(o.status == 'refused' for o in rows):>8} "
                     f"{sum(o.status == 'failed' for o in rows):>7} {told if kind == 'generate' else '-':>11} "
                     f"{'-' if p50 is None else f'{p50:.2f}':>11} {'-' if p95 is None else f'{p95:.2f}':>11}")
    errors = sorted({o.error for o in report.outcomes if o.error})[:5]
    lines += [f"  error: {e}" for e in errors]
    if report.rss_before_mb is not None:
        lines.append(f"server memory (RSS): {report.rss_before_mb:.0f} MB before, "
                     f"{report.rss_after_mb or float('nan'):.0f} MB after")
    return "\n".join(lines)
