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
from binding import lab

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


def settings_value(page, elem: str, value: str) -> None:
    page.get_by_role("tab", name="Settings").click()
    box = page.locator(f"#{elem} input[type=number]")
    box.fill(value)
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

    # 4. Fewer steps (a quick run) set by hand, then a preset: the hand-set values stay.
    settings_value(page, "steps", "8")
    settings_value(page, "intervention", "4")
    page.locator("#method").get_by_text("Attend-and-Excite").click()
    page.locator("#method").get_by_text("SynGen").click()
    expect(page.locator("#intervention input[type=number]")).to_have_value("4")

    # 5. Enter generates: both images, the maps, the overlap table; the stale note goes away.
    page.locator("#prompt textarea").press("Enter")
    for elem in ("vanilla", "guided"):
        expect(page.locator(f"#{elem} img")).to_be_visible(timeout=180_000)
    expect(page.locator("#summary")).to_contain_text("seed 0")
    page.get_by_role("tab", name="Maps").click()
    expect(page.locator("#heatmaps img")).to_be_visible()
    expect(page.locator("#maps-caption")).to_contain_text("Pass 9 of 9")
    page.screenshot(path=str(ARTIFACTS / "3-generated.png"), full_page=True)
    page.locator("#view-mode").get_by_text("guided steps").click()
    expect(page.locator("#maps-caption")).to_contain_text("guided steps")
    page.locator("#scale-mode").get_by_text("shared").click()
    expect(page.locator("#maps-caption")).to_contain_text("one colour scale for all")
    page.locator("#heatmaps").screenshot(path=str(ARTIFACTS / "4-heatmaps.png"))
    page.get_by_role("tab", name="Numbers").click()
    expect(page.locator("#overlaps")).to_contain_text("small → dog")

    # 6. A new prompt marks the old pictures as stale.
    prompt.fill("a red apple and a green banana")
    expect(page.locator("#stale")).to_contain_text("a dog and a small dog")


def test_compare_all_and_cancel(page):
    page.get_by_role("tab", name="Parse & pairs").click()
    page.locator("#prompt textarea").fill("a red apple and a green banana")
    expect(cell(page, 1, 2)).to_contain_text("banana")
    settings_value(page, "steps", "4")
    page.locator("#compare").click()
    expect(page.locator("#compare-table")).to_contain_text("Attend-and-Excite", timeout=180_000)
    expect(page.locator("#compare-row img")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "5-compare.png"), full_page=True)
    page.locator("#generate").click()  # a quick run whose results the cancelled one must leave in place
    expect(page.locator("#summary")).to_contain_text("4 steps", timeout=180_000)
    settings_value(page, "steps", "150")
    page.locator("#generate").click()
    progress = page.locator(".progress-text, .progress-level").first
    expect(progress).to_be_visible(timeout=60_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / "6-progress.png"), full_page=False)
    page.locator("#cancel").click()
    expect(page.get_by_text("Cancelled").first).to_be_visible(timeout=60_000)
    expect(page.locator("#vanilla img")).to_be_visible(timeout=30_000)  # the previous run's results stay
    expect(page.locator("#summary")).to_contain_text("4 steps")
    page.screenshot(path=str(ARTIFACTS / "7-cancelled.png"), full_page=False)


def test_teaching_model_is_the_offline_default(browser):
    """Started as the README starts it (no --model, no GPU): the shapes model, its examples, the scorer's
    verdicts drawn on the pictures, the lesson; Generate and both images fit the first screen; on a phone
    the two images stay side by side."""
    with running_app(None) as (url, _):
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(url)
        expect(page.locator("#banner")).to_contain_text("Teaching model trained on coloured shapes")
        first = lab.examples_for("shapes")[0]  # the measured examples' first, else the preset's
        expect(page.locator("#prompt textarea")).to_have_value(first)
        expect(cell(page, 0, 2)).to_contain_text(first.split(" and ")[0].split()[-1])
        page.locator("#generate").click()
        for elem in ("vanilla", "guided"):
            expect(page.locator(f"#{elem} img")).to_be_visible(timeout=180_000)
        for elem in ("generate", "vanilla", "guided"):
            box = page.locator(f"#{elem}").bounding_box()
            assert box["y"] + box["height"] <= 900, elem  # in the first screen at 1400x900
        summary = page.locator("#summary")
        expect(summary).to_contain_text("model shapes")
        expect(summary).to_contain_text("scorer, vanilla:")
        page.screenshot(path=str(ARTIFACTS / "8-teaching-model.png"), full_page=False)
        page.get_by_role("tab", name="Lesson").click()
        steps = (("1 · The leak", "The leak."), ("2 · Why it happens", "overlap"), ("3 · The fix", "held-out prompts"))
        for k, (title, words) in enumerate(steps):  # the "why" and "fix" steps state the run's measured overlaps
            page.get_by_role("button", name=title).click()
            expect(page.locator("#lesson-text")).to_contain_text(words, timeout=180_000)
            expect(page.locator("#lesson-image img")).to_be_visible(timeout=180_000)
            expect(page.get_by_text("processing")).to_have_count(0, timeout=60_000)  # the step, not its loading
            page.screenshot(path=str(ARTIFACTS / f"9-lesson-{k + 1}.png"), full_page=True)
        page.close()
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(url)
        phone.locator("#generate").click()
        expect(phone.locator("#guided img")).to_be_visible(timeout=180_000)
        v, g = phone.locator("#vanilla").bounding_box(), phone.locator("#guided").bounding_box()
        assert abs(v["y"] - g["y"]) < 5 and g["x"] > v["x"] + v["width"] - 5  # side by side
        phone.screenshot(path=str(ARTIFACTS / "10-phone.png"), full_page=True)
        phone.close()
