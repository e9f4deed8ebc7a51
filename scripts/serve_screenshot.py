"""The screenshot of `transformer serve`'s page in the README (docs/serve.png), taken with Playwright.

Starts `transformer serve --model MODEL` on a free port of 127.0.0.1, opens the page in Debian's
Chromium (headless), types a sentence, asks for its cross-attention heatmap, and saves the page
as a palette PNG (Pillow) to keep it small.

    python scripts/serve_screenshot.py --model runs/ende [--out docs/serve.png]
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import time

import httpx
from PIL import Image
from playwright.sync_api import sync_playwright

SENTENCE = "A little girl climbs into a wooden playhouse."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="docs/serve.png")
    args = p.parse_args()
    server = subprocess.Popen([sys.executable, "-m", "transformer", "serve", "--model", args.model, "--port", "0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        url = next(m.group(1) for line in server.stderr if (m := re.search(r"on (http://\S+:\d+)/", line)))
        while httpx.get(f"{url}/health").status_code != 200:
            time.sleep(0.1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
            page = browser.new_page(viewport={"width": 900, "height": 800})
            page.goto(f"{url}/")
            page.fill("#source", SENTENCE)
            page.check("#show-attention")
            page.click("#translate")
            page.wait_for_selector("#heatmap:not([hidden])")
            png = page.screenshot(full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=64)
    image.save(args.out, optimize=True)
    print(f"{args.out}: {image.width}x{image.height}")


if __name__ == "__main__":
    main()
