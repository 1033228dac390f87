"""`GET /`: the demo page (plain HTML, CSS and JS under `static/`, no build step), and its assets at `/ui/`.

The files are read once. Assets are addressed by content hash (`/ui/app.js?v=1a2b3c4d`), so browsers cache
them for a year and a new release is fetched at once; the page itself is revalidated (ETag) on each visit.
Every answer carries a strict Content-Security-Policy: scripts and styles only from this origin (none
inline), images from here or `blob:` (the maps), requests only to this origin, no framing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response

STATIC = Path(__file__).resolve().parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
MEDIA = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
ASSETS = ("app.js", "style.css")
IMMUTABLE = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str

    @classmethod
    def of(cls, body: bytes, suffix: str) -> Asset:
        return cls(body, MEDIA[suffix], hashlib.sha256(body).hexdigest()[:16])

    def response(self, request: Request, cache_control: str) -> Response:
        headers = {**SECURITY_HEADERS, "Cache-Control": cache_control, "ETag": f'"{self.etag}"'}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def load_page(root: Path = STATIC) -> tuple[Asset, dict[str, Asset]]:
    """The page with its asset references (`{{app.js}}`) turned into hashed URLs, and the assets."""
    assets = {name: Asset.of((root / name).read_bytes(), Path(name).suffix) for name in ASSETS}
    html = (root / "index.html").read_text()
    html = re.sub(r"\{\{([\w.]+)\}\}", lambda m: f"/ui/{m.group(1)}?v={assets[m.group(1)].etag[:8]}", html)
    return Asset.of(html.encode(), ".html"), assets


def page_router() -> APIRouter:
    page, assets = load_page()
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def index(request: Request) -> Response:
        return page.response(request, "no-cache")

    @router.get("/ui/{name}")
    async def asset(request: Request, name: str, v: str | None = None) -> Response:
        found = assets.get(name)
        if found is None:
            raise HTTPException(404, f"no asset {name!r} (the page's assets: {', '.join(ASSETS)})")
        return found.response(request, IMMUTABLE if v == found.etag[:8] else "no-cache")

    return router
