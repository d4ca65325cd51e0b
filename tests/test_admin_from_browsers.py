"""Model admin seen from a browser: with no keys set (the default), a page of another site the
operator happens to visit must not load or unload models (a form POST needs no preflight),
while the server's own console, curl and the SDKs keep working."""

from __future__ import annotations

import pytest

from tests.test_errors import assert_openai_error

CROSS_SITE = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"}
IDLE = "llama3-70b"  # configured, never loaded in the suite: unloading it changes nothing


@pytest.mark.parametrize("path", [f"/models/{IDLE}/unload", f"/v1/models/{IDLE}/unload",
                                  f"/api/v1/models/{IDLE}/load"])
def test_a_cross_site_admin_post_is_refused_with_a_403(http, path):
    r = http.post(path, headers=CROSS_SITE)
    assert_openai_error(r, 403, code="cross_site_request", contains="another site")


def test_a_cross_site_post_to_the_native_admin_api_is_refused(http):
    r = http.post("/unload_model", headers=CROSS_SITE, content=f'{{"name": "{IDLE}"}}')
    assert_openai_error(r, 403, code="cross_site_request")


def test_an_origin_without_fetch_metadata_is_checked_against_the_host(http, server):
    assert_openai_error(http.post(f"/models/{IDLE}/unload", headers={"Origin": "http://evil.example"}), 403)
    own = server.url.rstrip("/")
    assert http.post(f"/models/{IDLE}/unload", headers={"Origin": own}).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}],
                         ids=["no browser (curl, SDKs)", "the console", "typed by the user"])
def test_same_origin_and_non_browser_admin_requests_still_work(http, headers):
    r = http.post(f"/models/{IDLE}/unload", headers=headers)
    assert r.status_code == 200 and r.json()["was_loaded"] is False


def test_a_cross_site_post_to_a_native_inference_api_is_refused_as_it_may_load_a_model(http):
    # BentoML parses a text/plain body as JSON: /chat from another site could load any alias on demand
    r = http.post("/chat", headers=CROSS_SITE, content='{"model": "smollm2", "messages": [], "max_tokens": 1}')
    assert_openai_error(r, 403, code="cross_site_request")


def test_cross_site_inference_is_not_what_this_guards(http):
    # a cross-site page cannot read the answer anyway (no CORS); the guard is on state changes
    r = http.get("/v1/models", headers=CROSS_SITE)
    assert r.status_code == 200
