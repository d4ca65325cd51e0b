"""The pages: the web console at /ui, the index page at /, Swagger UI at /v1/docs.

The first tests fetch them over HTTP and need no browser. The rest drive a real headless
Chromium (Debian's package, which scripts/setup.sh installs; Playwright drives it, its own
browser download is not used) against the session's real server and its default models.
Each view's screenshot is saved under .cache/ui-screenshots/.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from types import SimpleNamespace
from urllib.parse import urljoin

import httpx
import pytest

from tests.conftest import ROOT, start_server

SHOTS = ROOT / ".cache" / "ui-screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH: scripts/setup.sh installs Debian's chromium (root and apt-get)")
LOCAL_REF = re.compile(r'(?:src|href)="([^"]+)"')
IMPORT = re.compile(r'from "(\./[^"]+)"')


def references(text: str) -> list[str]:
    return [r for r in LOCAL_REF.findall(text) if not r.startswith(("data:", "#"))]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)
    return value


# -- served without a CDN (no browser) ---------------------------------------------------------
def test_console_files_are_all_served_by_the_server_with_no_cdn(http):
    page = http.get("/ui/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert http.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    seen, todo = {}, [urljoin("/ui/", r) for r in references(page.text)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        r = http.get(path)
        assert r.status_code == 200, path
        seen[path] = r.text
        if path.endswith(".js"):
            todo += [urljoin(path, name) for name in IMPORT.findall(r.text)]
    assert {"/ui/app.js", "/ui/chat.js", "/ui/models.js", "/ui/live.js", "/ui/chart.js", "/ui/console.css"} <= set(seen)
    for path, text in {"/ui/": page.text, **seen}.items():
        assert not re.search(r"https?://", text), f"{path} refers to another host"


def test_docs_page_loads_swagger_ui_from_this_server(http):
    page = http.get("/v1/docs")
    assert page.status_code == 200
    refs = references(page.text)
    assert refs and all(r.startswith("/v1/docs/assets/") for r in refs), refs
    for ref in refs:
        assert http.get(ref).status_code == 200, ref
    assert "SwaggerUIBundle" in http.get("/v1/docs/assets/swagger-ui-bundle.js").text
    assert http.get("/v1/openapi.json").json()["paths"]


def test_index_page_describes_the_service_and_links_its_pages(http):
    page = http.get("/")
    assert page.status_code == 200
    assert "customize this README" not in page.text
    for link in ('href="/ui/"', 'href="/v1/docs"', 'href="/models"'):
        assert link in page.text
    assert "SmolLM2-135M-Instruct (the Q4_1 GGUF, served as Q8_0) on llama.cpp" in page.text  # the aliases' descriptions
    assert not re.search(r"https?://", page.text)


def test_ui_false_turns_the_console_off_and_the_index_stops_linking_it():
    from starlette.testclient import TestClient

    from llmserve.config import load_settings
    from llmserve.web.app import app

    settings = load_settings().model_copy(update={"ui": False})
    saved = getattr(app.state, "ops", None)
    app.state.ops = SimpleNamespace(settings=settings, list_models=lambda: {"data": []})
    try:
        client = TestClient(app)
        off = client.get("/ui/")
        assert off.status_code == 404 and "ui: false" in off.json()["error"]["message"]
        assert client.get("/ui/app.js").status_code == 404
        bare = client.get("/ui", follow_redirects=False)
        assert bare.status_code == 404 and "ui: false" in bare.json()["error"]["message"]
        assert 'href="/ui/"' not in client.get("/").text
        assert client.get("/v1/docs").status_code == 200  # the API's docs stay
    finally:
        app.state.ops = saved


# -- in a browser ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium on PATH: scripts/setup.sh installs Debian's chromium (root and apt-get)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


def open_page(browser, url: str):
    """A fresh page at the server, recording what its console and network report as errors."""
    context = browser.new_context(base_url=url, viewport={"width": 1280, "height": 760})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.problems = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: page.problems.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: page.problems.append(f"request failed: {r.url} {r.failure}"))
    return page


@pytest.fixture
def page(browser, server):
    p = open_page(browser, server.url)
    yield p
    p.context.close()


def open_chat(page, alias="smollm2"):
    page.goto("/ui/#chat")
    page.wait_for_selector("#alias[data-ready=true]")
    page.select_option("#alias", alias)


def last_reply(page):
    return page.locator(".msg.assistant").last


@needs_browser
@pytest.mark.parametrize("path, ready", [
    ("/", "table td code"),
    ("/ui/#chat", "#alias[data-ready=true]"),
    ("/ui/#models", "#models tr[data-alias=smollm2]"),
    ("/ui/#live", "#chart-tps[data-samples]"),
    ("/v1/docs", ".swagger-ui .info .title"),
])
def test_every_page_loads_with_no_console_errors(page, path, ready):
    page.goto(path)
    page.wait_for_selector(ready)
    if "#" not in path:  # the console's views poll every 1-2 s: never idle on a busy machine
        page.wait_for_load_state("networkidle")
    name = {"/": "index", "/v1/docs": "docs"}.get(path, path.split("#")[-1])
    page.screenshot(path=SHOTS / f"{name}.png")
    assert page.problems == []
    if path == "/v1/docs":
        assert "llmserve" in page.inner_text(".swagger-ui .info .title")


@needs_browser
def test_a_chat_reply_streams_token_by_token_with_its_stats_and_the_conversation_is_kept(page, http):
    open_chat(page)
    page.fill("#system", "You are a helpful assistant.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "120")
    page.fill("#prompt", "Write a short poem about the sea.")
    page.click("#send")
    # seen mid-stream, in one look (the reply may end right after): part of the reply on the page
    # while the request still runs, with Stop enabled and Send not
    page.wait_for_function("""() => {
        const m = [...document.querySelectorAll('.msg.assistant')].pop();
        return m && m.classList.contains('streaming') && Number(m.dataset.chunks) >= 2
            && !document.getElementById('stop').disabled && document.getElementById('send').disabled; }""")
    reply = last_reply(page)
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
    stats = reply.locator(".stats").inner_text()
    m = re.fullmatch(r"TTFT ([\d.]+) s · ([\d.]+) tokens/s · (\d+) prompt \+ (\d+) completion tokens · "
                     r"finish: (stop|length)", stats)
    assert m, stats
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
    assert 2 <= int(reply.get_attribute("data-chunks")) <= int(m.group(4)) <= 120
    assert reply.locator(".text").inner_text().strip()
    page.screenshot(path=SHOTS / "chat.png")

    # the conversation is kept across a reload, and sent again with the next question
    page.reload()
    page.wait_for_selector("#alias[data-ready=true]")
    assert page.locator(".msg").count() == 2
    page.fill("#max-tokens", "8")
    page.fill("#prompt", "Now one about the mountains.")
    page.click("#send")
    page.wait_for_function("() => [...document.querySelectorAll('.msg.assistant')].pop().dataset.state === 'done'",
                           timeout=60_000)
    assert page.locator(".msg.assistant").count() == 2
    second = last_reply(page).locator(".stats").inner_text()
    prompt_tokens = int(re.search(r"(\d+) prompt", second).group(1))
    assert prompt_tokens > int(m.group(3)) + int(m.group(4))  # the first exchange went with it
    page.click("#clear")
    assert page.locator(".msg").count() == 0
    page.reload()
    page.wait_for_selector("#alias[data-ready=true]")
    assert page.locator(".msg").count() == 0


@needs_browser
def test_stop_aborts_the_generation_on_the_server(page, server):
    aborted = server.metric("llm_requests_total", model="smollm2", status="aborted")
    open_chat(page)
    page.fill("#max-tokens", "1500")
    page.fill("#extra", '{"ignore_eos": true}')  # ~15 s of tokens unless stopped
    page.fill("#prompt", "Tell me a long story.")
    page.click("#send")
    page.wait_for_function("""() => {
        const m = [...document.querySelectorAll('.msg.assistant')].pop();
        return m && m.classList.contains('streaming') && Number(m.dataset.chunks) >= 3; }""")
    assert server.metric("llm_requests_running", model="smollm2") >= 1
    page.click("#stop")
    wait_for(lambda: server.metric("llm_requests_running", model="smollm2") == 0, 30,
             "llm_requests_running{model=smollm2} back to 0 after Stop")
    reply = last_reply(page)
    page.wait_for_selector(".msg.assistant[data-state=stopped]")
    assert "stopped" in reply.locator(".stats").inner_text()
    assert int(reply.get_attribute("data-chunks")) < 1500
    wait_for(lambda: server.metric("llm_requests_total", model="smollm2", status="aborted") == aborted + 1, 10,
             "the request counted as aborted")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


@needs_browser
def test_a_bad_field_is_shown_as_a_message_naming_it(page):
    open_chat(page)
    page.fill("#max-tokens", "1000000")
    page.fill("#prompt", "Hi")
    page.click("#send")
    notice = page.locator("#notice")
    notice.wait_for()
    text = notice.inner_text()
    assert text.startswith("400 Bad request (field `max_tokens`): max_tokens is 1000000"), text
    assert "max_tokens is 1000000" in last_reply(page).locator(".error").inner_text()


@needs_browser
def test_load_and_unload_change_the_alias_state_on_the_page(page, http):
    alias = "smollm2-embed"  # llama.cpp, loads in seconds; no other test needs it
    page.goto("/ui/#models")
    row = page.locator(f"#models tr[data-alias={alias}]")
    row.wait_for()
    if row.get_attribute("data-state") == "loaded":
        row.locator("button.unload").click()
        page.wait_for_selector(f"#models tr[data-alias={alias}][data-state='not loaded']", timeout=60_000)
    row.locator("button.load").click()
    page.wait_for_selector(f"#models tr[data-alias={alias}][data-state=loaded]", timeout=120_000)
    assert "MiB" in row.locator("td").nth(4).inner_text()  # memory
    assert re.search(r"[\d.]+ s", row.locator("td").nth(5).inner_text())  # load time
    assert "loaded" in page.inner_text("#notice")
    assert next(m for m in http.get("/models").json()["data"] if m["id"] == alias)["loaded"]
    page.screenshot(path=SHOTS / "models.png")
    row.locator("button.unload").click()
    page.wait_for_selector(f"#models tr[data-alias={alias}][data-state='not loaded']", timeout=60_000)
    assert not next(m for m in http.get("/models").json()["data"] if m["id"] == alias)["loaded"]


@needs_browser
def test_a_model_that_fails_to_load_shows_failed_and_why(page):
    alias = "llama3-8b"  # its weights are not on this machine, and no hub is reachable
    page.goto("/ui/#models")
    row = page.locator(f"#models tr[data-alias={alias}]")
    row.wait_for()
    row.locator("button.load").click()
    page.wait_for_selector(f"#models tr[data-alias={alias}][data-state=failed]", timeout=180_000)
    why = row.locator(".why").inner_text()
    assert why.strip()
    page.wait_for_function(f"() => document.getElementById('notice').textContent.includes('Loading {alias}:')")


@needs_browser
def test_the_live_chart_has_data_after_a_few_requests(page, http):
    page.goto("/ui/#live")
    for _ in range(3):
        r = http.post("/v1/chat/completions", json={"model": "smollm2", "max_tokens": 48, "ignore_eos": True,
                                                    "messages": [{"role": "user", "content": "Count to ten."}]})
        assert r.status_code == 200, r.text
    page.wait_for_function("() => Number(document.getElementById('peak-tps').textContent) > 0")
    assert int(page.get_attribute("#chart-tps", "data-samples")) >= 2
    page.wait_for_function(f"() => Number(document.getElementById('total-tokens').textContent) >= {3 * 48}")
    # the tokens/s line is drawn: pixels of its colour on the canvas
    drawn = page.evaluate("""() => {
        const c = document.getElementById('chart-tps');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 90 && d[i + 2] > 150 && d[i + 3] > 100) n++;
        return n; }""")
    assert drawn > 50
    page.screenshot(path=SHOTS / "live.png")


# -- keys and limits, on a server of its own ----------------------------------------------------
INFERENCE, ADMIN = "ui-inference-key", "ui-admin-key"


@pytest.fixture(scope="module")
def guarded():
    if CHROMIUM is None:
        pytest.skip("no Chromium on PATH: scripts/setup.sh installs Debian's chromium (root and apt-get)")
    s = start_server({"LLMSERVE_API_KEYS": INFERENCE, "LLMSERVE_ADMIN_KEYS": ADMIN,
                      "LLMSERVE_MODELS__SMOLLM2__MAX_PENDING": "1", "LLMSERVE_MODELS__MINILM__PRELOAD": "false"},
                     name="test-server-ui-guarded")
    yield s
    s.stop()


@needs_browser
def test_without_the_right_key_the_page_says_401_or_403_instead_of_breaking(browser, guarded):
    page = open_page(browser, guarded.url)
    try:
        page.goto("/ui/#models")
        page.wait_for_function("() => document.getElementById('notice').textContent.includes('401')")
        assert "Enter the key in the API key box" in page.inner_text("#notice")
        page.fill("#api-key", INFERENCE)
        page.press("#api-key", "Enter")
        row = page.locator("#models tr[data-alias=minilm]")
        row.wait_for()
        row.locator("button.load").click()
        page.wait_for_function("() => document.getElementById('notice').textContent.includes('403 Forbidden')")
        assert "admin key" in page.inner_text("#notice")
        page.wait_for_selector('#models tr[data-alias=minilm][data-state="not loaded"]')
    finally:
        page.context.close()


@needs_browser
def test_a_429_is_shown_with_when_to_retry(browser, guarded):
    holding = threading.Event()
    done = threading.Event()
    holder_status: list[int] = []

    def hold_the_only_place():
        body = {"model": "smollm2", "max_tokens": 1500, "ignore_eos": True, "stream": True,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        with httpx.Client(base_url=guarded.url, headers={"Authorization": f"Bearer {INFERENCE}"}, timeout=120) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                holder_status.append(r.status_code)
                if r.status_code != 200:
                    return
                for _ in r.iter_lines():
                    holding.set()
                    if done.is_set():
                        return

    holder = threading.Thread(target=hold_the_only_place, daemon=True)
    page = open_page(browser, guarded.url)
    try:
        page.goto("/ui/#chat")
        page.fill("#api-key", INFERENCE)
        page.press("#api-key", "Enter")
        page.wait_for_selector("#alias[data-ready=true]")
        page.select_option("#alias", "smollm2")
        page.fill("#prompt", "Hi")
        # the place is taken only now, so the page's own setup cannot outlast the holding stream
        holder.start()
        assert holding.wait(60), f"the first request did not start streaming (status {holder_status})"
        page.click("#send")
        page.wait_for_function("() => document.getElementById('notice').textContent.includes('429')")
        assert re.match(r"429 Too many requests: .+ Try again in \d+ s\.", page.inner_text("#notice"))
    finally:
        done.set()
        if holder.is_alive():
            holder.join(30)
        page.context.close()
