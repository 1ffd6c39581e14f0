"""Content negotiation of the test CVAT server, as Django REST framework does it for CVAT 2.73.

CVAT renders its API only as ``application/vnd.cvat+json`` (plus DRF's browsable API for
``text/html``), so ``Accept: application/json`` is refused with 406 before authentication or any
lookup: the bug that let our client's hand-built ``Accept: application/json`` pass against an
earlier version of this server. The versioning class reads ``; version=`` from the accepted media type
and CVAT's ``ALLOWED_VERSIONS`` is the *string* ``"2.0"``, so DRF's ``version in allowed`` is a
substring test: ``version=2.0`` and ``version=2`` pass, ``version=1.0`` is 406 (checked on a real
2.73). Every JSON answer, errors included, goes out as ``application/vnd.cvat+json`` with
``Vary: Accept``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from flask import Response, g, request

from .api import ApiError

CVAT_JSON = "application/vnd.cvat+json"
"""The media type of every JSON answer of CVAT's API."""

BROWSABLE = "text/html"
"""DRF's browsable API, CVAT's second renderer."""

RENDERERS = (CVAT_JSON, BROWSABLE)
"""In CVAT's order: ``*/*`` and ``application/*`` pick the first that matches."""

ALLOWED_VERSIONS = "2.0"
"""CVAT's ``REST_FRAMEWORK["ALLOWED_VERSIONS"]``: a string, so membership is a substring test."""

NOT_ACCEPTABLE = "Could not satisfy the request Accept header."
INVALID_VERSION = 'Invalid version in "Accept" header.'
VARY = "Accept, Origin, Cookie"

NOT_FOUND_HTML = ('\n<!doctype html>\n<html lang="en">\n<head>\n  <title>Not Found</title>\n</head>\n<body>\n'
                  "  <h1>Not Found</h1><p>The requested resource was not found on this server.</p>\n"
                  "</body>\n</html>\n")
"""Django's page for a URL no route matches (CVAT answers it even under ``/api/``)."""


@dataclass(frozen=True)
class MediaRange:
    """One entry of an ``Accept`` header."""

    type: str
    subtype: str
    params: dict[str, str]

    @property
    def precedence(self) -> int:
        """DRF's ``_MediaType.precedence``: ``*/*`` 0, ``type/*`` 1, full type 2, with params 3."""
        if self.type == "*":
            return 0
        if self.subtype == "*":
            return 1
        return 3 if any(k != "q" for k in self.params) else 2

    def matches(self, media_type: str) -> bool:
        """Whether a renderer's (parameterless) media type satisfies this range."""
        main, _, sub = media_type.partition("/")
        return (self.type in ("*", main)) and (self.subtype in ("*", sub))


def parse_accept(header: str) -> list[MediaRange]:
    """The media ranges of an ``Accept`` header, ``q=0`` ones dropped (they refuse a type)."""
    ranges = []
    for item in header.split(","):
        full, *raw_params = [part.strip() for part in item.split(";")]
        if not full:
            continue
        main, _, sub = full.lower().partition("/")
        params = {}
        for raw in raw_params:
            key, _, value = raw.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
        if params.get("q") in ("0", "0.0", "0.00", "0.000"):
            continue
        ranges.append(MediaRange(main, sub or "*", params))
    return ranges


def select(header: str | None) -> tuple[str, MediaRange | None]:
    """(renderer, the range that chose it) as DRF's ``DefaultContentNegotiation.select_renderer``:
    the most specific ranges first, then renderers in order; 406 when nothing matches."""
    if not header:
        return RENDERERS[0], None
    ranges = parse_accept(header)
    for precedence in (3, 2, 1, 0):
        group = [r for r in ranges if r.precedence == precedence]
        for renderer in RENDERERS:
            for media_range in group:
                if media_range.matches(renderer):
                    return renderer, media_range
    raise ApiError(406, {"detail": NOT_ACCEPTABLE})


def negotiate() -> None:
    """Pick the renderer for this request (``g.renderer``) or refuse it with 406, before
    authentication, as DRF's ``APIView.initial`` does."""
    g.renderer = CVAT_JSON
    renderer, media_range = select(request.headers.get("Accept"))
    if renderer == CVAT_JSON and media_range is not None and "version" in media_range.params:
        if media_range.params["version"] not in ALLOWED_VERSIONS:
            raise ApiError(406, {"detail": INVALID_VERSION})
    g.renderer = renderer


def render(response: Response) -> Response:
    """Give a JSON answer of the API CVAT's media type (or the browsable API's HTML) and ``Vary``."""
    if not request.path.startswith("/api/") or request.url_rule is None:
        return response
    response.headers["Vary"] = VARY
    if response.status_code == 204:
        response.headers.pop("Content-Type", None)  # DRF's 204 has no body and no type
        return response
    if response.mimetype != "application/json":
        return response  # a download keeps its own type (``application/zip``)
    if g.get("renderer") == BROWSABLE:
        body = html.escape(response.get_data(as_text=True))
        response.set_data(f"<!DOCTYPE html>\n<html><body><pre>{body}</pre></body></html>\n")
        response.content_type = "text/html; charset=utf-8"
    else:
        response.content_type = CVAT_JSON
    return response
