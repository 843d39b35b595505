"""The app in a real browser (Debian's Chromium driven by Playwright), as a visitor uses it.

Screenshots land in tests/artifacts/ for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from apphelpers import running_app

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("BINDING_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-quic", "--no-first-run"]


pytestmark = pytest.mark.slow  # a real server (and a browser)

@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module: Playwright's sync API allows one running instance per thread."""
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser):
    with running_app("tiny") as (url, _):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        yield page
        page.close()


def cell(page, row: int, col: int):
    return page.locator(f"#pairs [data-testid=cell-{row}-{col}]")


def edit_cell(page, row: int, col: int, text: str) -> None:
    cell(page, row, col).dblclick()
    box = page.locator("#pairs textarea, #pairs input[type=text]").first
    box.fill(text)
    box.press("Enter")


def test_visitor_session(page):
    # 1. Type a prompt: the parse and the pairs follow.
    prompt = page.locator("#prompt textarea")
    prompt.fill("a dog and a small dog")
    expect(cell(page, 0, 2)).to_contain_text("dog#2")
    expect(page.locator("#parse svg.displacy")).to_contain_text("small")
    expect(page.locator("#tokens")).to_contain_text("small")
    page.screenshot(path=str(ARTIFACTS / "1-parse.png"), full_page=True)

    # 2. Edit a pair to a word that is not in the prompt: the problem is explained inline.
    edit_cell(page, 0, 2, "cat")
    expect(page.locator("#pair-problems")).to_contain_text("'cat' is not a word of the prompt")
    page.screenshot(path=str(ARTIFACTS / "2-bad-pair.png"), full_page=True)

    # 3. Bind "small" to the first dog instead: accepted, problems gone.
    edit_cell(page, 0, 2, "dog#1")
    expect(page.locator("#pair-problems")).not_to_contain_text("not a word")

    # 4. Fewer steps (a quick run), generate: both images, the heatmaps, the overlap table.
    steps = page.locator("#steps input[type=number]")
    steps.fill("8")
    steps.press("Enter")
    intervention = page.locator("#intervention input[type=number]")
    intervention.fill("4")
    intervention.press("Enter")
    page.locator("#generate").click()
    for elem in ("vanilla", "guided", "heatmaps"):
        expect(page.locator(f"#{elem} img")).to_be_visible(timeout=180_000)
    expect(page.locator("#overlaps")).to_contain_text("small → dog")
    expect(page.locator("#summary")).to_contain_text("seed 0")
    page.screenshot(path=str(ARTIFACTS / "3-generated.png"), full_page=True)
    page.locator("#heatmaps").screenshot(path=str(ARTIFACTS / "4-heatmaps.png"))


def test_progress_and_cancel(page):
    page.locator("#prompt textarea").fill("a red apple and a green banana")
    expect(cell(page, 1, 2)).to_contain_text("banana")
    steps = page.locator("#steps input[type=number]")
    steps.fill("100")
    steps.press("Enter")
    page.locator("#generate").click()
    progress = page.locator(".progress-text, .progress-level").first
    expect(progress).to_be_visible(timeout=60_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / "5-progress.png"), full_page=False)
    page.locator("#cancel").click()
    expect(page.get_by_text("Generation cancelled").first).to_be_visible(timeout=60_000)
    expect(page.locator("#vanilla img")).to_be_visible()  # the previous run's results stay
    page.screenshot(path=str(ARTIFACTS / "6-cancelled.png"), full_page=False)


def test_teaching_model_is_the_offline_default(browser):
    """Started as the README starts it (no --model, no GPU): the shapes model, its examples, the scorer's verdicts."""
    with running_app(None) as (url, _):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        expect(page.locator("#banner")).to_contain_text("Teaching model trained on coloured shapes")
        expect(page.locator("#prompt textarea")).to_have_value("a blue square and a yellow triangle")
        expect(cell(page, 0, 2)).to_contain_text("square")
        page.locator("#generate").click()
        for elem in ("vanilla", "guided", "heatmaps"):
            expect(page.locator(f"#{elem} img")).to_be_visible(timeout=180_000)
        summary = page.locator("#summary")
        expect(summary).to_contain_text("model shapes")
        expect(summary).to_contain_text("scorer, vanilla:")
        expect(summary).to_contain_text("scorer, guided:")
        page.screenshot(path=str(ARTIFACTS / "7-teaching-model.png"), full_page=True)
        page.close()
