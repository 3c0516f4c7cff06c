"""Session fixtures (ONE throwaway PostgreSQL server for the whole run, a fresh database per test) and the
`slow` marker: `python -m pytest -m "not slow"` is the quick loop, CI runs everything."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import pytest

from agent.tools.pg_server import ThrowawayPostgres, throwaway_postgres

_database_numbers = itertools.count(1)

# Modules whose tests start processes, whole suites or several servers: seconds each, minutes together.
# Marked here, in one place, rather than in each file, so that moving a module in or out is one line.
SLOW_MODULES = frozenset(
    {
        "test_backoffice_cli",
        "test_bench",
        "test_chaos",
        "test_cli",
        "test_cli_mistakes",
        "test_conformance_biller",
        "test_conformance_biller_transport",
        "test_conformance_consumer",
        "test_console",
        "test_consumer_run",
        "test_demo",
        "test_fuzz",
        "test_household_notifications",
        "test_household_space",
        "test_household_web",
        "test_mutants",
        "test_packaging",
        "test_replicas",
        "test_web_kit",
    }
)


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """The root logger's handlers and level as they were before the test: a command run in-process (`serve`,
    `consumer run`) configures logging (agent/logs.py) with a handler on the test's captured stderr, which is
    closed after the test; a later test's INFO line then printed "--- Logging error ---" into its own output."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: seconds or more per test; deselect with -m 'not slow' for a quick loop")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in SLOW_MODULES or _on_postgres(item):
            item.add_marker(pytest.mark.slow)


def _on_postgres(item: pytest.Item) -> bool:
    # The session's PostgreSQL server takes seconds to start: a test on it, by fixture or by a "postgres"
    # parameter that asks for the fixture inside the test, is not for the quick loop.
    callspec = getattr(item, "callspec", None)
    parameters = list(callspec.params.values()) if callspec is not None else []
    return "postgres_server" in getattr(item, "fixturenames", ()) or any(value == "postgres" for value in parameters)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[ThrowawayPostgres]:
    """Started on first use (a few seconds), stopped and deleted at the end of the run."""
    with throwaway_postgres() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: ThrowawayPostgres) -> str:
    """The URL of a new, empty database on the session's server."""
    return postgres_server.create_database(f"test_{next(_database_numbers)}")
