"""The report page in the real headless Chromium the app's browser test uses: it renders offline,
with no console error and no network request, and shows its sections and plots."""

import pytest

from test_ui_browser import CHROMIUM, _require_browser
from workbench.cli import main

pytestmark = pytest.mark.slow


def test_report_page_in_chromium(tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is Paris.\nBees collect nectar from flowers.\n" * 4)
    out = tmp_path / "profile"
    assert main(["profile", "zoo:tiny-moe-se", "--prompts", str(prompts), "--out", str(out), "--quiet"]) == 0
    page_path = out / "report.html"
    errors, requests = [], []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu",
                                                                  "--disable-dev-shm-usage",
                                                                  "--disable-background-networking"])
        try:
            page = b.new_page(viewport={"width": 1200, "height": 1600})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            headings = page.locator("h2").all_inner_texts()
            assert headings[:2] == ["Findings", "Largest experts"] and "Plots" in headings
            assert "layer 1 expert 5" in page.locator("li").first.inner_text()
            n_img = page.locator("img").count()
            assert n_img >= 5 and page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            b.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("file://", "data:"))] == []
    assert [u for u in requests if u.startswith("file://")] == [page_path.as_uri()]  # nothing else fetched
