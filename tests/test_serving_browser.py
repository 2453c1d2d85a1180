"""The chat page in a real headless browser (Debian's chromium via Playwright), against a live server with a key.

Skips (with the reason) when the Playwright package or /usr/bin/chromium is missing. The screenshot goes to
artifacts/serving/chat_page.png.
"""

import os
import pathlib

import pytest

from tests.test_serving_support import LiveServer

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = pathlib.Path(__file__).resolve().parent.parent / "artifacts" / "serving"
KEY = "sk-page-test"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                                 "(pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        except Exception as e:  # a browser that cannot start is an environment problem, not a page bug
            pytest.skip(f"chromium at {CHROMIUM} did not start: {e}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(default_model):
    s = LiveServer({"gpt4": default_model}, api_key=KEY, max_batch=4)
    yield s
    s.close()


def test_chat_page_streams_stops_and_starts_over(browser, server, default_model):
    context = browser.new_context(http_credentials={"username": "me", "password": KEY},
                                  viewport={"width": 1100, "height": 760})
    page = context.new_page()
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")  # the browser answers the Basic challenge with the key

    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelector('#model').value === 'gpt4'", timeout=10_000)

    # A long reply (EOS is never likely at temperature 0 with the no-EOS bias) that we stop mid-stream.
    page.fill("#max-tokens", "400")
    page.dispatch_event("#max-tokens", "change")
    page.fill("#input", "Write a long story about a dragon who learns to paint.")
    page.click("#send")
    reply = page.locator(".message.assistant").last
    page.wait_for_function("document.querySelector('.message.assistant').textContent.length > 5", timeout=30_000)
    first = len(reply.text_content())
    page.wait_for_function(f"document.querySelector('.message.assistant').textContent.length > {first}",
                           timeout=30_000)  # it grows: streamed, not delivered at once
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.click("#stop")
    page.wait_for_selector(".message.assistant[data-done='true']", timeout=10_000)
    assert page.is_visible("#send")
    assert server.wait_idle(5), "stopping in the page must free the server's row"
    stopped = reply.text_content()
    assert 0 < len(stopped) and "Error" not in stopped

    # Second turn: the request carries the history; markdown and code blocks render.
    page.fill("#max-tokens", "40")
    page.dispatch_event("#max-tokens", "change")
    page.fill("#input", "Show a Python hello world in a code block.")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll(\".message.assistant[data-done='true']\").length === 2",
                           timeout=60_000)
    assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[-1]["stream"] is True and bodies[-1]["model"] == "gpt4"
    rendered = page.evaluate("renderMarkdown('Hi **you**\\n\\n```python\\nprint(1 < 2)\\n```\\n<img src=x onerror=alert(1)>')")
    assert "<strong>you</strong>" in rendered and '<pre><code class="language-python">print(1 &lt; 2)' in rendered
    assert "<img" not in rendered
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat_page.png"), full_page=True)

    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    page.fill("#input", "Hello")
    page.click("#send")
    page.wait_for_selector(".message.assistant[data-done='true']", timeout=60_000)
    assert [m["role"] for m in bodies[-1]["messages"]] == ["user"]  # a new chat forgets the old history
    assert not errors, errors
    context.close()


def test_page_without_the_key_is_refused(browser, server):
    context = browser.new_context()
    response = context.request.get(server.url + "/")
    assert response.status == 401 and "basic" in response.headers["www-authenticate"].lower()
    context.close()
