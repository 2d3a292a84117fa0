"""The web page: one static HTML file that talks to the API from the browser."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse


def _page() -> str:
    return resources.files("medret.serve").joinpath("static/index.html").read_text()


async def page() -> HTMLResponse:
    return HTMLResponse(_page())


def router() -> APIRouter:
    r = APIRouter()
    r.add_api_route("/", page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    return r
