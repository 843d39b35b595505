"""The class-in-a-box load test, small: it starts the app, every visitor is served, every parse answered, and it
refuses to aim at any machine but this one."""

from __future__ import annotations

import pytest

from binding.loadtest import format_report, run_loadtest

pytestmark = pytest.mark.slow  # a real server


def test_a_small_class_is_served_and_the_report_says_so():
    report = run_loadtest(clients=3, parses=30, model="tiny", steps=2, timeout=300, log=lambda _: None)
    by_kind = {k: [o for o in report.outcomes if o.kind == k] for k in ("generate", "parse")}
    assert len(by_kind["generate"]) == 3 and len(by_kind["parse"]) == 30
    assert all(o.status == "served" for o in report.outcomes), [o.error for o in report.outcomes if o.error]
    assert report.rss_before_mb and report.rss_after_mb
    text = format_report(report)
    assert "generate       3       3        0       0" in text and "parse         30      30        0       0" in text


@pytest.mark.parametrize("url", ["http://10.0.0.1:7860/", "http://example.org/"])
def test_only_this_machine_is_a_target(url):
    with pytest.raises(ValueError, match="only targets this machine"):
        run_loadtest(clients=1, parses=1, url=url)
