"""Parley's version: the one place it is written.

`pyproject.toml` reads it (`dynamic = ["version"]`), so the package metadata,
`parley --version`, the biller's gRPC server name and the consumer's client
name all say the same thing.
"""

from __future__ import annotations

__version__ = "0.1.0"


def software_name(role: str) -> str:
    """What a Parley program calls itself on the wire (Hello's server and client names): `parley-<role>/<version>`."""
    return f"parley-{role}/{__version__}"


__all__ = ["__version__", "software_name"]
