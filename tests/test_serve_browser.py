"""The page of `transformer serve` in a real browser: Debian's Chromium driven by Playwright (nothing downloaded)."""

import shutil
from pathlib import Path

import httpx
import pytest
from serve_process import ServeProcess

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)")
SENTENCE = "A man rides a horse."


@pytest.fixture(scope="module")
def url(untrained_model_dir):
    server = ServeProcess(untrained_model_dir, "--max-len-a", "0", "--max-len-b", "8")
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def page(url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def test_type_click_translate_and_read_the_translation(url, page):
    page.goto(f"{url}/")
    page.fill("#source", SENTENCE)
    page.click("#translate")
    page.wait_for_function("document.getElementById('status').textContent.endsWith(' ms')")
    expected = httpx.post(f"{url}/translate", json={"text": [SENTENCE]}, timeout=30).json()["translations"]
    assert page.inner_text("#output") == expected[0]
    assert page.inner_text("#model").startswith("model model (torch), beam 4")


def test_the_heatmap_of_one_sentence(url, page):
    page.goto(f"{url}/")
    page.fill("#source", SENTENCE)
    page.check("#show-attention")
    page.click("#translate")
    page.wait_for_selector("#heatmap:not([hidden])")
    heatmap = httpx.post(f"{url}/attention", json={"text": SENTENCE}, timeout=30).json()
    assert page.locator("#heatmap tbody tr").count() == len(heatmap["target"])
    assert page.locator("#heatmap tbody tr").first.locator("td").count() == len(heatmap["source"])
    assert page.inner_text("#output") == heatmap["translation"]


def test_an_error_is_shown_on_the_page(url, page):
    page.goto(f"{url}/")
    page.fill("#source", "x" * 1001)  # over --max-chars
    page.click("#translate")
    page.wait_for_selector("#status.error")
    assert "over the limit of 1000" in page.inner_text("#status")
