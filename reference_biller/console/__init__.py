"""The biller's operator console: `parley biller console`, a read-only web face over the biller's store.

Outcome figures (reference_biller/outcomes.py) with charts over the months, and drill-down pages for
accounts, bills, negotiations move by move, arrangements, payments and the event log. Built on the web kit
(agent/web, docs/WEB.md); the operator guide is docs/CONSOLE.md.
"""

from typing import TYPE_CHECKING

from agent.lazy import served_lazily

if TYPE_CHECKING:
    from reference_biller.console.app import (
        PAGE_SIZE,
        PERIOD_MONTHS,
        ConsoleSettings,
        console_web_config,
        create_console_app,
    )
    from reference_biller.console.records import Snapshot, read_snapshot

# Served lazily (agent/lazy.py): `parley biller` registers the console's command from this package, and the web
# stack its pages need (aiohttp) would otherwise be a quarter of a second of every biller command's start.
_HOMES = {
    "PAGE_SIZE": "reference_biller.console.app",
    "PERIOD_MONTHS": "reference_biller.console.app",
    "ConsoleSettings": "reference_biller.console.app",
    "console_web_config": "reference_biller.console.app",
    "create_console_app": "reference_biller.console.app",
    "Snapshot": "reference_biller.console.records",
    "read_snapshot": "reference_biller.console.records",
}
__getattr__ = served_lazily(__name__, _HOMES)

__all__ = [
    "PAGE_SIZE",
    "PERIOD_MONTHS",
    "ConsoleSettings",
    "Snapshot",
    "console_web_config",
    "create_console_app",
    "read_snapshot",
]
