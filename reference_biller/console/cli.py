"""`parley biller console`: serve the read-only operator console until SIGTERM or SIGINT.

    parley biller console [--config FILE] [--state-dir DIR] [--store PATH|URL] [--listen HOST:PORT]
                          [--tls-cert FILE --tls-key FILE --client-ca FILE]

A separate process over the same store as `parley biller serve` (like `parley biller backoffice`): it only
reads. It prints the opening URL (with its token) once; loopback only unless TLS with client certificates is
given (the web kit refuses anything else). Exit codes: 0 stopped by a signal, 1 failed while serving,
2 bad usage or configuration. docs/CONSOLE.md is the operator guide.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from rich.console import Console

from agent.clock import SystemClock
from reference_biller.config import SAMPLE, ConfigError, load_config
from reference_biller.service import STORE_FILE
from reference_biller.settings import SettingsError, config_file, resolve_state_dir, resolve_store

__all__ = ["add_console_command"]

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2
DEFAULT_LISTEN = "127.0.0.1:0"


def _failed(out: Console, message: str) -> None:
    out.print(message, style="red", markup=False, highlight=False, soft_wrap=True)


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen takes HOST:PORT, not {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _console(args: argparse.Namespace, out: Console) -> int:
    # Imported here: the web stack (aiohttp) is a quarter of a second of every `parley biller` command's start,
    # and only this one serves pages.
    from agent.web import start_site  # noqa: PLC0415
    from reference_biller.console.app import (  # noqa: PLC0415
        ConsoleSettings,
        console_web_config,
        create_console_app,
    )

    path, _ = config_file(args.config)
    try:
        config = load_config(path or SAMPLE)
        state_dir = resolve_state_dir(args.state_dir, config.server)
        store = resolve_store(args.store, config.server) or str(state_dir / STORE_FILE)
        host, port = _listen(args.listen)
        web_config = console_web_config(
            f"{config.name} · collections console",
            host=host,
            tls_cert=None if args.tls_cert is None else Path(args.tls_cert),
            tls_key=None if args.tls_key is None else Path(args.tls_key),
            client_ca=None if args.client_ca is None else Path(args.client_ca),
        )
    except ConfigError as error:
        _failed(out, f"invalid configuration {error}")
        return EXIT_UNUSABLE
    except (SettingsError, ValueError) as error:  # the kit's listen rule says which flags are missing
        _failed(out, str(error))
        return EXIT_UNUSABLE
    if not Path(store).exists() and "://" not in store:
        _failed(out, f"no biller store at {store}: give the serving biller's --state-dir or --store")
        return EXIT_UNUSABLE

    async def serve() -> None:
        app = create_console_app(ConsoleSettings(store, SystemClock()), web_config)
        async with start_site(app, port=port) as site:
            print(f"biller      {config.party_id}", flush=True)
            print(f"console     {site.url} (read-only)", flush=True)
            print(f"open        {site.opening_url}", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            await stop.wait()

    try:
        asyncio.run(serve())
    except (OSError, RuntimeError) as error:
        _failed(out, f"the console failed: {error}")
        return EXIT_FAILED
    return EXIT_OK


def add_console_command(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `console` to `parley biller`."""
    console = actions.add_parser(
        "console",
        help="serve the read-only operator console: outcomes and records (docs/CONSOLE.md)",
        description="Serve the operator console over the biller's store until SIGTERM: outcome figures and charts, "
        "accounts, bills, negotiations, arrangements, payments, events. Read-only; opened by the printed link.",
    )
    console.add_argument("--config", help="reference biller configuration (TOML; env PARLEY_CONFIG)")
    console.add_argument("--state-dir", help="the biller's state directory (env PARLEY_STATE_DIR)")
    console.add_argument("--store", metavar="PATH|URL", help="the biller's store, if not in the state directory")
    console.add_argument(
        "--listen", metavar="HOST:PORT", default=DEFAULT_LISTEN, help="address (default 127.0.0.1, any free port)"
    )
    console.add_argument("--tls-cert", metavar="FILE", help="TLS certificate chain, PEM (needed off loopback)")
    console.add_argument("--tls-key", metavar="FILE", help="TLS private key, PEM (needed off loopback)")
    console.add_argument(
        "--client-ca", metavar="FILE", help="require browser certificates issued by this CA (needed off loopback)"
    )
    console.set_defaults(handler=_console)
