"""effvit serve in a real browser: Debian's Chromium, headless, driven by Playwright. The page straightens
a tilted and an upright photo (angles and actions as `effvit straighten` reports them, the downloaded file
byte for byte what it writes), shows a corrupt file's error on its card while the batch goes on, gives
the zip, and predicts with a checkpoint given by path. The screenshot is kept (its path is printed;
EFFVIT_SERVE_SCREENSHOT=docs/serve.png writes it there too)."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest
from test_serve import command_output, photos, running  # noqa: F401 - fixtures

from effvit.models import load_model
from effvit.predict import predict

CHROMIUM = Path("/usr/bin/chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (make test installs Debian's chromium)", allow_module_level=True)


@pytest.mark.slow
def test_the_page_in_chromium(photos, command_output, classifier, tmp_path, capsys):  # noqa: F811
    out, expected = command_output
    shot = tmp_path / "serve.png"
    with running() as server, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']")

            # Straighten: three files in one batch, the corrupt one in the middle, acting on every estimate
            page.check("#s-always")
            page.set_input_files("#s-files", [str(photos[n]) for n in ("tilted.jpg", "broken.jpg", "upright.jpg")])
            page.wait_for_selector("#s-progress[data-idle='true'][data-done='3']")
            assert page.inner_text("#s-progress .count") == "3 of 3 done, 1 with errors"
            for name in ("tilted.jpg", "upright.jpg"):
                card, ref = page.locator(f".card[data-name='{name}']"), expected[name]
                assert card.get_attribute("data-action") == ref["action"]
                assert float(card.get_attribute("data-angle")) == ref["angle"]
                assert card.locator(".angle").inner_text() == f"{ref['angle']:.2f}"
                assert card.locator(".confidence").inner_text() == f"{ref['confidence']:.3f}"
                assert card.locator(".reason").inner_text() == ref["reason"]
                for kind in ("before", "after"):  # the pictures loaded and were decoded by the browser
                    assert card.locator(f"img[alt='{kind}']").evaluate("i => i.complete && i.naturalWidth > 0")
                with page.expect_download() as download:
                    card.locator("a.download").click()
                assert download.value.suggested_filename == name
                assert Path(download.value.path()).read_bytes() == (out / name).read_bytes()
            tilted = page.locator(".card[data-name='tilted.jpg']")
            assert tilted.locator(".what").inner_text() == f"rotated by {-expected['tilted.jpg']['angle']:.1f} degrees"
            assert page.locator(".card[data-name='upright.jpg'] .what").inner_text().startswith("kept as is")
            broken = page.locator(".card[data-name='broken.jpg']")
            assert broken.get_attribute("data-state") == "error"
            assert broken.locator(".error").inner_text().startswith("broken.jpg could not be read: ")
            with page.expect_download() as download:
                page.click("#s-zip")
            with zipfile.ZipFile(download.value.path()) as zf:
                assert sorted(zf.namelist()) == ["tilted.jpg", "upright.jpg"]
                assert zf.read("tilted.jpg") == (out / "tilted.jpg").read_bytes()
            page.screenshot(path=str(shot), full_page=True)

            # a second browser (its own session) sees none of it
            other = browser.new_context().new_page()
            other.goto(server.url)
            other.wait_for_selector("body[data-ready='1']")
            assert other.locator(".card").count() == 0
            assert other.evaluate("fetch(document.getElementById('s-zip').href).then(r => r.status)") == 404
            # an upload the server refuses as too large: its message on the card (the page, told 64 MB when
            # it loaded, sends it; the server now takes 10 kB)
            server.app.max_bytes = 10_000
            other.set_input_files("#s-files", [str(photos["upright.jpg"])])
            other.wait_for_selector("#s-progress[data-idle='true'][data-done='1']")
            message = server.app.too_large("upright.jpg", photos["upright.jpg"].stat().st_size)
            assert other.inner_text(".card[data-name='upright.jpg'] .error") == message
            # loaded with the 10 kB limit, the page itself refuses it, with the same words, sending nothing
            other.reload()
            other.wait_for_selector("body[data-ready='1']")
            stored = len(list(server.app.root.rglob("*.jpg")))
            other.set_input_files("#s-files", [str(photos["upright.jpg"])])
            other.wait_for_selector("#s-progress[data-idle='true'][data-done='1']")
            assert other.inner_text(".card[data-name='upright.jpg'] .error") == message
            assert len(list(server.app.root.rglob("*.jpg"))) == stored
            server.app.max_bytes = 64_000_000

            # Predict: a checkpoint given by path, top classes as bars
            page.click("button[data-tab='predict']")
            assert page.is_visible("#predict") and not page.is_visible("#straighten")
            page.fill("#p-path", str(classifier))
            page.set_input_files("#p-files", [str(photos["upright.jpg"]), str(photos["broken.jpg"])])
            page.wait_for_selector("#p-progress[data-idle='true'][data-done='2']")
            (ref,) = predict(load_model(classifier), [str(photos["upright.jpg"])], topk=5).images
            rows = page.locator(".card[data-name='upright.jpg'] .bars li")
            assert rows.count() == len(ref.predictions) == 4  # a 4-class model: all of them
            for i, p in enumerate(ref.predictions):
                assert rows.nth(i).get_attribute("data-label") == p.label
                assert float(rows.nth(i).get_attribute("data-prob")) == p.prob
                assert rows.nth(i).locator(".prob").inner_text() == f"{100 * p.prob:.1f}%"
            assert page.locator("#p-cards .card[data-name='broken.jpg'] .error").inner_text().startswith(
                "broken.jpg could not be read")
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("EFFVIT_SERVE_SCREENSHOT"):
        shutil.copyfile(shot, target)
    with capsys.disabled():
        print(f"\nscreenshot of the Straighten tab: {shot}")
