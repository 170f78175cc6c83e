"""`GET /` serves the viewer page; its script and styles are under `/viewer/`. Nothing is built or fetched from the
internet: the files in `static/` are served as they are, and the page's Content-Security-Policy lets it load only
from this app (and the `blob:` URLs of images it fetched from the app with the API key)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse

from utils.api.static import WholeStaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSETS_URL = "/viewer"
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                           "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")

viewer_router = APIRouter(include_in_schema=False)


@viewer_router.get("/", response_class=HTMLResponse)
def viewer_page() -> HTMLResponse:
    """The viewer: upload a film, see both estimates, the heatmaps, the report and the patient's course. The page
    is sent whole, whatever `Range` asks (a malformed one was a plain-text 400)."""
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Accept-Ranges": "none"}
    return HTMLResponse((STATIC_DIR / "index.html").read_bytes(), headers=headers)


def install_viewer(app: FastAPI) -> None:
    """Serve the viewer page at `/` and its script and styles under `/viewer/`."""
    app.mount(ASSETS_URL, WholeStaticFiles(directory=STATIC_DIR), name="viewer-assets")
    app.include_router(viewer_router)
