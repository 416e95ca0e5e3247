"""The demo page in headless Chromium (Debian's, driven by Playwright) against the live server: text
arrives in pieces, a connection dropped mid-stream resumes by EventSource's own reconnect with
Last-Event-ID, and the final text equals the uninterrupted greedy text; Stop cancels on the server."""
from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import missing_tool
from tests.integration.conftest import API_KEY
from tests.live_server import LiveServer

CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright's own browser download cannot work offline
# Offline machines: no update checks, no sync, no first-run pages; no GPU in CI containers.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
AUTH = {"X-Auth-Token": API_KEY}
WAIT_MS = 60_000  # bound on waits in the page; never asserted on
PROMPT = "Tell me a fortune."
MAX_TOKENS = 450  # with ignore_eos: long enough that the drop lands mid-stream on a loaded machine (fits 512)
REPETITION_PENALTY = 1.3  # not the page's default: the page must send what the form says

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        missing_tool("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, streams_server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(streams_server.url + "/")
    # Every change of the output's length, to see the text arrive in pieces rather than at once.
    page.evaluate("""() => {
        window.outputLengths = [];
        const output = document.getElementById('output');
        new MutationObserver(() => window.outputLengths.push(output.textContent.length))
            .observe(output, {childList: true, characterData: true, subtree: true});
    }""")
    yield page
    context.close()


def fill_form(page, *, max_tokens: int, ignore_eos: bool) -> None:
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", "0")
    page.fill("#repetition-penalty", str(REPETITION_PENALTY))
    page.fill("#api-key", API_KEY)
    page.set_checked("#ignore-eos", ignore_eos)


def uninterrupted_text(srv: LiveServer, max_tokens: int) -> str:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "repetition_penalty": REPETITION_PENALTY}
    answer = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["message"]["content"]


def running(srv: LiveServer) -> float:
    families = text_string_to_metric_families(httpx.get(srv.url + "/metrics").text)
    return next(s.value for f in families for s in f.samples if s.name == "rivulet_requests_running")


def test_the_page_streams_and_a_dropped_connection_resumes_without_loss_or_repetition(page, streams_server):
    fill_form(page, max_tokens=MAX_TOKENS, ignore_eos=True)
    page.click("#start")
    page.wait_for_function("document.getElementById('output').textContent.length > 0", timeout=WAIT_MS)
    stream_id = page.text_content("#stream-id")

    # The server ends the page's connection mid-stream, without the done event, as a network drop would.
    dropped = httpx.post(f"{streams_server.url}/v1/streams/{stream_id}/drop-readers", headers=AUTH)
    assert dropped.json() == {"dropped": 1}

    page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=WAIT_MS)
    assert page.text_content("#reconnects") == "1"
    assert page.text_content("#output") == uninterrupted_text(streams_server, MAX_TOKENS)
    assert page.text_content("#error") == ""

    lengths = page.evaluate("window.outputLengths")
    assert lengths == sorted(lengths) and len(set(lengths)) > 10, "the text arrived in pieces, growing"
    assert re.fullmatch(r"\d+ ms", page.text_content("#ttft"))
    assert float(page.text_content("#tps")) > 0
    assert page.text_content("#tokens") == str(MAX_TOKENS)  # from the usage chunk


def test_stop_cancels_the_generation_on_the_server(page, streams_server):
    fill_form(page, max_tokens=MAX_TOKENS, ignore_eos=True)
    page.click("#start")
    page.wait_for_function("document.getElementById('output').textContent.length > 0", timeout=WAIT_MS)
    stream_id = page.text_content("#stream-id")
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=WAIT_MS)

    deadline = time.monotonic() + WAIT_MS / 1000
    while httpx.get(f"{streams_server.url}/v1/streams/{stream_id}").status_code != 404:
        assert time.monotonic() < deadline, "the DELETE did not reach the server"
        time.sleep(0.1)
    while running(streams_server) != 0:
        assert time.monotonic() < deadline, "the engine still runs the stopped generation"
        time.sleep(0.1)
    assert page.is_enabled("#start") and not page.is_enabled("#stop")


def test_a_wrong_key_is_shown_and_nothing_starts(page, streams_server):
    fill_form(page, max_tokens=8, ignore_eos=False)
    page.fill("#api-key", "not-the-key")
    page.click("#start")
    page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=WAIT_MS)
    assert "API key" in page.text_content("#error")
    assert page.text_content("#stream-id") == "–"
    assert page.is_enabled("#start")


# What the layout test measures in the page: sideways scrolling, controls past the right edge, and any
# placeholder wider than its field (measured in the field's own font).
LAYOUT_JS = """() => {
    const canvas = document.createElement('canvas').getContext('2d');
    const controls = [...document.querySelectorAll('input, textarea, button')];
    const outside = controls.filter(c => { const r = c.getBoundingClientRect();
                                            return r.left < 0 || r.right > window.innerWidth; }).map(c => c.id);
    const cut = controls.filter(c => c.placeholder).filter(c => {
        const style = getComputedStyle(c);
        canvas.font = style.font;
        const room = c.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
        return canvas.measureText(c.placeholder).width > room;
    }).map(c => c.id);
    return {scrollWidth: document.documentElement.scrollWidth, outside, cut};
}"""


@pytest.mark.parametrize("width, height", [(390, 844), (1366, 768)], ids=["phone", "laptop"])
def test_the_page_fits_a_phone_and_a_laptop(browser, streams_server, tmp_path, width, height):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.goto(streams_server.url + "/")
    page.screenshot(path=str(tmp_path / f"demo-page-{width}.png"), full_page=True)  # to look at on failure
    layout = page.evaluate(LAYOUT_JS)
    context.close()
    assert layout["scrollWidth"] <= width, "the page scrolls sideways"
    assert layout["outside"] == [], "controls past the edge of the screen"
    assert layout["cut"] == [], "placeholders cut off"
