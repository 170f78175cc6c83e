"""A request body larger than an upload may be is refused with 413 as it arrives, before it is parsed or spooled.

FastAPI reads and parses a route's multipart form before its dependencies run, so a check there would come after a
body of any size (chunked, without Content-Length, or simply long) had been read whole into a temporary file. Here
the body's `receive` refuses a Content-Length over the limit before the first byte is read, and counts a chunked
body's bytes as they arrive. The refusal is an HTTP exception raised where the route reads its form: FastAPI passes
it on, the route's audit row records the 413 (`utils.api.audit`) and FastAPI's handler answers it as JSON. The
limit is a setting (`BONEAGE_MAX_UPLOAD_BYTES` plus the multipart framing), read from the started app.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from utils.config import Settings

# Multipart framing around the file: a request this much over the byte limit may still hold an acceptable file.
FORM_OVERHEAD_BYTES = 64 * 1024


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the upload is larger than the limit of {limit} bytes")


class UploadBodyLimit:
    """ASGI middleware: the upload limit on every HTTP request's body (only `POST /predict` takes one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings: Settings | None = getattr(scope["app"].state, "settings", None) if "app" in scope else None
        if scope["type"] != "http" or settings is None:
            await self.app(scope, receive, send)
            return
        limit = settings.max_upload_bytes + FORM_OVERHEAD_BYTES
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge(settings.max_upload_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(settings.max_upload_bytes)
            return message

        await self.app(scope, limited, send)
