"""The Streamlit app in a real browser: ``streamlit run ui/app.py`` on 127.0.0.1 (a free port) on the
random zoo:qwen3-moe (its greedy continuations run the full 20 tokens), driven by headless Debian Chromium through Playwright's Python package.

Skips when Chromium or Playwright is missing, unless ``WORKBENCH_REQUIRE_BROWSER=1`` (set by .ci/run),
which turns the skip into a failure. Screenshots go to ``runs/screenshots/`` (git-ignored; override
with ``WORKBENCH_SCREENSHOTS``); each test prints where it wrote them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "ui" / "app.py"
MODEL = "zoo:qwen3-moe"  # 4 layers x 8 experts
CHROMIUM = Path(os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium"))
SHOTS = Path(os.environ.get("WORKBENCH_SCREENSHOTS", ROOT / "runs" / "screenshots"))
# Deadlines, not sleeps: every wait polls a page condition and ends as soon as it holds, so generous
# deadlines cost nothing when the machine is idle and keep the test green on a loaded 2-core machine
# (checked with two CPU-burning processes beside the suite).
LOAD_TIMEOUT_MS = 180_000  # first page: model load (and on a cold cache, the tokenizer)
STEP_TIMEOUT_MS = 90_000  # one interaction (a profile run or a 20-token generation under load)

pytestmark = pytest.mark.slow


def _require_browser():
    """Skip (or, with WORKBENCH_REQUIRE_BROWSER=1, fail) with the reason when no browser can run."""
    missing = None
    if importlib.util.find_spec("playwright") is None:
        missing = "the playwright package is not installed (it is pinned in requirements.lock)"
    if missing is None and not os.access(CHROMIUM, os.X_OK):
        missing = f"{CHROMIUM} is missing (apt-get install -y chromium; .ci/run does this)"
    if missing:
        if os.environ.get("WORKBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"WORKBENCH_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@contextlib.contextmanager
def serve(model: str, tmp_path_factory):
    """``streamlit run ui/app.py -- --model MODEL`` on a free local port; yields its URL once it answers."""
    _require_browser()
    port = _free_port()
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--", "--model", model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not answer /_stcore/health in 180 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.25)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with serve(MODEL, tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def browser(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM),
                              args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                    "--disable-background-networking", "--disable-component-update",
                                    "--disable-sync", "--no-first-run"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, app_url):
    """A fresh browser session (so a fresh Streamlit session) on the app, model loaded."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 2200})
    pg = context.new_page()
    pg.set_default_timeout(STEP_TIMEOUT_MS)  # actions (click, fill)
    expect.set_options(timeout=STEP_TIMEOUT_MS)  # assertions: Playwright's own default is 5 s
    try:
        pg.goto(app_url)
        expect(pg.get_by_test_id("stSidebar").get_by_text("Qwen3MoeForCausalLM")).to_be_visible(timeout=LOAD_TIMEOUT_MS)
        yield pg
    finally:
        context.close()


def _idle(pg) -> None:
    """Wait until the script run is over (Streamlit shows its status widget while running)."""
    from playwright.sync_api import expect

    expect(pg.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=STEP_TIMEOUT_MS)


def _shot(pg, name: str) -> Path:
    """Screenshot the whole page: Streamlit scrolls inside its main section, so grow the viewport to it."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    size = pg.viewport_size
    height = pg.evaluate("document.querySelector('[data-testid=stMain]')?.scrollHeight || 0")
    if height > size["height"]:
        pg.set_viewport_size({"width": size["width"], "height": height})
        pg.wait_for_timeout(300)  # charts re-lay out
    pg.screenshot(path=str(path))
    pg.set_viewport_size(size)
    print(f"screenshot: {path}")
    return path


def _go(pg, name: str) -> None:
    pg.get_by_test_id("stSidebar").get_by_text(name, exact=True).click()


def _toggle(pg, row: int, column: int) -> None:
    """Flip a checkbox cell of the intervention table. The grid is a canvas: click the row's first
    cell (expert, read-only) to focus the grid, move right to the column, press Space.

    Each move waits until the grid's accessible table (cells ``glide-cell-COL-ROW``, which mirror the
    canvas's selection; not its values, which it shows as they were) has the cell selected and focused:
    a click's focus lands a frame or more later, and a key pressed before it goes to whatever had the
    focus, such as the sidebar's page radio, which an arrow key moves to another page."""
    grid = pg.get_by_test_id("stDataFrame").get_by_test_id("data-grid-canvas").first
    box = grid.bounding_box()
    row_height = 35  # Streamlit's data editor: header and rows are 35 px
    pg.mouse.click(box["x"] + 30, box["y"] + row_height * (row + 1.5))
    _focused(pg, 0, row)
    for col in range(1, column + 1):
        pg.keyboard.press("ArrowRight")
        _focused(pg, col, row)
    pg.keyboard.press("Space")


def _focused(pg, column: int, row: int) -> None:
    """Wait until cell (column, row) of the first grid is selected and has the keyboard focus. The cell is
    looked up anew at each poll, as React re-renders the table (a handle taken once goes stale)."""
    pg.wait_for_function(
        f"""() => {{
          const el = document.querySelector('[data-testid="stDataFrame"] [data-testid="glide-cell-{column}-{row}"]');
          return el !== null && el.getAttribute('aria-selected') === 'true' && el.contains(document.activeElement);
        }}""", timeout=STEP_TIMEOUT_MS, polling=50)


def _hover_cell(pg, chart, layer: int, expert: int, n_layers: int, n_experts: int) -> tuple[float, float]:
    """Put the pointer on a heatmap cell and wait until plotly's hover label names it; its page position.

    Plotly answers a hover only once it has laid the chart out, and a pointer that arrived earlier
    stays unanswered until it moves; so the pointer is moved off and back (the cell's position read
    anew each time, as the page may still reflow) until the label names the cell, within the deadline.
    """
    deadline = time.monotonic() + STEP_TIMEOUT_MS / 1000
    label = chart.locator(".hoverlayer")
    while True:
        box = chart.locator(".nsewdrag").first.bounding_box()
        if box is not None:
            x = box["x"] + box["width"] * (expert + 0.5) / n_experts
            y = box["y"] + box["height"] * (1 - (layer + 0.5) / n_layers)
            pg.mouse.move(x, y)
            try:
                pg.wait_for_function(
                    "([el, a, b]) => el && el.textContent.includes(a) && el.textContent.includes(b)",
                    arg=[label.element_handle(timeout=1000), f"expert {expert}", f"layer {layer}"], timeout=2000)
                return x, y
            except Exception:  # not laid out yet, or the label still shows another cell: move off, retry
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the heatmap's hover label never named layer {layer}, expert {expert}")
        pg.mouse.move(0, 0)


def _steered(pg):
    return pg.get_by_test_id("stCode").nth(1)


# In-page timing: Space's keydown to the first DOM mutation that changes the steered generation's
# text (Playwright's expect polls at 100-1000 ms steps, too coarse for a latency figure).
_WATCH = """() => {
  const code = () => document.querySelectorAll('[data-testid="stCode"]')[1];
  const before = code().innerText;
  const wb = window.__wb = {t0: null, t1: null};
  if (window.__wbKey) document.removeEventListener('keydown', window.__wbKey, true);
  window.__wbKey = (e) => { if (e.key === ' ' && wb.t0 === null) wb.t0 = performance.now(); };
  document.addEventListener('keydown', window.__wbKey, true);
  const obs = new MutationObserver(() => {
    const c = code();
    if (wb.t0 !== null && c && c.innerText !== before) { wb.t1 = performance.now(); obs.disconnect(); }
  });
  obs.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def _timed_toggle(pg, row: int, column: int, caption: str) -> tuple[float, float]:
    """Toggle a cell; seconds from the key press until the steered generation on the page changes, and
    the seconds of ``generate`` in it that the page reports."""
    from playwright.sync_api import expect

    before = _steered(pg).inner_text()
    pg.evaluate(_WATCH)
    _toggle(pg, row, column)
    expect(pg.get_by_text(caption)).to_be_visible()  # the app took the toggle (it shows before it generates)
    pg.wait_for_function("window.__wb.t1 !== null", timeout=STEP_TIMEOUT_MS, polling=50)
    latency = pg.evaluate("(window.__wb.t1 - window.__wb.t0) / 1000")
    expect(_steered(pg)).not_to_have_text(before)
    _idle(pg)
    generate = re.search(r"generated in ([0-9.]+) s", pg.get_by_text("generated in").inner_text())
    return latency, float(generate.group(1))


DROP = 2  # columns right of "expert": zero, drop


def test_steer_toggle_changes_generation_in_browser(page):
    from playwright.sync_api import expect

    _go(page, "Steer")
    expect(page.get_by_text("Without interventions")).to_be_visible(timeout=STEP_TIMEOUT_MS)
    expect(page.get_by_text("no active interventions")).to_be_visible()
    _idle(page)
    base = page.get_by_test_id("stCode").nth(0).inner_text()
    assert _steered(page).inner_text() == base
    _shot(page, "steer_before")

    # each toggle drops one more expert of layer 0; every set is new, so nothing comes from the cache
    latencies = [_timed_toggle(page, 0, DROP, "1 active intervention: drop L0.E0")]
    _shot(page, "steer_after")
    steered = _steered(page).inner_text()
    assert steered != base and steered.startswith("The capital of France is")
    assert page.get_by_test_id("stCode").nth(0).inner_text() == base  # the baseline does not move
    for n, row in enumerate((1, 3, 4), start=2):  # each of these sets changes the continuation (checked)
        latencies.append(_timed_toggle(page, row, DROP, f"{n} active interventions"))
    print("toggle -> updated 20-token generation in the browser (s): " + ", ".join(f"{t:.2f}" for t, _ in latencies)
          + "; of which generate (s): " + ", ".join(f"{g:.2f}" for _, g in latencies))
    expect(page.get_by_text("Download study YAML")).to_be_visible()


def test_profile_heatmap_click_selects_expert_and_adds_it_to_steer(page):
    from playwright.sync_api import expect

    prompts = page.get_by_label("Prompts, one per line")
    prompts.fill("The capital of France is Paris.\nWater boils at 100 degrees.")
    prompts.press("Control+Enter")  # commit the text before the click
    _idle(page)
    page.get_by_role("button", name="Run profile").click()
    expect(page.get_by_text("Selected expert")).to_be_visible(timeout=STEP_TIMEOUT_MS)
    _idle(page)
    _shot(page, "profile")

    # click the cell of layer 2, expert 5 in the max|down_proj| heatmap (4 layers x 8 experts, fixed ranges)
    chart = page.get_by_test_id("stPlotlyChart").first
    layer, expert = 2, 5
    x, y = _hover_cell(page, chart, layer, expert, n_layers=4, n_experts=8)
    page.mouse.click(x, y)
    expect(page.get_by_role("heading", name=f"Layer {layer}, expert {expert}")).to_be_visible()
    _idle(page)
    details = page.get_by_test_id("stDataFrame").filter(has=page.locator("[data-testid='data-grid-canvas']")).nth(1)
    expect(details).to_be_visible()
    _shot(page, "profile_selected")

    page.get_by_role("button", name="Add to the Steer table").click()
    expect(page.get_by_text(f"zero L{layer}.E{expert} is ticked")).to_be_visible()
    _go(page, "Steer")
    expect(page.get_by_text(f"1 active intervention: zero L{layer}.E{expert}")).to_be_visible()
    # the Steer page opens on the added expert's layer
    expect(page.get_by_role("combobox", name="MoE layer")).to_have_value(str(layer))
    expect(page.get_by_text("With interventions")).to_be_visible()
    _idle(page)
    _shot(page, "steer_from_profile")


def test_circuits_page_in_browser(page):
    from playwright.sync_api import expect

    _go(page, "Circuits")
    page.get_by_role("tab", name="Run discovery").click()
    for label, value in (("built-in facts", "2"), ("top edges", "40")):
        page.get_by_label(label, exact=True).fill(value)
        page.get_by_label(label, exact=True).press("Enter")
        _idle(page)
    page.get_by_role("button", name="Find circuit").click()
    expect(page.get_by_text(re.compile(r"\d+ of \d+ scored edges"))).to_be_visible(timeout=LOAD_TIMEOUT_MS)
    _idle(page)
    for name in ("circuit.json", "circuit.graphml", "circuit.dot"):
        expect(page.get_by_role("button", name=name)).to_be_visible()
    _shot(page, "circuits")
    with page.expect_download() as download:
        page.get_by_role("button", name=re.compile(r"circuit\.svg")).click()
    svg = Path(download.value.path()).read_text()
    download.value.save_as(SHOTS / "circuit.svg")
    print(f"downloaded: {SHOTS / 'circuit.svg'}")
    assert download.value.suggested_filename == "circuit.svg"
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg and 'id="edge-0"' in svg
