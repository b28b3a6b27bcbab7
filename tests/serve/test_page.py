"""The web page in a real browser: Debian's Chromium driven by Playwright, against ``ti serve`` on
127.0.0.1. A person's path: photos in, live progress, the refined word, images drawn with it, the
word downloaded, and an over-limit photo's error where it happened. Screenshots are kept in
``runs/test-artifacts/`` (the README's picture is one of them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import ServerProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "runs" / "test-artifacts"
EXAMPLE = ROOT / "examples" / "toy" / "red-circle-stripes-silver"
CHROMIUM = os.environ.get("ONEWORD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is in the dev extra (make installs it)"
    )
    if CHROMIUM is None:
        pytest.skip("no chromium binary: `make test` installs Debian's chromium (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def _natural_widths(page, selector: str) -> list[int]:
    return page.eval_on_selector_all(selector, "els => els.map(e => e.complete ? e.naturalWidth : 0)")


def test_a_person_learns_a_word_draws_with_it_and_downloads_it(browser, tmp_path):
    from oneword.inversion.embedding_io import load_embedding

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    big = tmp_path / "too-big.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(big)  # ~480 KB of noise
    server = ServerProcess(tmp_path / "data", "--refine", "40", "--max-file-bytes", "200000")
    try:
        server.start()
        page = browser.new_page(viewport={"width": 1000, "height": 1400}, accept_downloads=True)
        page.goto(server.url)
        assert page.title().startswith("oneword")

        # the keyboard reaches the photo picker, the word's name and Start
        focused = []
        for _ in range(8):
            page.keyboard.press("Tab")
            focused.append(page.evaluate("document.activeElement.id"))
        assert {"photos", "token", "start"} <= set(focused), focused
        assert page.locator("label[for=photos]").count() and page.locator("label[for=prompt]").count()

        photos = sorted(str(p) for p in EXAMPLE.glob("*.png"))
        page.set_input_files("#photos", photos)
        assert page.locator("#thumbs img").count() == len(photos)
        page.fill("#token", "<red-disc>")
        page.click("#start")
        page.wait_for_function(
            "document.querySelectorAll('#preview-provisional img').length == 4", timeout=60_000
        )
        page.wait_for_function(
            "document.querySelector('#stage').textContent.startsWith('done')", timeout=180_000
        )
        page.wait_for_function("document.querySelectorAll('#preview-final img').length == 4", timeout=60_000)
        assert all(w > 0 for w in _natural_widths(page, "#preview-final img"))
        assert page.eval_on_selector("#bar", "b => b.value") == 40

        page.fill("#prompt", "a photo of <red-disc> on a teal background")
        page.click("#draw")
        page.wait_for_function("document.querySelectorAll('#images img').length == 4", timeout=60_000)
        page.wait_for_function(
            "[...document.querySelectorAll('#images img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        assert "used 1 of your words" in page.inner_text("#draw-status")
        page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)

        with page.expect_download() as info:
            page.click("button[aria-label='Download diffusers file of <red-disc>']")
        saved = tmp_path / info.value.suggested_filename
        info.value.save_as(saved)
        assert saved.name == "learned_embeds.safetensors" and load_embedding(saved).token == "<red-disc>"

        page.set_input_files("#photos", [photos[0], str(big)])
        page.fill("#token", "<another>")
        page.click("#start")
        page.wait_for_function(
            "document.querySelector('#learn-error').textContent.length > 0", timeout=30_000
        )
        error = page.inner_text("#learn-error")
        assert "too-big.png" in error and "over the limit" in error, error
        page.screenshot(path=str(ARTIFACTS / "serve-page-error.png"))

        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(server.url)
        phone.wait_for_function("document.querySelectorAll('#words li').length == 1", timeout=30_000)
        wide = phone.evaluate(
            "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 391)"
            ".map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))"
        )
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390, wide
        phone.screenshot(path=str(ARTIFACTS / "serve-page-phone.png"), full_page=True)
    finally:
        server.stop()
