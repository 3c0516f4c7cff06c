"""Transport security: TLS by default, mutual TLS as an option (TRN-2, TRN-3, TRN-9), and `parley certs`.

Every handshake here is a real one: a biller agent with a real SQLite file
served by `serve_biller` on 127.0.0.1 (a free port), and the consumer's own
client (`BillerClient` over `open_channel`) or the `parley biller serve`
process. A refused handshake must leave the store exactly as it was: the
request never reached the service.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.cli import main as parley_main
from agent.protocol.errors import Reason
from agent.tools.certs import (
    CA_FILE,
    SERVER_CHAIN_FILE,
    SERVER_KEY_FILE,
    DevCA,
    LeafCert,
    issue_client_cert,
    issue_server_cert,
    make_dev_ca,
)
from agent.transport.client import BillerClient, ClientTls, RetryPolicy, open_channel
from agent.transport.server import BillerServer, serve_biller
from agent.transport.status import CallError
from parley.v1 import envelope_pb2
from reference_biller.config import ServerSettings
from reference_biller.settings import SettingsError, resolve_serve
from tests.helpers.db import dump
from tests.helpers.peer import BILLER_ID, Biller, Consumer, running_biller
from tests.helpers.process import serving_process

ACCOUNT = "acct-1001"
ONE_TRY = RetryPolicy(attempts=1, call_timeout=5.0)  # a refused handshake must show, not be retried away


def run(tmp_path: Path, scenario: Callable[[Biller], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_biller(tmp_path) as biller:
            await scenario(biller)

    asyncio.run(main())


@asynccontextmanager
async def tls_biller(biller: Biller, server: LeafCert, client_ca: bytes | None = None) -> AsyncIterator[BillerServer]:
    """The biller's agent also served over TLS (mutual TLS with `client_ca`) on a free loopback port."""
    serving = await serve_biller(
        biller.agent, "127.0.0.1:0", tls=(server.chain_pem, server.key_pem), tls_client_ca=client_ca
    )
    try:
        yield serving
    finally:
        await serving.stop(None)


@asynccontextmanager
async def client(port: int, tls: ClientTls) -> AsyncIterator[BillerClient]:
    """The consumer's client to "localhost:port", a name the server certificate carries."""
    connected = BillerClient.connect(f"localhost:{port}", tls=tls, retry=ONE_TRY)
    try:
        yield connected
    finally:
        await connected.close()


def client_tls(ca: DevCA, certificate: LeafCert | None = None) -> ClientTls:
    if certificate is None:
        return ClientTls(root_certificates=ca.cert_pem)
    return ClientTls(ca.cert_pem, certificate_chain=certificate.chain_pem, private_key=certificate.key_pem)


async def refused_handshake(biller: Biller, call: Awaitable[object]) -> None:
    """`call` fails as a transport failure (UNAVAILABLE, no Parley reason) and the store is untouched."""
    before, handled = dump(biller.db_path), calls_handled(biller)
    with pytest.raises(CallError) as failure:
        await call
    assert failure.value.code is grpc.StatusCode.UNAVAILABLE
    assert (failure.value.reason, failure.value.wire_reason) == (Reason.INTERNAL_ERROR, "")
    assert dump(biller.db_path) == before
    assert calls_handled(biller) == handled  # the server's interceptor never saw a call


def calls_handled(biller: Biller) -> float:
    """Every call the biller's servers finished, whatever its method and status (parley_grpc_server_handled)."""
    families = biller.agent.metrics.registry.collect()
    return sum(
        sample.value
        for family in families
        if family.name == "parley_grpc_server_handled"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


async def enrolment(biller: Biller, consumer: Consumer, account_id: str) -> envelope_pb2.Envelope:
    """A valid, signed enrolment request on a new account: what a refused handshake must not let through."""
    await biller.agent.create_account(account_id, "Alice Example")
    code = await biller.agent.issue_enrolment_code(account_id)
    return consumer.enrolment(account_id, code)


# --- TLS: the consumer verifies the biller's certificate (TRN-3) -------------------------------------------


def test_a_consumer_trusting_the_issuing_ca_is_served_and_one_trusting_another_ca_is_refused(tmp_path: Path) -> None:
    ca, stranger = make_dev_ca(), make_dev_ca("Another CA")

    async def scenario(biller: Biller) -> None:
        alice = Consumer("consumer:alice", biller.clock)
        request = await enrolment(biller, alice, ACCOUNT)
        async with tls_biller(biller, issue_server_cert(ca)) as serving:
            async with client(serving.port, client_tls(stranger)) as fooled:
                await refused_handshake(biller, fooled.hello())
                await refused_handshake(biller, fooled.enrol(request))
            async with client(serving.port, client_tls(ca)) as trusting:
                assert (await trusting.hello()).biller_party_id == BILLER_ID
                answer = await trusting.enrol(request)
                assert answer.biller_key_sets  # the enrolment went through, over TLS
                assert calls_handled(biller) == 2  # Hello and Enrol: all the biller ever saw
        account = await biller.agent.account(ACCOUNT)
        assert account is not None
        assert account.consumer_party_id == alice.party_id

    run(tmp_path, scenario)


# --- Mutual TLS (TRN-9) -----------------------------------------------------------------------------------


def test_mutual_tls_refuses_clients_without_a_certificate_or_with_one_from_another_ca(tmp_path: Path) -> None:
    ca, stranger = make_dev_ca(), make_dev_ca("Another CA")
    server = issue_server_cert(ca)
    alice_cert, mallory_cert = issue_client_cert(ca, "alice"), issue_client_cert(stranger, "mallory")

    async def scenario(biller: Biller) -> None:
        alice = Consumer("consumer:alice", biller.clock)
        request = await enrolment(biller, alice, ACCOUNT)
        async with tls_biller(biller, server, client_ca=ca.cert_pem) as serving:
            async with client(serving.port, client_tls(ca)) as anonymous:
                await refused_handshake(biller, anonymous.enrol(request))
            async with client(serving.port, client_tls(ca, mallory_cert)) as outsider:
                await refused_handshake(biller, outsider.enrol(request))
            async with client(serving.port, client_tls(ca, alice_cert)) as admitted:
                await admitted.enrol(request)
                # TRN-9: a client certificate identifies no party; the signature still decides.
                impostor = Consumer("consumer:impostor", biller.clock)
                before = dump(biller.db_path)
                with pytest.raises(CallError) as failure:
                    await admitted.list_bills(impostor.query(ACCOUNT))
                assert failure.value.reason is Reason.NOT_ENROLLED
                assert dump(biller.db_path) == before
        account = await biller.agent.account(ACCOUNT)
        assert account is not None
        assert account.consumer_party_id == alice.party_id

    run(tmp_path, scenario)


def test_plaintext_off_loopback_and_half_configured_tls_are_refused(tmp_path: Path) -> None:
    ca = make_dev_ca()
    server = issue_server_cert(ca)

    async def scenario(biller: Biller) -> None:
        for listen in ("0.0.0.0:0", "192.0.2.10:7443", "[2001:db8::1]:7443"):
            with pytest.raises(ValueError, match="loopback"):
                await serve_biller(biller.agent, listen, insecure=True)
        with pytest.raises(ValueError, match="TLS is required"):
            await serve_biller(biller.agent, "0.0.0.0:0")
        with pytest.raises(ValueError, match="needs TLS"):
            await serve_biller(biller.agent, "127.0.0.1:0", insecure=True, tls_client_ca=ca.cert_pem)
        for target in ("192.0.2.10:7443", "billing.energy.example:443", "dns:///billing.energy.example:443"):
            with pytest.raises(ValueError, match="loopback"):
                open_channel(target, insecure=True)
            with pytest.raises(ValueError, match="loopback"):
                BillerClient.connect(target, insecure=True)
        with pytest.raises(ValueError, match="go together"):
            ClientTls(ca.cert_pem, certificate_chain=server.chain_pem)
        assert "PRIVATE KEY" not in repr(client_tls(ca, issue_client_cert(ca, "alice")))  # keys are not printed

    run(tmp_path, scenario)


# --- parley certs -------------------------------------------------------------------------------------------


def test_parley_certs_writes_files_for_a_mutual_tls_handshake_with_private_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert parley_main(["certs", "--out", str(out), "--client", "alice"]) == 0
    printed = capsys.readouterr().out
    files = {CA_FILE, SERVER_CHAIN_FILE, SERVER_KEY_FILE, "client-alice.pem", "client-alice.key"}
    assert {path.name for path in out.iterdir()} == files
    for name in files:
        assert f"wrote {out / name}" in printed
        expected = 0o600 if name.endswith(".key") else 0o644
        assert (out / name).stat().st_mode & 0o777 == expected, name
    assert "--tls-client-ca" in printed
    contents = {name: (out / name).read_bytes() for name in files}

    assert parley_main(["certs", "--out", str(out)]) == 2  # refuses to overwrite, and changes nothing
    assert "refusing to overwrite" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in files} == contents
    assert parley_main(["certs", "--out", str(tmp_path / "bad"), "--client", "../../etc/x"]) == 2
    assert "client name" in capsys.readouterr().out
    assert not (tmp_path / "bad").exists()
    assert parley_main(["certs", "--out", str(tmp_path / "bad"), "--ip", "not-an-address"]) == 2
    assert not (tmp_path / "bad").exists()

    server_cert = x509.load_pem_x509_certificate(contents[SERVER_CHAIN_FILE])  # the leaf comes first in the chain
    names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]  # the defaults without --host and --ip
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for name, usage in (
        (SERVER_CHAIN_FILE, ExtendedKeyUsageOID.SERVER_AUTH),
        ("client-alice.pem", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        leaf = x509.load_pem_x509_certificate(contents[name])
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]

    def read(name: str) -> bytes:
        return contents[name]

    async def scenario(biller: Biller) -> None:
        serving = await serve_biller(
            biller.agent,
            "127.0.0.1:0",
            tls=(read(SERVER_CHAIN_FILE), read(SERVER_KEY_FILE)),
            tls_client_ca=read(CA_FILE),
        )
        try:
            tls = ClientTls(
                read(CA_FILE), certificate_chain=read("client-alice.pem"), private_key=read("client-alice.key")
            )
            for target in (f"localhost:{serving.port}", f"127.0.0.1:{serving.port}"):  # both names are in server.pem
                connected = BillerClient.connect(target, tls=tls, retry=ONE_TRY)
                try:
                    assert (await connected.hello()).biller_party_id == BILLER_ID
                finally:
                    await connected.close()
        finally:
            await serving.stop(None)

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        # a DNS name "127.0.0.1" was written, and a client connecting to 127.0.0.1 failed with "IP address mismatch"
        (["--host", "127.0.0.1"], "127.0.0.1 is an IP address: pass it with --ip"),
        (["--host", "::1"], "::1 is an IP address: pass it with --ip"),
        (["--host", ""], "'' is not a host name: expected dot-separated labels"),  # was the library's CN message
        (["--host", "bad host name"], "'bad host name' is not a host name"),  # was accepted
        (["--host", "dash-.example"], "'dash-.example' is not a host name"),
        (["--host", "a" * 64 + ".example"], "is not a host name"),  # a label of 64 characters
        (["--days", "abc"], "argument --days: expected a whole number from 1 to 825, got 'abc'"),  # was "_days"
    ],
)
def test_parley_certs_refuses_a_name_no_certificate_should_carry_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], says: str
) -> None:
    assert parley_main(["certs", "--out", str(tmp_path / "certs"), *arguments]) == 2
    captured = capsys.readouterr()
    said = [line for line in (captured.out + captured.err).splitlines() if not line.startswith(("usage:", " "))]
    assert len(said) == 1, said
    assert says in said[0]
    assert not (tmp_path / "certs").exists()


def test_parley_certs_keeps_a_host_name_longer_than_a_common_name_whole(tmp_path: Path) -> None:
    """A common name is at most 64 characters (the cryptography library refused the certificate); clients match
    the alternative names, so the long name is kept whole there and the common name is another name, or a label."""
    long_name = f"{'a' * 40}.{'b' * 40}.example.test"
    hosts = ["--host", long_name, "--host", "*.example.test"]
    assert parley_main(["certs", "--out", str(tmp_path / "certs"), *hosts]) == 0
    leaf = x509.load_pem_x509_certificate((tmp_path / "certs" / SERVER_CHAIN_FILE).read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [long_name, "*.example.test"]
    assert [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["*.example.test"]
    alone = x509.load_pem_x509_certificate(issue_server_cert(make_dev_ca(), [long_name], []).cert_pem)
    assert alone.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == [long_name]
    assert [a.value for a in alone.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["Parley development server"]


# --- --tls-client-ca through settings and the CLI -----------------------------------------------------------


def test_tls_client_ca_comes_from_the_flag_then_the_variable_then_the_file() -> None:
    tls = {"listen": "127.0.0.1:0", "tls_cert": "cert.pem", "tls_key": "key.pem"}
    file = ServerSettings(tls_client_ca="file-ca.pem")
    env = {"PARLEY_TLS_CLIENT_CA": "env-ca.pem"}
    chosen = resolve_serve({**tls, "tls_client_ca": "flag-ca.pem"}, file, env)
    assert (chosen.tls_client_ca, chosen.sources["tls_client_ca"]) == (Path("flag-ca.pem"), "--tls-client-ca")
    chosen = resolve_serve(tls, file, env)
    assert (chosen.tls_client_ca, chosen.sources["tls_client_ca"]) == (Path("env-ca.pem"), "PARLEY_TLS_CLIENT_CA")
    chosen = resolve_serve(tls, file, {})
    assert (chosen.tls_client_ca, chosen.sources["tls_client_ca"]) == (Path("file-ca.pem"), "server.tls_client_ca")
    assert resolve_serve(tls, ServerSettings(), {}).tls_client_ca is None
    with pytest.raises(SettingsError, match="PARLEY_TLS_CLIENT_CA: mutual TLS needs the TLS certificate and key"):
        resolve_serve({"listen": "127.0.0.1:0"}, ServerSettings(), env)


def test_serve_refuses_a_client_ca_without_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    command = ["biller", "serve", "--listen", "127.0.0.1:0", "--insecure", "--state-dir", str(state)]
    assert parley_main([*command, "--tls-client-ca", str(tmp_path / "ca.pem")]) == 2
    assert "mutual TLS needs the TLS certificate and key" in capsys.readouterr().out
    assert not state.exists()  # refused before anything was created


@pytest.mark.slow  # a served process: 1.3 s
def test_parley_biller_serve_with_a_client_ca_from_the_environment_is_mutual_tls(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    assert parley_main(["certs", "--out", str(certs), "--client", "alice"]) == 0
    arguments = ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")]
    arguments += ["--tls-cert", str(certs / SERVER_CHAIN_FILE), "--tls-key", str(certs / SERVER_KEY_FILE)]
    environment = {**os.environ, "PARLEY_TLS_CLIENT_CA": str(certs / CA_FILE)}
    with serving_process(arguments, log=tmp_path / "stderr.log", env=environment) as (process, printed):
        assert printed["listening"].endswith("(mutual TLS)")
        port = int(printed["listening"].split()[0].rpartition(":")[2])
        ca = (certs / CA_FILE).read_bytes()
        alice = ClientTls(
            ca,
            certificate_chain=(certs / "client-alice.pem").read_bytes(),
            private_key=(certs / "client-alice.key").read_bytes(),
        )

        async def calls() -> None:
            async with client(port, ClientTls(root_certificates=ca)) as anonymous:
                with pytest.raises(CallError) as failure:
                    await anonymous.hello()
                assert failure.value.code is grpc.StatusCode.UNAVAILABLE
            async with client(port, alice) as admitted:
                assert (await admitted.hello()).identity_fingerprint.hex() == printed["fingerprint"]

        asyncio.run(calls())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
