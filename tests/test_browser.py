"""The web page in a real browser: Debian's headless Chromium driven by Playwright.

Playwright's own browser download cannot reach the network here, so it drives /usr/bin/chromium
(installed by .ci/run). Skipped, with the reason, where that browser or Playwright is missing.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium; .ci/run does it)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra has it)")
pytest.importorskip("fastapi")
from playwright.sync_api import sync_playwright  # noqa: E402

from reslab.serve import create_app  # noqa: E402
from test_serve import export_cache, image_bytes, running_server  # noqa: E402, F401 (export_cache: autouse fixture)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from test_explain import toy_checkpoint

    checkpoint = toy_checkpoint(tmp_path_factory.mktemp("browser") / "toy.safetensors", train_steps=0, in_channels=3)
    with running_server(create_app(checkpoint)) as url:
        yield url


def wait_for_results(page, explained: str | None = None) -> None:
    page.wait_for_selector("#predictions .row", timeout=30_000)
    page.wait_for_function(
        "(c) => { const img = document.getElementById('overlay');"
        " return img.src.startsWith('blob:') && img.complete && img.naturalWidth === 320"
        " && (!c || document.getElementById('explained').textContent.includes(c)); }",
        arg=explained, timeout=30_000,
    )


def test_upload_shows_image_top_classes_and_overlay(browser, site, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 720})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(site)
    page.wait_for_function("document.getElementById('model').textContent.includes('resnet20')")

    photo = tmp_path / "photo.png"
    photo.write_bytes(image_bytes(size=(96, 72)))
    page.set_input_files("#file", str(photo))
    wait_for_results(page)

    rows = page.locator("#predictions .row")
    names = rows.locator(".name").all_inner_texts()
    percents = [float(t.rstrip("%")) for t in rows.locator(".pct").all_inner_texts()]
    assert sorted(names) == ["blank", "square"]
    assert percents == sorted(percents, reverse=True) and sum(percents) == pytest.approx(100, abs=0.2)
    assert page.evaluate("document.getElementById('preview').naturalWidth") == 96
    first_overlay = page.get_attribute("#overlay", "src")
    assert names[0] in page.inner_text("#explained")
    assert "photo.png" in page.inner_text("#status") and not page.is_visible("#error")

    rows.nth(1).click()  # explain the runner-up
    wait_for_results(page, explained=names[1])
    assert page.get_attribute("#overlay", "src") != first_overlay
    assert "explained" in rows.nth(1).get_attribute("class")

    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("RESLAB_SCREENSHOT"):  # e.g. docs/images/serve.png, for the README
        shutil.copyfile(shot, os.environ["RESLAB_SCREENSHOT"])
    assert not errors


def test_drop_and_a_refused_file(browser, site):
    page = browser.new_page()
    page.goto(site)
    png = base64.b64encode(image_bytes(size=(40, 40), seed=3)).decode()
    drop = """([data, name, type]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type }));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true }));
    }"""
    page.evaluate(drop, [png, "dropped.png", "image/png"])
    wait_for_results(page)
    assert page.locator("#predictions .row").count() == 2

    page.evaluate(drop, [base64.b64encode(b"not an image at all").decode(), "notes.txt", "text/plain"])
    page.wait_for_selector("#error", state="visible", timeout=30_000)
    assert "'notes.txt' is not an image" in page.inner_text("#error")
    assert not page.is_visible("#results")
