"""The language-model page of `transformer serve` (lm.html) in a real browser: Debian's Chromium driven by Playwright."""

import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from serve_process import ServeProcess

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)")
PROMPT = "ROMEO:"
GAUGE = "transformer_lm_running_sequences"


@pytest.fixture(scope="module")
def url(lm_dir):
    server = ServeProcess(lm_dir)
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


def _open(page, url, prompt=PROMPT, temperature="0", max_tokens="24"):
    page.goto(f"{url}/")
    page.fill("#prompt", prompt)
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)


def _wait_status(page, prefix):
    page.wait_for_function("(p) => document.getElementById('status').textContent.startsWith(p)", arg=prefix)


def _count_output_changes(page):
    page.evaluate("""() => {
        window.outputChanges = 0;
        new MutationObserver((records) => { window.outputChanges += records.length; })
            .observe(document.getElementById('output'), {childList: true, characterData: true, subtree: true});
    }""")


def test_greedy_stream_matches_the_non_streamed_completion(url, page):
    _open(page, url)
    _count_output_changes(page)
    page.click("#generate")
    _wait_status(page, "done")
    expected = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0},
                          timeout=30).json()
    assert page.text_content("#output") == expected["choices"][0]["text"]
    assert page.evaluate("window.outputChanges") > 1
    status = page.text_content("#status")
    assert f"finish: {expected['choices'][0]['finish_reason']}" in status, status
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    page.wait_for_function("(m) => document.title.includes(m)", arg=model)


def test_ctrl_enter_generates(url, page):
    _open(page, url, max_tokens="4")
    page.press("#prompt", "Control+Enter")
    _wait_status(page, "done")
    expected = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0},
                          timeout=30).json()
    assert page.text_content("#output") == expected["choices"][0]["text"]


def test_an_error_is_shown_on_the_page(url, page):
    _open(page, url, max_tokens="100000")
    page.click("#generate")
    _wait_status(page, "error:")
    answer = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 100000, "temperature": 0,
                                                       "stream": True}, timeout=30)
    assert answer.status_code in (400, 413, 422)
    assert page.text_content("#status") == f"error: {answer.json()['error']['message']}"
    assert page.get_attribute("#generate", "disabled") is None  # ready for another try


def _metric(url, name) -> list[float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [float(m.group(2)) for m in re.finditer(rf"^{name}(\{{[^}}]*\}})?\s+(\S+)", text, re.MULTILINE)]


def test_stop_aborts_the_stream_and_the_server_frees_the_sequence(url, page):
    # Greedy, as long as the model allows: this model's continuation runs to max_tokens (no early EOS)
    prompt_tokens = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 1},
                               timeout=30).json()["usage"]["prompt_tokens"]
    longest = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["max_model_len"] - prompt_tokens
    full = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": longest, "temperature": 0},
                      timeout=30).json()
    assert full["choices"][0]["finish_reason"] == "length", full
    generated = _metric(url, "transformer_lm_generated_tokens_total")
    _open(page, url, temperature="0", max_tokens=str(longest))
    # Click Stop from inside the page as soon as the first piece of text shows, so that it lands mid-stream.
    first = page.evaluate("""() => new Promise((resolve) => {
        const output = document.getElementById('output');
        const observer = new MutationObserver(() => {
            if (output.textContent === '') return;
            observer.disconnect();
            document.getElementById('stop').click();
            resolve(output.textContent);
        });
        observer.observe(output, {childList: true, characterData: true, subtree: true});
        document.getElementById('generate').click();
    })""")
    assert first != ""
    _wait_status(page, "stopped")
    assert len(page.text_content("#output")) < len(full["choices"][0]["text"])
    assert page.get_attribute("#stop", "disabled") is not None
    end = time.monotonic() + 10
    while True:
        values = _metric(url, GAUGE)
        assert values, f"no {GAUGE} in /metrics"
        if all(v == 0 for v in values):
            break
        assert time.monotonic() < end, f"{GAUGE} still {values} 10 s after Stop"
        time.sleep(0.1)
    assert generated, "no transformer_lm_generated_tokens_total in /metrics"
    # the server cut the sequence short rather than generating all of it
    assert _metric(url, "transformer_lm_generated_tokens_total")[0] - generated[0] < longest
