"""Why a biller cannot be reached, in one line: TLS against plaintext, a missing client certificate...

gRPC reports a transport mismatch as UNAVAILABLE with details that do not name the cause: "Socket
closed" both for a plaintext client at a TLS port and for a TLS client without the certificate a
mutual-TLS biller asks for (TRN-9), "WRONG_VERSION_NUMBER" for a TLS client at a plaintext port.
`connection_hint` reads the details and asks the port itself (`probe`: a TLS handshake without a
client certificate, then, if that fails, a plaintext HTTP/2 preface), and names the likely cause and
the fix in the words of the client at hand — its flags or its profile keys (`Remedies`):

    hint = connection_hint(target, error.detail, insecure=False, client_certificate=False)
    # "127.0.0.1:7443 speaks plaintext, not TLS: use --insecure (loopback only, TRN-3), or serve the
    #  biller with TLS"

Every client of the tree uses it where it reports a biller it cannot reach: `parley conformance
biller`, `parley consumer run` and `parley consumer enrol`. A probe is a few short blocking socket
operations (at most `timeout` seconds each): call it from a thread in async code (`asyncio.to_thread`).
It never raises, and None means no better explanation than gRPC's own.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import ssl
from dataclasses import dataclass

from agent.transport.client import target_host

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an HTTP/2 SETTINGS frame without settings
_SETTINGS_TYPE = 0x04
PROBE_TIMEOUT = 2.0


class Served(enum.Enum):
    """What a port answers."""

    NOTHING = "nothing listening"
    PLAINTEXT = "plaintext HTTP/2"
    TLS = "TLS"
    MUTUAL_TLS = "TLS that asks for a client certificate"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Remedies:
    """How the user of one client fixes each mismatch, as imperative phrases (defaults: the conformance flags)."""

    to_plaintext: str = "use --insecure (loopback only, TRN-3)"
    to_tls: str = "leave out --insecure, and give the CA of its certificate with --tls-ca FILE"
    trust: str = "give the CA that issued its certificate with --tls-ca FILE"
    client_certificate: str = "give one with --tls-client-cert FILE and --tls-client-key FILE"


def _address(target: str) -> tuple[str, int] | None:
    host = target_host(target)
    port = target.rpartition(":")[2]
    return (host, int(port)) if port.isdigit() and host else None


def _connect(address: tuple[str, int], timeout: float) -> socket.socket | Served:
    try:
        return socket.create_connection(address, timeout=timeout)
    except ConnectionRefusedError:
        return Served.NOTHING
    except OSError:
        return Served.UNKNOWN


def _speaks_tls(address: tuple[str, int], timeout: float) -> Served | None:
    """TLS or MUTUAL_TLS if the port completes a TLS handshake (without a client certificate); None if not."""
    connection = _connect(address, timeout)
    if isinstance(connection, Served):
        return connection
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a probe: who the server is does not matter here
    context.set_alpn_protocols(["h2"])
    try:
        tls = context.wrap_socket(connection)  # the handshake; `tls` now owns the socket
    except ssl.SSLError as error:
        connection.close()
        text = f"{error.reason or ''} {error}".upper()
        if "CERTIFICATE_REQUIRED" in text or ("ALERT" in text and "HANDSHAKE_FAILURE" in text):
            return Served.MUTUAL_TLS  # TLS 1.2 refuses a missing client certificate in the handshake
        return None
    except OSError:  # reset or closed during the handshake: not a TLS server
        connection.close()
        return None
    with tls:
        try:
            tls.sendall(HTTP2_PREFACE + EMPTY_SETTINGS)
            answer = tls.recv(9)
        except ssl.SSLError as error:  # TLS 1.3: an alert after the handshake, e.g. certificate required
            return Served.MUTUAL_TLS if "CERTIFICATE" in f"{error.reason or ''} {error}".upper() else Served.TLS
        except TimeoutError:
            return Served.TLS
        except OSError:
            answer = b""
    # TLS 1.3 ends the handshake before the server has judged the client's (missing) certificate: a gRPC
    # server that asks for one then hangs up without a word, where any other answers HTTP/2 SETTINGS.
    return Served.TLS if answer else Served.MUTUAL_TLS


def _speaks_plaintext_http2(address: tuple[str, int], timeout: float) -> Served:
    connection = _connect(address, timeout)
    if isinstance(connection, Served):
        return connection
    with connection, contextlib.suppress(OSError):
        connection.sendall(HTTP2_PREFACE + EMPTY_SETTINGS)
        frame = connection.recv(9)
        if len(frame) >= 4 and frame[3] == _SETTINGS_TYPE:
            return Served.PLAINTEXT
    return Served.UNKNOWN


def probe(target: str, timeout: float = PROBE_TIMEOUT) -> Served:
    """What `target` ("host:port") answers: TLS (asking for a client certificate or not), plaintext HTTP/2..."""
    address = _address(target)
    if address is None:
        return Served.UNKNOWN
    tls = _speaks_tls(address, timeout)
    return tls if tls is not None else _speaks_plaintext_http2(address, timeout)


def connection_hint(
    target: str,
    detail: str,
    *,
    insecure: bool,
    client_certificate: bool,
    remedies: Remedies | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> str | None:
    """The likely cause of a failed connection to `target` and its fix, in one line; None if none is known.

    `detail` is gRPC's text of the failure, `insecure` whether the client spoke plaintext and
    `client_certificate` whether it offered one.
    """
    said = remedies or Remedies()
    if "CERTIFICATE_VERIFY_FAILED" in detail:
        return f"{target}'s TLS certificate is not trusted: {said.trust}"
    served = probe(target, timeout)
    if served is Served.NOTHING:
        return f"nothing is listening on {target}: is the biller running, and on this port?"
    if insecure and served in (Served.TLS, Served.MUTUAL_TLS):
        return f"{target} speaks TLS, not plaintext: {said.to_tls}"
    if not insecure and served is Served.PLAINTEXT:
        return f"{target} speaks plaintext, not TLS: {said.to_plaintext}, or serve the biller with TLS"
    if not insecure and served is Served.MUTUAL_TLS:
        if client_certificate:
            return (
                f"{target} refused this client certificate (mutual TLS, TRN-9): it must be issued by a CA "
                "the biller trusts (its --tls-client-ca)"
            )
        return f"{target} asks for a client certificate (mutual TLS, TRN-9): {said.client_certificate}"
    return None


__all__ = ["PROBE_TIMEOUT", "Remedies", "Served", "connection_hint", "probe"]
