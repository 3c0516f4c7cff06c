"""TRN-2 for the metrics listener: plaintext only on loopback; off the machine, TLS with client certificates."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from agent.metrics import MetricsTls, serve_metrics
from agent.tools.certs import issue_client_cert, issue_server_cert, make_dev_ca, write_pem


def registry_with_a_sample() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("parley_probe", "a sample", registry=registry).inc()
    return registry


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "192.0.2.7:9464", "[::]:0", "example.org:9464"])
def test_plaintext_metrics_off_loopback_are_refused_naming_the_fix(listen: str) -> None:
    with pytest.raises(ValueError, match="plaintext") as refused:
        asyncio.run(serve_metrics(registry_with_a_sample(), listen))
    assert "127.0.0.1" in str(refused.value)


def test_plaintext_metrics_on_loopback_are_served() -> None:
    async def scrape() -> str:
        endpoint = await serve_metrics(registry_with_a_sample(), "127.0.0.1:0")
        try:
            return await asyncio.to_thread(lambda: urllib.request.urlopen(endpoint.url, timeout=10).read().decode())
        finally:
            await endpoint.close()

    assert "parley_probe_total 1.0" in asyncio.run(scrape())


def test_metrics_over_tls_need_a_client_certificate(tmp_path: Path) -> None:
    ca = make_dev_ca()
    server, client = issue_server_cert(ca), issue_client_cert(ca, "prometheus")
    files = {
        name: write_pem(tmp_path / name, data, private=name.endswith("key"))
        for name, data in {
            "ca.pem": ca.cert_pem,
            "server.pem": server.cert_pem,
            "server.key": server.key_pem,
            "client.pem": client.cert_pem,
            "client.key": client.key_pem,
        }.items()
    }
    tls = MetricsTls(str(files["server.pem"]), str(files["server.key"]), str(files["ca.pem"]))

    def fetch(url: str, *, with_certificate: bool) -> str:
        context = ssl.create_default_context(cafile=str(files["ca.pem"]))
        if with_certificate:
            context.load_cert_chain(str(files["client.pem"]), str(files["client.key"]))
        body: bytes = urllib.request.urlopen(url, timeout=10, context=context).read()
        return body.decode()

    async def scrape() -> tuple[str, BaseException | None]:
        endpoint = await serve_metrics(registry_with_a_sample(), "127.0.0.1:0", tls=tls)
        try:
            assert endpoint.url.startswith("https://")
            body = await asyncio.to_thread(fetch, endpoint.url, with_certificate=True)
            try:
                await asyncio.to_thread(fetch, endpoint.url, with_certificate=False)
            except (ssl.SSLError, urllib.error.URLError, ConnectionError) as error:
                return body, error
            return body, None
        finally:
            await endpoint.close()

    body, refusal = asyncio.run(scrape())
    assert "parley_probe_total 1.0" in body
    assert refusal is not None, "a scraper without a client certificate was served"
