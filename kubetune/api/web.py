"""The self-serve page: a few static files shipped inside the package, served at `/` with no data in them.

The page (kubetune/api/static/) is plain HTML, one JS module and one stylesheet, plus a vendored YAML
parser (js-yaml 4.1.0, MIT): no build step, no CDN. It holds no secret and no cluster data: everything
it shows it reads from the /v1 routes with the caller's own bearer token (sessionStorage, sent as an
`Authorization` header, never a cookie or a URL), so serving it unauthenticated reveals nothing.

A strict Content-Security-Policy keeps it that way: scripts and styles from this origin only (no inline
script), connections to this origin only, no framing.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

STATIC = resources.files("kubetune.api") / "static"
FILES = {  # name -> media type: the only files served (no path from the URL ever reaches the file system)
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "vendor/js-yaml.min.js": "text/javascript; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("/")
async def page() -> Response:
    return Response(read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name:path}")
async def static(name: str) -> Response:
    media = FILES.get(name)
    if media is None:
        raise HTTPException(404, f"no such file: {name}")
    return Response(read(name), media_type=media, headers=HEADERS)
