"""CORS as configured (`BONEAGE_CORS_ORIGINS`), set up once the settings are known, so building the app reads no
environment."""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from utils.config import Settings


class CORSFromSettings:
    """Starlette's CORSMiddleware with the origins of `app.state.settings` (set in the lifespan); off without any."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._handler: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._handler is None:
            self._handler = self._build(scope["app"].state.settings)
        await self._handler(scope, receive, send)

    def _build(self, settings: Settings) -> ASGIApp:
        origins = settings.cors_origin_list
        if not origins:
            return self.app
        # Credentials are never allowed together with a wildcard origin.
        return CORSMiddleware(self.app, allow_origins=origins, allow_credentials="*" not in origins,
                              allow_methods=["GET", "POST"],
                              allow_headers=["Authorization", "X-API-Key", "Idempotency-Key"],
                              expose_headers=["Idempotent-Replayed"])
