"""`agent.transport.diagnosis`: what a port answers, and the one-line cause of a failed connection (issue 18).

Real gRPC servers on free loopback ports (plaintext, TLS, mutual TLS) and real failed calls: the hint must
name the mismatch that gRPC reports only as "Socket closed" or WRONG_VERSION_NUMBER.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import grpc
import pytest

from agent.conformance.peers import free_port
from agent.tools.certs import issue_client_cert, issue_server_cert, make_dev_ca
from agent.transport.client import BillerClient, ClientTls, RetryPolicy
from agent.transport.diagnosis import Remedies, Served, connection_hint, probe
from agent.transport.status import CallError

CA = make_dev_ca()
OTHER_CA = make_dev_ca("another CA")
SERVER = issue_server_cert(CA, hostnames=["localhost"], ips=["127.0.0.1"])
ALICE = issue_client_cert(CA, "alice")
STRANGER = issue_client_cert(OTHER_CA, "stranger")
Mode = Literal["plaintext", "tls", "mutual"]


@asynccontextmanager
async def server(mode: Mode) -> AsyncIterator[str]:
    """A gRPC server with no services (a handshake is all these tests need); yields its target."""
    served = grpc.aio.server()
    if mode == "plaintext":
        port = served.add_insecure_port("127.0.0.1:0")
    else:
        credentials = grpc.ssl_server_credentials(
            [(SERVER.key_pem, SERVER.chain_pem)],
            root_certificates=CA.cert_pem if mode == "mutual" else None,
            require_client_auth=mode == "mutual",
        )
        port = served.add_secure_port("127.0.0.1:0", credentials)
    await served.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await served.stop(None)


async def failure(target: str, *, tls: ClientTls | None = None) -> CallError:
    client = BillerClient.connect(target, tls=tls, insecure=tls is None, retry=RetryPolicy(attempts=1, call_timeout=5))
    try:
        with pytest.raises(CallError) as failed:
            await client.hello()
        return failed.value
    finally:
        await client.close()


def test_a_probe_tells_plaintext_tls_mutual_tls_and_nothing_apart() -> None:
    async def body() -> None:
        expectations: tuple[tuple[Mode, Served], ...] = (
            ("plaintext", Served.PLAINTEXT),
            ("tls", Served.TLS),
            ("mutual", Served.MUTUAL_TLS),
        )
        for mode, expected in expectations:
            async with server(mode) as target:
                assert await asyncio.to_thread(probe, target) is expected, mode
        assert await asyncio.to_thread(probe, f"127.0.0.1:{free_port()}") is Served.NOTHING
        assert await asyncio.to_thread(probe, "no port here") is Served.UNKNOWN

    asyncio.run(body())


def test_each_failed_connection_gets_its_cause_and_the_fix() -> None:
    trusting = ClientTls(CA.cert_pem)

    async def hint(target: str, tls: ClientTls | None) -> str | None:
        error = await failure(target, tls=tls)
        offered = tls is not None and tls.certificate_chain is not None
        return await asyncio.to_thread(
            connection_hint, target, error.detail, insecure=tls is None, client_certificate=offered
        )

    async def body() -> dict[str, str | None]:
        said: dict[str, str | None] = {}
        async with server("tls") as target:
            said["plaintext at TLS"] = await hint(target, None)
            said["untrusted certificate"] = await hint(target, ClientTls(OTHER_CA.cert_pem))
        async with server("plaintext") as target:
            said["TLS at plaintext"] = await hint(target, trusting)
        async with server("mutual") as target:
            said["no client certificate"] = await hint(target, trusting)
            stranger = ClientTls(CA.cert_pem, certificate_chain=STRANGER.chain_pem, private_key=STRANGER.key_pem)
            said["refused client certificate"] = await hint(target, stranger)
        said["nothing listening"] = await hint(f"127.0.0.1:{free_port()}", None)
        return said

    said = asyncio.run(body())
    assert "speaks TLS, not plaintext: leave out --insecure" in str(said["plaintext at TLS"])
    assert "certificate is not trusted: give the CA that issued" in str(said["untrusted certificate"])
    assert "speaks plaintext, not TLS: use --insecure" in str(said["TLS at plaintext"])
    assert "asks for a client certificate (mutual TLS, TRN-9)" in str(said["no client certificate"])
    assert "refused this client certificate" in str(said["refused client certificate"])
    assert "nothing is listening on" in str(said["nothing listening"])


def test_a_hint_speaks_the_words_of_the_client_and_stays_quiet_when_nothing_is_wrong() -> None:
    remedies = Remedies(to_plaintext="set insecure = true", to_tls="x", trust="y", client_certificate="z")

    async def body() -> tuple[str | None, str | None]:
        async with server("plaintext") as target:
            worded = await asyncio.to_thread(
                connection_hint, target, "Socket closed", insecure=False, client_certificate=False, remedies=remedies
            )
            matched = await asyncio.to_thread(
                connection_hint, target, "Socket closed", insecure=True, client_certificate=False
            )
        return worded, matched

    worded, matched = asyncio.run(body())
    assert "speaks plaintext, not TLS: set insecure = true" in str(worded)
    assert matched is None  # plaintext to a plaintext server: the cause is elsewhere, and no guess is made
