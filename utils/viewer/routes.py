"""`GET /` serves the viewer page; its script and styles are under `/viewer/`. Nothing is built or fetched from the
internet: the files in `static/` are served as they are, and the page's Content-Security-Policy lets it load only
from this app (and the `blob:` URLs of images it fetched from the app with the API key)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSETS_URL = "/viewer"
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                           "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")

viewer_router = APIRouter(include_in_schema=False)


@viewer_router.get("/", response_class=FileResponse)
def viewer_page() -> FileResponse:
    """The viewer: upload a film, see both estimates, the heatmaps, the report and the patient's course."""
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=headers)


def install_viewer(app: FastAPI) -> None:
    """Serve the viewer page at `/` and its script and styles under `/viewer/`."""
    app.mount(ASSETS_URL, StaticFiles(directory=STATIC_DIR), name="viewer-assets")
    app.include_router(viewer_router)
