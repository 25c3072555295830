"""GET /: the playground page, one static HTML file (app/static/playground.html).

The page is public like /health: it holds no data and no secret, and every call it makes
goes to the same API routes as any client, with the user's bearer token when auth is on.
Its Content-Security-Policy lets it talk to this origin only, so it never loads anything
from the network, and a page that tried to would fail in the browser, not silently work.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).resolve().parent / "static" / "playground.html"
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@lru_cache(maxsize=1)
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


def install_playground(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page(), headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
