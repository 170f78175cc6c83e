"""Static files (the viewer's script and styles, Swagger UI's assets) served whole, as stored files are
(`utils.api.routes.WholeFileResponse`): a `Range` header is ignored. Starlette answered a malformed or unsatisfiable
one with a plain-text 400 or 416, where every other error of the service is JSON; the files are small."""

from __future__ import annotations

import os

from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class WholeStaticFiles(StaticFiles):
    """`StaticFiles` that never answers a part of a file (`Accept-Ranges: none`, RFC 9110 14.3)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]}
        await super().__call__(scope, receive, send)

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["accept-ranges"] = "none"
        response.headers["cache-control"] = "no-cache"  # kept, and revalidated (ETag) when the service is updated
        return response
