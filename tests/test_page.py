"""The web page at GET /, in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; scripts/test.sh installs it) against a live server over the tiny checkpoint."""

from __future__ import annotations

import base64
import gc
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from conftest import make_image
from serving import LiveServer, data_url, png_bytes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
# The test suite writes the README's screenshots there when this is set.
SCREENSHOTS = os.environ.get("JANUSVL_SCREENSHOTS")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: scripts/test.sh installs it (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(janus):
    with LiveServer(janus) as live:
        yield live


class Page:
    """A fresh page on the server, recording console errors (network refusals aside: the tests
    provoke some on purpose and the page shows them in its error element) and any request that
    leaves the server (the page must work offline: no CDN, no fonts from elsewhere)."""

    def __init__(self, browser, url: str, width: int = 1100, height: int = 800) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
                     and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: r.url.startswith((url + "/", "data:", "blob:"))
                     or self.foreign.append(r.url))
        self.page.goto(url)

    def by(self, testid: str):
        return self.page.get_by_test_id(testid)

    def shot(self, path: Path) -> None:
        self.page.screenshot(path=str(path))
        assert path.stat().st_size > 1000

    def close(self) -> None:
        assert self.errors == [] and self.foreign == []
        self.context.close()


def _ask(page: Page, text: str, max_tokens: int = 20) -> str:
    page.by("max-tokens").fill(str(max_tokens))
    page.by("temperature").fill("0")
    page.by("chat-input").fill(text)
    page.by("chat-input").press("Enter")
    answer = page.by("assistant-message").last
    answer.wait_for()
    page.page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=assistant-message]')].every(e => e.dataset.state === 'done')",
        timeout=60000)
    return answer.inner_text()


def test_chat_with_an_image_matches_the_api(browser, server, tmp_path) -> None:
    picture = tmp_path / "cat.png"
    picture.write_bytes(png_bytes(make_image(96, 64, seed=5)))
    page = Page(browser, server.url)
    page.page.wait_for_function("() => document.getElementById('status').textContent.includes('ready')")
    assert "tiny" in page.page.locator("#status").inner_text()
    page.by("chat-image-input").set_input_files(str(picture))
    page.page.locator("#pending img").wait_for()
    first = _ask(page, "What is in this picture?")
    user = page.by("user-message")
    assert user.count() == 1 and user.first.inner_text() == "What is in this picture?"
    assert page.page.locator(".user .thumbs img").count() == 1

    client = server.client()
    turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture.read_bytes())}},
                                         {"type": "text", "text": "What is in this picture?"}]}]
    expected = client.chat.completions.create(model="tiny", messages=turn, max_tokens=20, temperature=0)
    assert first == expected.choices[0].message.content and first

    second = _ask(page, "And the colours?")  # the second turn carries the first
    history = [*turn, {"role": "assistant", "content": first}, {"role": "user", "content": [
        {"type": "text", "text": "And the colours?"}]}]
    expected = client.chat.completions.create(model="tiny", messages=history, max_tokens=20, temperature=0)
    assert second == expected.choices[0].message.content
    assert page.by("assistant-message").count() == 2
    page.shot(tmp_path / "chat.png")
    if SCREENSHOTS:
        page.shot(Path(SCREENSHOTS) / "chat.png")
    page.by("chat-new").click()
    assert page.by("assistant-message").count() == 0
    page.close()


def test_stop_cancels_the_answer_on_the_server(browser, server, tmp_path) -> None:
    page = Page(browser, server.url)
    page.by("max-tokens").fill("1800")
    page.by("chat-input").fill("Go on.")  # greedy: no EOS within 600 tokens (test_serve relies on it too)
    page.by("chat-send").click()
    answer = page.by("assistant-message").last
    page.page.wait_for_function("() => document.querySelector('[data-testid=assistant-message]').textContent.length > 20")
    assert answer.get_attribute("data-state") == "streaming"
    page.by("chat-stop").click()
    page.page.wait_for_function("() => document.querySelector('[data-testid=assistant-message]').dataset.state === 'done'")
    server.wait_idle(10)
    assert server.metric("janusvl_requests_running") == 0
    assert page.by("error").inner_text() == ""
    page.shot(tmp_path / "stopped.png")
    page.close()


def test_imagine_shows_progress_and_two_images(browser, server, tmp_path) -> None:
    page = Page(browser, server.url)
    page.by("imagine-tab").click()
    page.by("imagine-prompt").fill("a lighthouse at dusk")
    page.by("imagine-n").fill("2")
    page.by("imagine-seed").fill("3")
    page.by("imagine-go").click()
    page.page.wait_for_function("() => document.querySelector('[data-testid=imagine-progress]').value > 0")
    assert page.by("imagine-progress").get_attribute("max") == "576"
    page.by("imagine-image").nth(1).wait_for(timeout=120000)
    sizes = page.page.eval_on_selector_all("[data-testid=imagine-image]",
                                           "els => Promise.all(els.map(e => e.decode().then(() => [e.naturalWidth, e.naturalHeight])))")
    assert sizes == [[384, 384], [384, 384]]
    assert page.page.eval_on_selector("[data-testid=imagine-progress]", "e => e.value") == 576
    assert page.page.locator("#gallery a[download]").count() == 2
    shown = page.page.eval_on_selector_all("[data-testid=imagine-image]", "els => els.map(e => e.src)")
    reply = httpx.post(server.url + "/v1/images/generations", timeout=120, json={
        "model": "tiny", "prompt": "a lighthouse at dusk", "n": 2, "seed": 3, "cfg_weight": 5, "temperature": 1,
        "response_format": "b64_json", "size": "384x384"})
    assert shown == ["data:image/png;base64," + d["b64_json"] for d in reply.json()["data"]]
    page.shot(tmp_path / "imagine.png")
    if SCREENSHOTS:
        page.shot(Path(SCREENSHOTS) / "imagine.png")
    page.close()


def test_server_errors_appear_in_the_page(browser, janus, tmp_path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(make_image(400, 400, seed=6)))  # ~0.5 MB encoded
    with LiveServer(janus, max_body_bytes=100_000) as live:
        page = Page(browser, live.url, width=390, height=800)  # a phone-sized screen
        # nothing wider than the screen: no sideways scrolling, every control in view
        assert page.page.evaluate("() => document.documentElement.scrollWidth") <= 390
        for testid in ("chat-tab", "imagine-tab", "api-key", "chat-input", "chat-send", "chat-new", "max-tokens"):
            box = page.by(testid).bounding_box()
            assert box and 0 <= box["x"] and box["x"] + box["width"] <= 390, testid
        page.by("chat-image-input").set_input_files(str(big))
        page.page.locator("#pending img").wait_for()
        page.by("chat-input").fill("Describe it.")
        page.by("chat-send").click()
        page.page.wait_for_function("() => document.querySelector('[data-testid=error]').textContent.length > 0")
        assert "larger than" in page.by("error").inner_text()
        assert page.by("chat-send").is_enabled()
        page.shot(tmp_path / "error-phone.png")
        page.close()


def test_api_key_is_asked_for_and_kept(browser, janus, tmp_path) -> None:
    with LiveServer(janus, api_key="letmein") as live:
        page = Page(browser, live.url)
        page.page.wait_for_function("() => document.querySelector('[data-testid=error]').textContent.includes('API key')")
        page.by("api-key").fill("letmein")
        page.by("api-key").dispatch_event("change")
        page.page.wait_for_function("() => document.getElementById('status').textContent.includes('ready')")
        assert page.by("error").inner_text() == ""
        assert _ask(page, "Hello?", max_tokens=5)
        page.page.reload()  # kept in the browser's local storage
        assert page.by("api-key").input_value() == "letmein"
        page.shot(tmp_path / "api-key.png")
        page.close()


def test_keyboard_reaches_the_controls(browser, server, tmp_path) -> None:
    page = Page(browser, server.url)
    seen = set()
    for _ in range(25):
        page.page.keyboard.press("Tab")
        seen.add(page.page.evaluate("() => document.activeElement.dataset.testid || ''"))
    assert {"api-key", "chat-tab", "imagine-tab", "chat-input", "chat-send", "chat-new", "temperature"} <= seen
    page.shot(tmp_path / "keyboard.png")
    page.close()


def test_images_attach_by_drop_and_paste(browser, server, tmp_path) -> None:
    page = Page(browser, server.url)
    b64 = base64.b64encode(png_bytes(make_image(32, 32, seed=8))).decode()
    make = """(b64) => { const dt = new DataTransfer();
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'})); return dt; }"""
    page.page.dispatch_event("#composer", "drop", {"dataTransfer": page.page.evaluate_handle(make, b64)})
    page.page.wait_for_function("() => document.querySelectorAll('#pending img').length === 1")
    page.page.evaluate("""(b64) => { const dt = new DataTransfer();
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        dt.items.add(new File([bytes], 'pasted.png', {type: 'image/png'}));
        document.querySelector('[data-testid=chat-input]').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true})); }""", b64)
    page.page.wait_for_function("() => document.querySelectorAll('#pending img').length === 2")
    answer = _ask(page, "Two pictures?", max_tokens=6)
    assert page.page.locator(".user .thumbs img").count() == 2 and answer
    page.shot(tmp_path / "drop-paste.png")
    page.close()


def _released(server: LiveServer, timeout: float = 15) -> None:
    """The engine holds nothing of the requests it was given: no request, job or image buffer."""
    server.wait_idle(timeout)
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        stats = server.engine.stats()
        if not (stats.requests_alive or stats.jobs_alive or stats.image_bytes):
            return
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def test_imagine_stop_cancels_the_job_on_the_server(browser, server, tmp_path) -> None:
    page = Page(browser, server.url)
    made = server.metric("janusvl_image_generations_total")
    page.by("imagine-tab").click()
    page.by("imagine-prompt").fill("a field of sunflowers")
    page.by("imagine-n").fill("16")
    page.by("imagine-go").click()
    page.page.wait_for_function("() => document.querySelector('[data-testid=imagine-progress]').value > 2")
    assert page.by("imagine-go").is_disabled()
    page.by("imagine-stop").click()
    page.page.wait_for_function("() => !document.querySelector('[data-testid=imagine-go]').disabled")
    _released(server)
    assert server.metric("janusvl_requests_running") == 0
    assert server.metric("janusvl_image_generations_total") == made  # no image was finished
    assert page.page.eval_on_selector("[data-testid=imagine-progress]", "e => e.value") < 576
    assert page.by("imagine-image").count() == 0 and page.by("error").inner_text() == ""
    page.shot(tmp_path / "imagine-stopped.png")
    page.close()


def test_shift_enter_adds_a_line_and_the_settings_reach_the_server(browser, server, tmp_path) -> None:
    """Shift+Enter adds a line without sending; temperature, top-p, seed and max tokens go with the
    request: the sampled answer is the API's for the same settings (and another seed's differs)."""
    page = Page(browser, server.url)
    box = page.by("chat-input")
    box.fill("Tell me")
    box.press("Shift+Enter")
    box.press_sequentially("a story.")
    assert box.input_value() == "Tell me\na story." and page.by("user-message").count() == 0
    for testid, value in (("temperature", "1"), ("top-p", "0.9"), ("seed", "7"), ("max-tokens", "16")):
        page.by(testid).fill(value)
    box.press("Enter")
    page.page.wait_for_function(
        "() => document.querySelector('[data-testid=assistant-message]')?.dataset.state === 'done'", timeout=60000)
    answer = page.by("assistant-message").last.inner_text()
    assert page.by("user-message").first.inner_text() == "Tell me\na story."

    def api(seed: int) -> str:
        message = {"role": "user", "content": [{"type": "text", "text": "Tell me\na story."}]}
        reply = server.client().chat.completions.create(model="tiny", messages=[message], max_tokens=16,
                                                        temperature=1, top_p=0.9, seed=seed)
        return reply.choices[0].message.content

    assert answer == api(7) != api(8)
    page.shot(tmp_path / "settings.png")
    page.close()
