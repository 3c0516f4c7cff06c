"""Who may open a web face and which requests it believes: the listen rule, the opening token, sessions and CSRF.

Sans I/O: plain functions and one frozen dataclass, used by the app's middlewares (`agent/web/app.py`).
Every secret is compared with `hmac.compare_digest`, so a wrong guess takes as long as a nearly right one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from agent.listen import is_loopback

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "MIN_TOKEN_LENGTH",
    "Sessions",
    "check_listen_address",
    "is_loopback_host",
    "new_token",
]

MIN_TOKEN_LENGTH = 22  # characters of URL-safe base64: 128 bits, out of reach of guessing over HTTP
CSRF_FIELD = "csrf_token"  # the hidden form field every POST form carries (`csrf_field()` in templates)
CSRF_HEADER = "X-CSRF-Token"  # the same token, for a script's fetch()
_SESSION_KEY_CONTEXT = b"parley-web/session-key/v1"


def new_token() -> str:
    """A fresh opening token (256 bits), for the URL a face prints once."""
    return secrets.token_urlsafe(32)


is_loopback_host = is_loopback  # the one reading of loopback (agent/listen.py), under the kit's name


def check_listen_address(host: str, *, tls_cert: Path | None, tls_key: Path | None, client_ca: Path | None) -> None:
    """Refuse a non-loopback listener unless it has TLS and an authentication mechanism (mutual TLS).

    On loopback the opening token is enough: only this machine's users can connect. Anywhere else the token
    would cross a network in clear and anyone who can reach the port could try it, so the face must speak TLS
    and ask every browser for a client certificate signed by `client_ca`.
    """
    if is_loopback_host(host):
        return
    needed = (("--tls-cert", tls_cert), ("--tls-key", tls_key), ("--client-ca", client_ca))
    missing = [flag for flag, value in needed if value is None]
    if missing:
        raise ValueError(
            f"refusing to serve the web face on {host!r}, which is not a loopback address: off loopback it needs "
            f"TLS (--tls-cert and --tls-key) and client certificates (--client-ca); missing {', '.join(missing)}"
        )


def _mac(key: bytes, purpose: str, value: str) -> str:
    return hmac.new(key, f"{purpose}\x00{value}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Sessions:
    """Stateless sessions: the cookie is `<random id>.<HMAC of the id>`, under a key derived from the token.

    Nothing is kept per session on the server, so no table grows and a restart with the same token keeps
    every browser signed in, while a new token signs everyone out. The CSRF token of a session is another
    HMAC of its id, so it needs no storage either. The cookie's name is derived from the key too: two faces
    on one machine (cookies ignore ports) never overwrite each other's cookie.
    """

    token: str = field(repr=False)
    key: bytes = field(repr=False)
    cookie_name: str

    @classmethod
    def for_token(cls, token: str) -> Sessions:
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the opening token must have at least {MIN_TOKEN_LENGTH} characters")
        key = hmac.new(token.encode(), _SESSION_KEY_CONTEXT, hashlib.sha256).digest()
        return cls(token=token, key=key, cookie_name="parley_" + _mac(key, "cookie-name", "")[:12])

    def token_matches(self, offered: str) -> bool:
        return hmac.compare_digest(offered.encode(errors="replace"), self.token.encode())

    def new_session(self) -> str:
        """The value of a new session cookie."""
        session_id = secrets.token_urlsafe(16)
        return f"{session_id}.{_mac(self.key, 'session', session_id)}"

    def session_id(self, cookie: str | None) -> str | None:
        """The session id a cookie proves, or None when it is absent or forged."""
        if not cookie or "." not in cookie:
            return None
        session_id, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac.encode(errors="replace"), _mac(self.key, "session", session_id).encode()):
            return None
        return session_id

    def csrf_token(self, session_id: str) -> str:
        return _mac(self.key, "csrf", session_id)

    def csrf_matches(self, session_id: str, offered: str) -> bool:
        return hmac.compare_digest(offered.encode(errors="replace"), self.csrf_token(session_id).encode())
