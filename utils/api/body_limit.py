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


# Methods whose requests carry a body here; any other request's body is never read.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        # Connection: close, so uvicorn does not read the rest of the body to keep the connection alive.
        super().__init__(413, f"the upload is larger than the limit of {limit} bytes", headers={"Connection": "close"})


class UploadBodyLimit:
    """ASGI middleware: the upload limit on the body of every request that may carry one (only `POST /predict`
    reads one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings: Settings | None = getattr(scope["app"].state, "settings", None) if "app" in scope else None
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS or settings is None:
            await self.app(scope, receive, send)
            return
        limit = settings.max_upload_bytes + FORM_OVERHEAD_BYTES
        declared = Headers(scope=scope).get("content-length", "")
        received = 0
        body_done = False

        async def limited() -> Message:
            # Only the body's own messages are checked: once it is read, a response that listens for the client's
            # disconnect (Starlette's streaming responses) gets every message as it comes.
            nonlocal received, body_done
            if body_done:
                return await receive()
            if received == 0 and declared.isascii() and declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge(settings.max_upload_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(settings.max_upload_bytes)
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)
