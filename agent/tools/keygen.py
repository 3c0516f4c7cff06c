"""`parley keygen --out FILE`: make an Ed25519 signing key (PKCS#8 PEM, file mode 0600)."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

from rich.console import Console

from agent.protocol.keys import SigningKey
from agent.tools.paths import output_file_argument

EXIT_OK, EXIT_UNUSABLE = 0, 2


def _failed(out: Console, message: str) -> None:
    out.print(message, style="red", markup=False, highlight=False)


def _keygen(args: argparse.Namespace, out: Console) -> int:
    key = SigningKey.generate()
    path: Path = args.out  # its directory checked by output_file_argument
    try:
        key.save(path)
    except FileExistsError:
        _failed(out, f"refusing to overwrite {path}")
        return EXIT_UNUSABLE
    except OSError as error:
        _failed(out, f"cannot write {path}: {error.strerror}")
        return EXIT_UNUSABLE
    public = base64.b64encode(key.public_key.raw).decode()
    out.print(f"wrote {args.out} (mode 0600)\nkeyid      {key.keyid}\npublic key {public}")
    return EXIT_OK


def add_keygen_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `parley keygen` on the `parley` command's subparsers."""
    keygen = commands.add_parser("keygen", help="make an Ed25519 signing key")
    keygen.add_argument(
        "--out",
        required=True,
        type=output_file_argument,
        metavar="FILE",
        help="private key file to create (PKCS#8 PEM, mode 0600)",
    )
    keygen.set_defaults(handler=_keygen)


__all__ = ["add_keygen_command"]
