"""The dashboard's pages, its favicon, and the API docs (Swagger UI), all served from the
package: nothing is loaded from a CDN.

The pages are static shells (service/static/index.html + app.js): every number they show
comes from the /v1 API with the bearer token the user enters once. They hold no data, so
they need no token.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[2] / "static"
SWAGGER = "/static/vendor/swagger-ui"

router = APIRouter(include_in_schema=False)


def _page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/")
def runs_page() -> FileResponse:
    return _page()


@router.get("/runs/{run:path}")
def run_page(run: str) -> FileResponse:
    return _page()


@router.get("/jobs")
def jobs_page() -> FileResponse:
    return _page()


@router.get("/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    return _page()


@router.get("/compare")
def compare_page() -> FileResponse:
    return _page()


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    return FileResponse(STATIC / "favicon.ico", media_type="image/x-icon")


@router.get("/docs")
def api_docs() -> HTMLResponse:
    """Swagger UI over /openapi.json, its script and style from the package."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="layertrack API",
                               swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
                               swagger_css_url=f"{SWAGGER}/swagger-ui.css", swagger_favicon_url="/favicon.ico")


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC)
