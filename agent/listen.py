"""Listen addresses, one reading for every listener (gRPC, metrics, web pages, clients): HOST:PORT and loopback.

TRN-2: plaintext is allowed only on a loopback address; every listener asks `is_loopback` the same way.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether a listen host is a loopback address: 127.0.0.0/8, ::1 or localhost (TRN-2)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MAX_PORT = 65535


def is_endpoint(text: str) -> bool:
    """Whether `text` is an address a client may be told to connect to: host:port, a port from 1 to 65535, no
    space in the host. The one rule for an enrolment link's endpoint (ENR-8), a biller printing one (`parley
    biller codes --endpoint`) and a suite's `--target`."""
    host, separator, port = text.rpartition(":")
    digits = port.isascii() and port.isdigit()  # str.isdigit alone takes "²", which int() refuses
    return bool(separator and host and digits and 0 < int(port) <= MAX_PORT) and not any(c.isspace() for c in host)


def parse_listen(listen: str) -> tuple[str, int]:
    """("host", port) from "HOST:PORT" ("[::1]:9464" for IPv6); ValueError naming what is wrong."""
    host, separator, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"the port in {listen!r} must be a number from 0 to 65535 (0 picks a free port)")
    return host, int(port)


__all__ = ["MAX_PORT", "is_endpoint", "is_loopback", "parse_listen"]
