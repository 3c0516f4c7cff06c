"""Serving a web app: `async with start_site(app) as (runner, url):` binds loopback (a free port by default),
and always stops cleanly, ending open event streams first."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NamedTuple
from urllib.parse import urlencode

from aiohttp import web

from agent.web.app import WEB_CONFIG, WebConfig
from agent.web.security import check_listen_address

__all__ = ["RunningSite", "server_ssl_context", "start_site"]

SHUTDOWN_SECONDS = 5.0  # requests still running when the site stops get this long (event streams end at once)


class RunningSite(NamedTuple):
    runner: web.AppRunner
    url: str  # the site's address, e.g. http://127.0.0.1:8123/ (without the token)

    @property
    def opening_url(self) -> str:
        """The address to print once: `url` with ?token=..., which signs a browser in."""
        return f"{self.url}?{urlencode({'token': self.runner.app[WEB_CONFIG].token})}"


def server_ssl_context(config: WebConfig) -> ssl.SSLContext | None:
    """TLS for the listener when configured; with `client_ca`, every browser must present a certificate it signed."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.client_ca is not None:
        context.load_verify_locations(cafile=config.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@asynccontextmanager
async def start_site(app: web.Application, host: str | None = None, port: int = 0) -> AsyncIterator[RunningSite]:
    """Serve `app` on `host` (the config's, 127.0.0.1 by default) and `port` (0: a free one) until the block ends.

    The same listen rule as the config applies to `host`. The access log is off: the opening URL carries the
    token, and a log is no place for it.
    """
    config = app[WEB_CONFIG]
    host = config.host if host is None else host
    check_listen_address(host, tls_cert=config.tls_cert, tls_key=config.tls_key, client_ca=config.client_ca)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=server_ssl_context(config))
        await site.start()
        bound_port = runner.addresses[0][1]
        shown_host = f"[{host}]" if ":" in host else host
        url = f"{'https' if config.tls else 'http'}://{shown_host}:{bound_port}/"
        yield RunningSite(runner, url)
    finally:
        await runner.cleanup()
