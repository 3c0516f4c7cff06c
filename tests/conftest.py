"""Session fixtures: ONE throwaway PostgreSQL server for the whole run, a fresh database per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from agent.tools.pg_server import ThrowawayPostgres, throwaway_postgres

_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[ThrowawayPostgres]:
    """Started on first use (a few seconds), stopped and deleted at the end of the run."""
    with throwaway_postgres() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: ThrowawayPostgres) -> str:
    """The URL of a new, empty database on the session's server."""
    return postgres_server.create_database(f"test_{next(_database_numbers)}")
