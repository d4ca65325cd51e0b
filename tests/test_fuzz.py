"""Schemathesis over the service's own OpenAPI schema (/v1/openapi.json), against the session's
real server: bodies that fit the schema and bodies that break it. No answer may be a server
error or break the schema, and every error must be in its family's shape (OpenAI's; Anthropic's
on the Messages routes). Bounded: a few dozen
examples per route, small max_tokens; load/unload are left out (a load of an alias whose model
is not on this machine is a legitimate 500 naming why)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from tests.conftest import GENERATIVE



# the field that bounds a generation on each generating route; a body without one would generate
# up to the end of the context (the suite caps it at 256 tokens), which took most of this test's time
LENGTH_FIELD = {"/chat/completions": "max_tokens", "/completions": "max_tokens", "/responses": "max_output_tokens",
                "/messages": "max_tokens"}
ANTHROPIC_ROUTES = ("/messages", "/messages/count_tokens")


def _bounded(path: str, body):
    """Keeps generations short (at most 4 tokens, also where the body gives no bound), and on the
    models this suite runs."""
    if isinstance(body, dict):
        keys = ("max_tokens", "max_completion_tokens", "max_output_tokens")
        for key in keys:
            if isinstance(body.get(key), int) and body[key] > 4:
                body[key] = 4
        field = next((f for route, f in LENGTH_FIELD.items() if path.endswith(route)), None)
        if field and not any(isinstance(body.get(key), int) for key in keys):
            for key in keys:  # a null bound is no bound: the default would apply
                if key in body and body[key] is None:
                    del body[key]
            body.setdefault(field, 4)  # a bound of the wrong type stays: its 400 is checked
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
        if isinstance(body.get("model"), str) and body["model"] not in GENERATIVE + ["minilm"]:
            body["model"] = "smollm2"
    return body


def operations(schema):
    for result in schema.get_all_operations():
        operation = result.ok()
        if not (operation.method.upper() == "POST" and operation.path.endswith(("/load", "/unload"))):
            yield operation


def test_no_input_makes_a_server_error_or_an_unshaped_error(api_schema):
    checked = []
    for operation in operations(api_schema):

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            case.body = _bounded(case.path, case.body)
            response = case.call(timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                try:
                    body = response.json()
                except ValueError:
                    raise AssertionError(("not JSON", case.method, case.path, case.path_parameters, case.query,
                                          response.status_code, response.text[:200])) from None
                if case.path.endswith(ANTHROPIC_ROUTES):
                    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, response.text
                    assert body["error"]["message"], response.text
                else:
                    error = body["error"]
                    assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text

        fuzz()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert any("chat/completions" in c for c in checked) and any("embeddings" in c for c in checked), checked
