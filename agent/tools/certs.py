"""Throwaway TLS certificates for tests and demos: a development CA and leaf certificates it signs.

Parley's authenticity comes from signed envelopes and pinned key sets, never
from TLS (TRN-3); TLS gives confidentiality on the wire (TRN-2). These helpers
make the certificates a loopback test or a demo needs for a real TLS handshake,
with ECDSA P-256 keys (what every TLS stack, gRPC's included, accepts)::

    ca = make_dev_ca()
    server = issue_server_cert(ca, hostnames=["localhost"], ips=["127.0.0.1"])
    start_biller_server(agent, "127.0.0.1:0", tls=(server.chain_pem, server.key_pem))
    grpc.aio.secure_channel("localhost:7443", grpc.ssl_channel_credentials(ca.cert_pem))

Everything is PEM bytes. Validity is judged by the TLS stack against the real
system time, not by an injected `Clock`, so certificates are dated from the
wall clock. Not for production: keys are unencrypted and the CA is a toy.

`parley certs --out DIR [--host NAME ...] [--ip ADDRESS ...] [--client NAME ...]`
(`write_dev_certs`) writes a CA, a server certificate and optional client
certificates (for mutual TLS, TRN-9) as files::

    ca.pem                      trust anchor: the consumer's --tls-ca, the biller's --tls-client-ca
    server.pem, server.key      the biller's --tls-cert (chain) and --tls-key (mode 0600)
    client-NAME.pem/.key        a consumer's client certificate chain and key (mode 0600)

The CA's private key is not written: to issue more certificates, make a new set.

A host name (`--host`) is checked as RFC 1123 defines one (dot-separated labels of
letters, digits and hyphens; a left-most `*` label for a wildcard); an IP address
given as a host name is refused, since a TLS client checks an address against the
certificate's IP names only (`--ip`). TLS clients match the subject alternative
names (RFC 6125); the subject's common name is only a label, limited to 64
characters, so a longer host name stays whole in the alternative names and the
common name is the first name that fits, or "Parley development server".
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console

from agent.tools.numbers import number_argument
from agent.tools.paths import directory_argument

DEFAULT_VALIDITY = timedelta(days=30)
MAX_VALIDITY_DAYS = 825  # `parley certs --days`: the longest life browsers ever accepted for a TLS leaf
CA_FILE, SERVER_CHAIN_FILE, SERVER_KEY_FILE = "ca.pem", "server.pem", "server.key"
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # becomes part of a file name: no paths
_BACKDATE = timedelta(minutes=5)  # tolerate small clock differences between the parties
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # RFC 1123 2.1: 1-63 characters
MAX_HOST_NAME_CHARS = 253  # RFC 1123 2.1 (a name of 255 octets on the wire)
MAX_COMMON_NAME_CHARS = 64  # RFC 5280's ub-common-name: the cryptography library refuses a longer one
SERVER_COMMON_NAME = "Parley development server"  # when no name of the certificate fits in a common name


@dataclass(frozen=True)
class DevCA:
    """A development certificate authority: its self-signed certificate and private key (PEM)."""

    cert_pem: bytes
    key_pem: bytes

    def _key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def _cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


@dataclass(frozen=True)
class LeafCert:
    """A certificate issued by a `DevCA`, its private key, and the chain a TLS server presents."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @property
    def chain_pem(self) -> bytes:
        """The leaf followed by its issuer: what a server hands to `grpc.ssl_server_credentials`."""
        return self.cert_pem + self.ca_pem


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Parley development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_dev_ca(common_name: str = "Parley development CA", *, valid_for: timedelta = DEFAULT_VALIDITY) -> DevCA:
    """A fresh self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    now = datetime.now(UTC)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return DevCA(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _issue(
    ca: DevCA,
    common_name: str,
    usage: x509.ObjectIdentifier,
    alt_names: Sequence[x509.GeneralName],
    valid_for: timedelta,
) -> LeafCert:
    ca_key, ca_cert = ca._key(), ca._cert()
    key = _new_key()
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + valid_for, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(alt_names)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return LeafCert(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), ca.cert_pem)


def check_host_name(name: str) -> None:
    """ValueError naming the fault unless `name` is a host name a certificate can carry as a DNS name: RFC 1123
    labels, a wildcard only as the whole left-most label (RFC 6125), and no IP address (clients check an address
    against the certificate's IP names only: a DNS name "127.0.0.1" fails with "IP address mismatch")."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"{name} is an IP address: pass it with --ip")
    labels = name.split(".")
    if len(labels) > 1 and labels[0] == "*":
        labels = labels[1:]
    if len(name) > MAX_HOST_NAME_CHARS or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"{name!r} is not a host name: expected dot-separated labels of 1 to 63 letters, digits and hyphens, "
            f"not starting or ending with a hyphen (RFC 1123), at most {MAX_HOST_NAME_CHARS} characters in all"
        )


def issue_server_cert(
    ca: DevCA,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1",),
    *,
    valid_for: timedelta = DEFAULT_VALIDITY,
) -> LeafCert:
    """A TLS server certificate for these DNS names and IP addresses (subject alternative names).

    ValueError if there is no name at all, a host name is not one (`check_host_name`) or an address does not
    parse. The common name is the first name of at most 64 characters (all of them stay in the alternative
    names, which are what TLS clients match), else SERVER_COMMON_NAME.
    """
    if not hostnames and not ips:
        raise ValueError("a server certificate needs at least one host name or IP address")
    for name in hostnames:
        check_host_name(name)
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in hostnames]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    common_name = next((name for name in [*hostnames, *ips] if len(name) <= MAX_COMMON_NAME_CHARS), SERVER_COMMON_NAME)
    return _issue(ca, common_name, ExtendedKeyUsageOID.SERVER_AUTH, alt_names, valid_for)


def issue_client_cert(ca: DevCA, common_name: str, *, valid_for: timedelta = DEFAULT_VALIDITY) -> LeafCert:
    """A TLS client certificate (extended key usage clientAuth) for a mutual-TLS biller (TRN-9)."""
    return _issue(ca, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, (), valid_for)


def write_pem(path: str | os.PathLike[str], data: bytes, *, private: bool = False) -> Path:
    """Write PEM bytes to a new file (mode 0600 when `private`); FileExistsError if it exists."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return Path(path)


def client_files(name: str) -> tuple[str, str]:
    """The certificate chain and key file names of client `name`; ValueError if it cannot be a file name."""
    if not _CLIENT_NAME.fullmatch(name):
        raise ValueError(f"client name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit")
    return f"client-{name}.pem", f"client-{name}.key"


def write_dev_certs(
    out: Path,
    *,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1",),
    clients: Sequence[str] = (),
    valid_for: timedelta = DEFAULT_VALIDITY,
) -> list[Path]:
    """Make a development CA, a server certificate and client certificates into `out`; the files written.

    Key files are mode 0600. Nothing is written when a file to be written
    already exists (FileExistsError) or a name is unusable (ValueError).
    """
    client_names = [client_files(name) for name in clients]
    if len(set(clients)) != len(clients):
        raise ValueError("each --client name may be given once")
    ca = make_dev_ca(valid_for=valid_for)
    server = issue_server_cert(ca, hostnames, ips, valid_for=valid_for)
    planned: list[tuple[str, bytes, bool]] = [
        (CA_FILE, ca.cert_pem, False),
        (SERVER_CHAIN_FILE, server.chain_pem, False),
        (SERVER_KEY_FILE, server.key_pem, True),
    ]
    for name, (chain_file, key_file) in zip(clients, client_names, strict=True):
        client = issue_client_cert(ca, name, valid_for=valid_for)
        planned += [(chain_file, client.chain_pem, False), (key_file, client.key_pem, True)]
    existing = [file for file, _, _ in planned if (out / file).exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(str(out / file) for file in existing)}")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    return [write_pem(out / file, data, private=private) for file, data, private in planned]


def _certs(args: argparse.Namespace, out: Console) -> int:
    hostnames, ips = args.host, args.ip
    if not hostnames and not ips:
        hostnames, ips = ["localhost"], ["127.0.0.1"]
    try:
        written = write_dev_certs(
            Path(args.out), hostnames=hostnames, ips=ips, clients=args.client, valid_for=timedelta(days=args.days)
        )
    except (OSError, ValueError) as error:  # FileExistsError above all: nothing is ever overwritten
        out.print(str(error), style="red", markup=False, highlight=False, soft_wrap=True)
        return 2  # unusable input, as for every parley command
    for path in written:
        private = " (private key, mode 0600)" if path.suffix == ".key" else ""
        out.print(f"wrote {path}{private}", markup=False, highlight=False, soft_wrap=True)
    names = ", ".join([*hostnames, *ips])
    directory = Path(args.out)
    out.print(
        f"server certificate for {names}, valid {args.days} days; development only, the CA key was not kept\n"
        f"biller:   --tls-cert {directory / SERVER_CHAIN_FILE} --tls-key {directory / SERVER_KEY_FILE}"
        + (f" --tls-client-ca {directory / CA_FILE}" if args.client else "")
        + f"\nconsumer: trust {directory / CA_FILE}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0


def add_certs_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `parley certs` on the `parley` command's subparsers."""
    certs = commands.add_parser(
        "certs",
        help="make a development CA, a server certificate and client certificates (files)",
        description="Write ca.pem, server.pem (chain), server.key and client-NAME.pem/.key into a directory, "
        "for TLS and mutual TLS in development and tests. Refuses to overwrite; key files are mode 0600. "
        "Without --host and --ip the server certificate names localhost and 127.0.0.1.",
    )
    certs.add_argument(
        "--out",
        required=True,
        type=directory_argument,
        metavar="DIR",
        help="directory to write into (created if missing)",
    )
    certs.add_argument(
        "--host", action="append", default=[], metavar="NAME", help="server DNS name (not an IP address); repeatable"
    )
    certs.add_argument("--ip", action="append", default=[], metavar="ADDRESS", help="server IP address; repeatable")
    certs.add_argument(
        "--client", action="append", default=[], metavar="NAME", help="also a client certificate NAME; repeatable"
    )
    certs.add_argument(
        "--days",
        type=number_argument(int, 1, MAX_VALIDITY_DAYS),
        default=DEFAULT_VALIDITY.days,
        metavar="DAYS",
        help="validity (default: %(default)s)",
    )
    certs.set_defaults(handler=_certs)


__all__ = [
    "CA_FILE",
    "SERVER_CHAIN_FILE",
    "SERVER_COMMON_NAME",
    "SERVER_KEY_FILE",
    "DevCA",
    "LeafCert",
    "add_certs_command",
    "check_host_name",
    "client_files",
    "issue_client_cert",
    "issue_server_cert",
    "make_dev_ca",
    "write_dev_certs",
    "write_pem",
]
