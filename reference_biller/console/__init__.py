"""The biller's operator console: `parley biller console`, a read-only web face over the biller's store.

Outcome figures (reference_biller/outcomes.py) with charts over the months, and drill-down pages for
accounts, bills, negotiations move by move, arrangements, payments and the event log. Built on the web kit
(agent/web, docs/WEB.md); the operator guide is docs/CONSOLE.md.
"""

from reference_biller.console.app import (
    PAGE_SIZE,
    PERIOD_MONTHS,
    ConsoleSettings,
    console_web_config,
    create_console_app,
)
from reference_biller.console.records import Snapshot, read_snapshot

__all__ = [
    "PAGE_SIZE",
    "PERIOD_MONTHS",
    "ConsoleSettings",
    "Snapshot",
    "console_web_config",
    "create_console_app",
    "read_snapshot",
]
