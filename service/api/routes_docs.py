"""`/docs` (Swagger UI) and `/redoc` with their JavaScript, CSS and icon served by this server, not a CDN, so
the API docs work on a network without internet access.

The files come from the `fastapi-offline` wheel (Swagger UI 5, which renders FastAPI's OpenAPI 3.1, and
ReDoc); only its static folder is used, the pages themselves are FastAPI's own (`fastapi.openapi.docs`), as in
FastAPI's "self-hosting JavaScript and CSS for docs" recipe.
"""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

ASSET_PREFIX = "/docs-assets"
#: The docs pages may load nothing from elsewhere: ReDoc's sidebar links its logo from its CDN, which this
#: blocks before any request leaves (the pages' own bootstrap scripts and styles are inline: FastAPI's HTML).
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'"
)
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}


def assets_dir() -> Path:
    """The installed package's static folder (a real directory: the wheel installs unzipped)."""
    return Path(str(resources.files("fastapi_offline") / "static"))


def offline(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


def docs_router(app: FastAPI) -> APIRouter:
    """The pages at `app`'s docs URLs, pointing at assets under `/docs-assets/` whose URLs carry the package
    version, so browsers cache them for a year and an upgrade is fetched at once."""
    folder = assets_dir()
    version = metadata.version("fastapi-offline")
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"
    router = APIRouter(include_in_schema=False)

    def asset_url(request: Request, name: str) -> str:
        return f"{request.scope.get('root_path', '')}{ASSET_PREFIX}/{name}?v={version}"

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return offline(
            get_swagger_ui_html(
                openapi_url=f"{root}{app.openapi_url}",
                title=f"{app.title} - Swagger UI",
                swagger_js_url=asset_url(request, "swagger-ui-bundle.js"),
                swagger_css_url=asset_url(request, "swagger-ui.css"),
                swagger_favicon_url=asset_url(request, "favicon.png"),
                oauth2_redirect_url=f"{root}{redirect_url}",
                swagger_ui_parameters=app.swagger_ui_parameters,
            )
        )

    @router.get(redirect_url)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        return offline(
            get_redoc_html(
                openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
                title=f"{app.title} - ReDoc",
                redoc_js_url=asset_url(request, "redoc.standalone.js"),
                redoc_favicon_url=asset_url(request, "favicon.png"),
                with_google_fonts=False,
            )
        )

    @router.get(ASSET_PREFIX + "/{name}")
    async def asset(name: str, v: str | None = None) -> FileResponse:
        media_type = DOCS_ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404, f"no docs asset {name!r} (served: {', '.join(DOCS_ASSETS)})")
        cache = "public, max-age=31536000, immutable" if v == version else "no-cache"
        return FileResponse(folder / name, media_type=media_type, headers={"Cache-Control": cache})

    return router
