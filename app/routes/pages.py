"""The pages people open in a browser, served entirely by the service (air-gapped networks):

* ``/`` the job page (``app/static``: plain HTML, CSS and JS, no build step, no CDN);
* ``/docs`` Swagger UI, per FastAPI's self-hosting recipe (``docs_url=None`` +
  ``get_swagger_ui_html`` with local URLs). The assets come from the pinned
  ``fastapi-offline`` package (Swagger UI 5): the schema is OpenAPI 3.1, which Swagger UI 4
  (``swagger-ui-bundle``) refuses to render. ReDoc is off: its bundle hard-codes an image
  from its vendor's CDN (the "API docs by Redocly" footer), an external request offline.

None of these routes is in the OpenAPI schema, and none needs a key: the pages hold no data;
the job page asks the API, with the key the user types in, for everything it shows.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC_DIR", "DOCS_ASSETS_DIR", "install_pages"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
_DOCS_ASSETS = "/assets/docs"
_PAGE_ASSETS = "/assets/app"
_OAUTH2_REDIRECT = "/docs/oauth2-redirect"

router = APIRouter(include_in_schema=False)


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


@router.get("/", response_class=FileResponse)
def job_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/docs", response_class=HTMLResponse)
def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API docs",
        swagger_js_url=f"{root}{_DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{_DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{_DOCS_ASSETS}/favicon.png",
        oauth2_redirect_url=f"{root}{_OAUTH2_REDIRECT}",
        # no online validator badge (it would call validator.swagger.io)
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get(_OAUTH2_REDIRECT, response_class=HTMLResponse)
def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


def install_pages(app: FastAPI) -> None:
    """Add the pages and mount their static assets (mounts cannot travel in an APIRouter)."""
    app.include_router(router)
    app.mount(_DOCS_ASSETS, StaticFiles(directory=str(DOCS_ASSETS_DIR)), name="docs-assets")
    app.mount(_PAGE_ASSETS, StaticFiles(directory=str(STATIC_DIR)), name="page-assets")
