"""The pages a person opens in a browser, beside the API: the web console at /ui (static HTML,
CSS and JavaScript modules in static/, which call the same /v1 and /models routes any client
does), the service's own index page at /, and Swagger UI at /v1/docs with its assets served
from the installed fastapi-offline package instead of a CDN. Nothing here runs on the API's
request path; `ui: false` in configuration.yaml answers /ui with a 404.
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from ..errors import APIError
from ..web.auth import authorize

STATIC = Path(__file__).parent / "static"
DOCS_ASSETS = "/v1/docs/assets"
_INDEX = Template((Path(__file__).parent / "index.html").read_text())


def _settings(app):
    ops = getattr(app.state, "ops", None)
    return None if ops is None else ops.settings


def _console_on(app) -> bool:
    settings = _settings(app)
    return settings is None or settings.ui


def _turned_off() -> APIError:
    return APIError("The web console is turned off (ui: false in configuration.yaml).", status=404, code="not_found")


class Console:
    """The console's files, or an OpenAI-shaped 404 when configuration.yaml says `ui: false`."""

    def __init__(self) -> None:
        self.files = StaticFiles(directory=STATIC, html=True)

    async def __call__(self, scope, receive, send):
        if not _console_on(scope["app"]):
            return await JSONResponse(_turned_off().body(), status_code=404)(scope, receive, send)
        await self.files(scope, receive, send)


def index_page(request: Request) -> HTMLResponse:
    """What this service is, its models, and where to go next."""
    ops = getattr(request.app.state, "ops", None)
    rows = []
    try:  # the models are listed to whom GET /v1/models would list them
        if ops is not None:
            authorize(ops.settings, request.headers.get("authorization", ""), admin=False)
        models = ops.list_models()["data"] if ops is not None else []
    except APIError:
        models = []
        rows.append('<tr><td colspan="5">Listed for callers with a key: <code>GET /v1/models</code> with '
                    "<code>Authorization: Bearer &lt;key&gt;</code>, or the console at /ui.</td></tr>")
    for m in models:
        described = ops.manager.config(m["id"]).description  # an adapter's: its base's
        state = "loaded" if m["loaded"] else "loading" if m["loading"] else "failed" if m["error"] else "not loaded"
        rows.append(f"<tr><td><code>{html.escape(m['id'])}</code></td><td>{html.escape(m['backend'])}</td>"
                    f"<td>{html.escape(m['task'])}</td><td>{state}</td><td>{html.escape(described)}</td></tr>")
    console = ('<li><a href="/ui/">/ui</a>: the web console: chat with a model, load and unload models, '
               'watch throughput</li>') if _console_on(request.app) else ""
    return HTMLResponse(_INDEX.substitute(console=console, models="\n".join(rows)))


def mount(app: FastAPI) -> None:
    """Adds /, /ui and /v1/docs to the app; called before the API routes, whose /v1 catch-all
    would otherwise answer /v1/docs."""
    app.add_api_route("/", index_page, methods=["GET"], include_in_schema=False)
    def ui_root(request: Request):
        if _console_on(request.app):
            return RedirectResponse("/ui/")
        return JSONResponse(_turned_off().body(), status_code=404)  # not a redirect to a 404

    app.add_api_route("/ui", ui_root, methods=["GET"], include_in_schema=False)
    app.mount("/ui", Console(), name="ui")

    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    app.add_api_route("/v1/docs", swagger, methods=["GET"], include_in_schema=False)
    app.mount(DOCS_ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")
