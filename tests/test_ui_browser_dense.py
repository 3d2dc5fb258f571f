"""The Steer page's dense table on SmolLM2 in the real browser: profile the model on the Profile page,
then tick the massive-activation channel row that the profile put in the table; the continuation changes."""

from __future__ import annotations

import pytest

from test_ui_browser import CHROMIUM, LOAD_TIMEOUT_MS, STEP_TIMEOUT_MS, _go, _idle, _shot, _steered, serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_url(tmp_path_factory):
    with serve("smollm2-135m", tmp_path_factory) as url:
        yield url


def test_dense_steer_table_on_smollm2_in_browser(smollm2_url):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu",
                                                                  "--disable-dev-shm-usage"])
        try:
            page = b.new_context(viewport={"width": 1400, "height": 2200}).new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            expect.set_options(timeout=STEP_TIMEOUT_MS)
            page.goto(smollm2_url)
            expect(page.get_by_test_id("stSidebar").get_by_text("LlamaForCausalLM")).to_be_visible(timeout=LOAD_TIMEOUT_MS)
            _go(page, "Profile")
            box = page.get_by_label("Prompts, one per line")
            box.fill("The capital of France is Paris.\nWater boils at 100 degrees.")
            box.press("Control+Enter")  # commit the text before the click
            _idle(page)
            page.get_by_role("button", name="Run profile").click()
            expect(page.get_by_role("button", name="Build the report page (HTML)")).to_be_visible()
            _idle(page)
            _go(page, "Steer")
            expect(page.get_by_text("Channels, heads and neurons")).to_be_visible()
            _idle(page)
            base = page.get_by_test_id("stCode").nth(0).inner_text()
            assert _steered(page).inner_text() == base
            _shot(page, "steer_dense_before")
            grid = page.get_by_test_id("stDataFrame").get_by_test_id("data-grid-canvas").first
            frame = grid.bounding_box()
            # row 0 (channel 507), the "on" checkbox: the editable table has a row-marker column first (~40 px),
            # rows are 35 px under a 35 px header; one click on a checkbox cell flips it
            page.mouse.click(frame["x"] + 60, frame["y"] + 35 * 1.5)
            expect(page.get_by_text("1 active intervention: zero_channel L11.C507")).to_be_visible()
            _idle(page)
            expect(_steered(page)).not_to_have_text(base)
            _shot(page, "steer_dense_after")
        finally:
            b.close()
