"""What a browser may do with the service: no request of another site's page may change anything
(`CrossSiteGuard`), nor reach a service without keys under another name (`KeylessLocalOnly`), and no answer is kept
by a cache or sniffed into another type (`PrivateResponses`)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class CrossSiteGuard:
    """Refuses (403) a request that would change something (POST, DELETE, ...) sent by a page of another site.

    A browser sends such a request (a form, or `fetch` in `no-cors` mode needs no CORS preflight) with the page's
    `Origin`; without API keys anyone's web page open on the machine could otherwise file films under any patient
    id, or erase one. Allowed: no `Origin` (curl, scripts, a modality's forwarder), the service's own pages (the
    origin's host and port are the request's `Host` or `X-Forwarded-Host`), and the origins of
    `BONEAGE_CORS_ORIGINS` (`*`: any)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        # behind a reverse proxy that rewrites Host, the host the browser asked for is in X-Forwarded-Host (a page of
        # another site cannot set that header without a CORS preflight, which it would fail)
        hosts = [headers.get("host", ""), headers.get("x-forwarded-host", "").split(",")[0].strip()]
        if origin is None or self._allowed(origin, [h for h in hosts if h], scope):
            await self.app(scope, receive, send)
            return
        await _refusal("refused: a page of another site (Origin) may not change anything here; list its origin in "
                       "BONEAGE_CORS_ORIGINS if it should")(scope, receive, send)

    @staticmethod
    def _allowed(origin: str, hosts: list[str], scope: Scope) -> bool:
        allowed = scope["app"].state.settings.cors_origin_list
        if "*" in allowed or origin in allowed:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() in {h.lower() for h in hosts}


class KeylessLocalOnly:
    """Without API keys, answers (403) only requests for this machine's own names: a `Host` of localhost or a
    loopback address. Such a service listens on 127.0.0.1 (`python app.py`) and must not be reached from elsewhere
    (README: serving beyond this machine needs keys); a page of any site could otherwise read it through DNS
    rebinding (its own name resolved to 127.0.0.1, so that the browser counts the service's answers as that site's).
    With keys configured, every request needs one anyway and any `Host` is served."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["app"].state.settings.keys_configured or \
                is_local_host(Headers(scope=scope).get("host", "")):
            await self.app(scope, receive, send)
            return
        await _refusal("refused: without API keys this service answers only requests for localhost or a loopback "
                       "address (the Host asked for); set BONEAGE_API_KEYS to serve other hosts")(scope, receive, send)


def is_local_host(host: str) -> bool:
    """Whether a `Host` header (name or address, with or without a port) names this machine's loopback."""
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always the loopback
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    # 0.0.0.0 and :: reach this machine too (the DICOM receiver posts to BONEAGE_HOST, which may be 0.0.0.0); a
    # rebinding page's requests carry its own name, never these
    return address.is_loopback or address.is_unspecified


def _refusal(detail: str) -> JSONResponse:
    """403 with a JSON `detail`, as every other error of the service."""
    return JSONResponse({"detail": detail}, status_code=403)


class PrivateResponses:
    """Every answer that does not say otherwise is `Cache-Control: no-store` (results, stored films and heatmaps,
    exports and errors carry patient data; a shared cache does not know that `X-API-Key` makes a request private,
    as it knows of `Authorization`), and every answer is `X-Content-Type-Options: nosniff`. The static assets say
    `no-cache` themselves (`utils.api.static`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_private(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("cache-control", "no-store")
                headers.setdefault("x-content-type-options", "nosniff")
            await send(message)

        await self.app(scope, receive, send_private)
