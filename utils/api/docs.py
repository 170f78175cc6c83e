"""Swagger UI (`/docs`) and ReDoc (`/redoc`) with their scripts and styles served by the app itself, so the pages
work without internet. The files come from the pinned `fastapi-offline` package (Swagger UI 5 and ReDoc 2); this is
FastAPI's documented self-hosting recipe. The pages stay open when API keys are configured, like `/health`.

Their Content-Security-Policy keeps the browser on this app: ReDoc's sidebar would otherwise fetch its maker's logo
from cdn.redoc.ly (it hides the image when that fails). Inline scripts and styles are allowed because FastAPI's
pages start Swagger UI with an inline script and both libraries inject their styles.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

from utils.api.static import WholeStaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs-assets"
# (package, folder inside it) holding swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png.
ASSETS_PACKAGE = ("fastapi_offline", "static")

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data: blob:; font-src 'self' data:; worker-src 'self' blob:; "
                           "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'")

docs_router = APIRouter(include_in_schema=False)


def _local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


def _prefix(request: Request) -> str:
    """The app's root path (behind a proxy that strips a prefix), so the pages' URLs stay right."""
    return str(request.scope.get("root_path", "")).rstrip("/")


@docs_router.get(DOCS_URL, response_class=HTMLResponse)
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI over the app's OpenAPI schema."""
    root, app = _prefix(request), request.app
    return _local_only(get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        swagger_ui_parameters=app.swagger_ui_parameters,
    ))


@docs_router.get(OAUTH2_REDIRECT_URL, response_class=HTMLResponse)
def swagger_ui_oauth2_redirect() -> HTMLResponse:
    """Swagger UI's OAuth2 redirect page (static, as FastAPI serves it by default)."""
    return get_swagger_ui_oauth2_redirect_html()


@docs_router.get(REDOC_URL, response_class=HTMLResponse)
def redoc(request: Request) -> HTMLResponse:
    """ReDoc over the app's OpenAPI schema, without Google Fonts."""
    root, app = _prefix(request), request.app
    return _local_only(get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    ))


def install_docs(app: FastAPI) -> None:
    """Serve the docs pages and their assets; the app must be built with `docs_url=None, redoc_url=None`."""
    app.mount(ASSETS_URL, WholeStaticFiles(packages=[ASSETS_PACKAGE]), name="docs-assets")
    app.include_router(docs_router)
