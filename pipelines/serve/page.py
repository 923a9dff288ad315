"""The endpoint's own page (``GET /``): drop an image, see its mask, confidence and class areas.

The page is one file, ``page.html`` beside this module (package data), with its CSS and
JavaScript inline and a Content-Security-Policy that lets it reach nothing but its own origin,
so it works offline.  It calls ``POST v1/segment?confidence=true`` like any client (every request
it sends is logged to Parquet like any other) and sends ``X-API-Key`` only when the user typed a
key; the key is never stored.  The route is public: the page holds nothing secret.

The one value filled in here is the class palette: the artifact's ``MaskSpec.palette`` when it
has one, else the default that the evaluation overlays use, so both colour classes alike.
"""
from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Sequence

from starlette.responses import HTMLResponse

PAGE_FILE = "page.html"
_PALETTE_SLOT = "/*PALETTE*/[]"


@functools.lru_cache(maxsize=1)
def _template() -> str:
    text = resources.files("pipelines.serve").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    if _PALETTE_SLOT not in text:
        raise RuntimeError(f"{PAGE_FILE}: the palette slot {_PALETTE_SLOT!r} is missing")
    return text


@functools.lru_cache(maxsize=8)
def page_html(palette: tuple[tuple[int, int, int], ...] | None = None) -> str:
    """The page with ``palette`` (RGB per class, in class order; None: the default) filled in."""
    from pipelines.evaluate.overlays import DEFAULT_PALETTE

    colours: Sequence[Sequence[int]] = palette or DEFAULT_PALETTE
    return _template().replace(_PALETTE_SLOT, json.dumps([[int(v) for v in c] for c in colours]))


def page_response(palette: tuple[tuple[int, int, int], ...] | None = None) -> HTMLResponse:
    """``GET /``: the page, not cached (a new model may bring another palette)."""
    colours = None if palette is None else tuple(tuple(int(v) for v in c) for c in palette)
    return HTMLResponse(page_html(colours), headers={"Cache-Control": "no-cache"})
