"""The web app factory both faces build on: sessions opened by a token, CSRF on every post, strict headers,
templates and static files from the wheel. See docs/WEB.md for the conventions.

A face does `app = create_web_app(WebConfig(title=..., templates=PackageLoader(...)))`, adds its routes, renders
pages with `render(request, "page.html", ...)`, and runs it with `agent.web.site.start_site`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from markupsafe import Markup
from yarl import URL

from agent.web.security import CSRF_FIELD, CSRF_HEADER, Sessions, check_listen_address, is_loopback_host, new_token
from agent.web.sse import STREAM_GATE, StreamGate

__all__ = [
    "SECURITY_HEADERS",
    "STATIC_PREFIX",
    "WEB_CONFIG",
    "StaticFile",
    "WebConfig",
    "create_web_app",
    "forbidden",
    "render",
    "static_url",
]

STATIC_PREFIX = "/static/"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # the opening URL's token never travels in a Referer
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
_STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
}
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})
_KIT_PACKAGE = "agent.web"


@dataclass(frozen=True)
class WebConfig:
    """What a face configures. Off loopback, `tls_cert`, `tls_key` and `client_ca` are all required.

    `templates` is the face's own template loader, searched before the kit's (`base.html`, `forbidden.html`);
    `static_package` names a package whose `static/` directory adds to (and may override) the kit's files.
    """

    title: str
    host: str = "127.0.0.1"
    token: str = field(default_factory=new_token, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # mutual TLS: the authentication that lets a face leave loopback
    templates: jinja2.BaseLoader | None = None
    static_package: str | None = None
    max_streams: int = 8  # open server-sent event streams (tabs) at once; more are refused with 503
    heartbeat_seconds: float = 15.0

    def __post_init__(self) -> None:
        check_listen_address(self.host, tls_cert=self.tls_cert, tls_key=self.tls_key, client_ca=self.client_ca)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


WEB_CONFIG = web.AppKey("parley_web_config", WebConfig)
_SESSIONS = web.AppKey("parley_web_sessions", Sessions)
_TEMPLATES = web.AppKey("parley_web_templates", jinja2.Environment)
_STATIC = web.AppKey("parley_web_static", dict[str, StaticFile])


def _session_id(request: web.Request) -> str | None:
    """The session the request's cookie proves, if any: one HMAC, cheap enough to check again where needed
    rather than keep on the request."""
    sessions = request.app[_SESSIONS]
    return sessions.session_id(request.cookies.get(sessions.cookie_name))


def static_url(name: str) -> str:
    return STATIC_PREFIX + name


def _load_static(packages: list[str]) -> dict[str, StaticFile]:
    """Every file of each package's `static/`, read once at start-up: no disk reads on the loop, and only these
    names can ever be served (no path from a URL reaches the file system)."""
    files: dict[str, StaticFile] = {}
    for package in packages:
        directory = importlib.resources.files(package).joinpath("static")
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            content_type = _STATIC_TYPES.get(Path(entry.name).suffix)
            if entry.is_file() and content_type is not None:
                body = entry.read_bytes()
                etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
                files[entry.name] = StaticFile(body, content_type, etag)
    return files


async def _serve_static(request: web.Request) -> web.Response:
    found = request.app[_STATIC].get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound
    headers = {"ETag": found.etag, "Cache-Control": "no-cache"}  # revalidate: a new wheel may change a file
    if request.headers.get("If-None-Match") == found.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=found.body, headers={**headers, "Content-Type": found.content_type})


def render(request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
    """A page from the app's templates, with `site_title`, `static(name)` and `csrf_field()` available."""
    app = request.app
    session_id = _session_id(request)
    csrf_token = app[_SESSIONS].csrf_token(session_id) if session_id is not None else ""

    def csrf_field() -> Markup:
        return Markup('<input type="hidden" name="{}" value="{}">').format(CSRF_FIELD, csrf_token)

    page = (
        app[_TEMPLATES]
        .get_template(template)
        .render(site_title=app[WEB_CONFIG].title, csrf_token=csrf_token, csrf_field=csrf_field, **context)
    )
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")


def forbidden(request: web.Request, heading: str, explanation: str) -> web.Response:
    return render(request, "forbidden.html", status=403, heading=heading, explanation=explanation)


def _not_signed_in(request: web.Request) -> web.Response:
    return forbidden(
        request,
        "Open this page with its link",
        "This page is private. Open it with the link its server printed when it started (the one ending in "
        "?token=…). After that, this browser stays signed in until it is closed.",
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _loopback_host_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On loopback, refuse a Host that is not a loopback name: a DNS-rebinding page gets nothing, not even 403's
    wording."""
    if is_loopback_host(request.app[WEB_CONFIG].host) and not is_loopback_host(request.url.host or ""):
        return web.Response(status=421, text="This server answers only to a loopback address.\n")
    return await handler(request)


def _without_token(address: URL) -> str:
    """Where to send a browser that came with the token: the same page without it, so the token leaves the
    address bar and the history at once. Always a path on this site (`//host/...` would leave it)."""
    query = [(name, value) for name, value in address.query.items() if name != "token"]
    return str(URL.build(path="/" + address.path.lstrip("/"), query=query))


@web.middleware
async def _require_session(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The opening token (in the query, on a GET) starts a session; every other request needs the cookie."""
    if request.path.startswith(STATIC_PREFIX):
        return await handler(request)  # the wheel's CSS and script are not secret, and style the 403 page
    sessions = request.app[_SESSIONS]
    offered = request.query.get("token")
    if offered is not None:
        if request.method != "GET" or not sessions.token_matches(offered):
            return _not_signed_in(request)
        response = web.Response(status=303, headers={"Location": _without_token(request.rel_url)})
        response.set_cookie(
            sessions.cookie_name,
            sessions.new_session(),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.app[WEB_CONFIG].tls,
        )
        return response
    if _session_id(request) is None:
        return _not_signed_in(request)
    return await handler(request)


def _same_origin(request: web.Request) -> bool:
    """Where the browser says a request comes from must be this site.

    Sec-Fetch-Site decides when present (every current browser sends it and no script can set it): our own
    forms post with `Origin: null`, since Referrer-Policy: no-referrer hides the origin of navigations too.
    A named Origin must still be ours; without Sec-Fetch-Site (an old browser, a script) Origin decides.
    """
    own = f"{request.scheme}://{request.host}"
    origin = request.headers.get("Origin")
    if origin not in (None, "null", own):
        return False
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site == "same-origin"
    return origin != "null"


@web.middleware
async def _require_csrf_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every POST (and PUT, PATCH, DELETE) comes from this site's own page: same origin and the session's token."""
    if request.method not in _UNSAFE_METHODS:
        return await handler(request)
    session_id = _session_id(request)
    offered = request.headers.get(CSRF_HEADER)
    if offered is None and request.content_type in _FORM_TYPES:
        value = (await request.post()).get(CSRF_FIELD)  # aiohttp keeps the parsed form for the handler
        offered = value if isinstance(value, str) else None
    if (
        not _same_origin(request)
        or session_id is None
        or offered is None
        or not request.app[_SESSIONS].csrf_matches(session_id, offered)
    ):
        return forbidden(
            request,
            "This form could not be sent",
            "It did not come from this page as the server last sent it (another site, or an old copy of the "
            "page). Go back, reload the page and try again.",
        )
    return await handler(request)


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-store")  # pages hold private data; static files say no-cache
    if request.app[WEB_CONFIG].tls:
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")


async def _end_event_streams(app: web.Application) -> None:
    app[STREAM_GATE].closing.set()


def create_web_app(config: WebConfig) -> web.Application:
    """An aiohttp app with the kit's middlewares, templates, static files and event-stream gate; add routes to it."""
    app = web.Application(middlewares=[_loopback_host_only, _require_session, _require_csrf_token])
    app[WEB_CONFIG] = config
    app[_SESSIONS] = Sessions.for_token(config.token)
    kit_templates = jinja2.PackageLoader(_KIT_PACKAGE, "templates")
    loaders = [config.templates, kit_templates] if config.templates is not None else [kit_templates]
    app[_TEMPLATES] = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders), autoescape=True, undefined=jinja2.StrictUndefined
    )
    app[_TEMPLATES].globals["static"] = static_url
    packages = [_KIT_PACKAGE] + ([config.static_package] if config.static_package else [])
    app[_STATIC] = _load_static(packages)
    app[STREAM_GATE] = StreamGate(config.max_streams, config.heartbeat_seconds)
    app.router.add_get(STATIC_PREFIX + "{name}", _serve_static)
    app.on_response_prepare.append(_add_security_headers)
    app.on_shutdown.append(_end_event_streams)
    return app
