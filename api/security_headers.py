"""Security headers on every response: a Content-Security-Policy fitted to what is served (the web page, the
OpenAPI pages, JSON), `X-Content-Type-Options: nosniff`, no framing, and a strict referrer policy.

The web page (`api/web/`) is same-origin ES modules and a stylesheet with no inline script or style; it fetches
only the API, and shows images from blob: URLs (its thumbnails) and from the storage's signed URLs (another
origin with S3), so its policy names exactly those. JSON answers get `default-src 'none'`: nothing in them may
load anything. `/docs` and `/redoc` are FastAPI's pages, which load their scripts from jsDelivr and start them
with an inline script.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.config import Settings


DOCS_PATHS = ("/docs", "/redoc")
COMMON = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # for browsers that predate frame-ancestors
    "Referrer-Policy": "no-referrer",  # signed URLs and job ids never leave in a Referer header
    "Cross-Origin-Opener-Policy": "same-origin",
}


def origin(url: str | None) -> str | None:
    """`scheme://host[:port]` of a URL, or None."""
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


def page_policy(settings: Settings) -> str:
    """The web page's policy: its own files, the API, and images from blob: URLs and the storage's URLs."""
    images = ["'self'", "data:", "blob:"]
    storage = settings.s3_public_endpoint_url or settings.s3_endpoint_url
    for url in (settings.public_url, storage if settings.storage_backend == "s3" else None):
        found = origin(url)
        if found and found not in images:
            images.append(found)
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        f"img-src {' '.join(images)}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
DOCS_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https:; "
    "connect-src 'self'; worker-src blob:; frame-ancestors 'none'; base-uri 'none'"
)


class SecurityHeaders:
    """ASGI middleware adding the headers to every HTTP response (errors included), without buffering bodies,
    so server-sent event streams pass through untouched."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.page = page_policy(settings)

    def policy_for(self, path: str) -> str:
        """The Content-Security-Policy of a path."""
        if path == "/app" or path.startswith("/app/"):
            return self.page
        if path.startswith(DOCS_PATHS):
            return DOCS_POLICY
        return API_POLICY

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy_for(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = policy
                for name, value in COMMON.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
