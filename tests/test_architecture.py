"""The layers of the tree, checked: each package imports only what lies below it (DESIGN.md, Layout).

Imports are read with `ast` from the source, lazy imports inside functions included, so a rule
cannot be dodged by importing late. The layers, bottom up:

- `parley.v1` (generated wire code);
- `agent.protocol`: every rule, sans I/O — the standard library, the wire code and its crypto and
  money dependencies only;
- the library: `agent.biller`, `agent.consumer`, `agent.stores`, `agent.transport`, `agent.web` and the
  runtime modules beside them (clock, logs, metrics...); the biller and the consumer never import each
  other, so either can be embedded alone;
- above the library: the conformance suites, the reference agents, the tools and the CLI.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agent"

# Third-party packages the protocol core may use: protobuf for the wire, crypto for keys (currencies are data).
PROTOCOL_THIRD_PARTY = {"google", "nacl", "cryptography"}
ABOVE_THE_LIBRARY = ("agent.tools", "agent.conformance", "agent.cli", "reference_biller", "reference_consumer", "tests")
LIBRARY = ("agent.protocol", "agent.biller", "agent.consumer", "agent.stores", "agent.transport", "agent.web")
# What `agent.stores` defines itself, beside the names it loads lazily from its modules.
STORE_FUNCTIONS = ("StoreOpenError", "check_store_location", "open_biller_store", "open_consumer_store")
RUNTIME_MODULES = ("clock", "lazy", "logs", "lru", "metrics", "ratelimit", "tracing", "identity", "version", "listen")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name != "__future__":
                yield node.lineno, name


def files_of(*packages: str) -> list[Path]:
    found: list[Path] = []
    for package in packages:
        path = ROOT / package.replace(".", "/")
        found.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")])
    return [path for path in found if path.exists()]


def within(name: str, *packages: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def violations(paths: list[Path], allowed: Callable[[str], bool], root: Path = ROOT) -> list[str]:
    return [
        f"{path.relative_to(root)}:{line} imports {name}"
        for path in paths
        for line, name in imports_of(path, root)
        if not allowed(name)
    ]


def test_the_protocol_core_imports_only_the_wire_the_standard_library_and_its_crypto_and_money() -> None:
    def allowed(name: str) -> bool:
        top = name.partition(".")[0]
        return (
            within(name, "agent.protocol", "parley.v1") or top in sys.stdlib_module_names or top in PROTOCOL_THIRD_PARTY
        )

    assert violations(files_of("agent.protocol"), allowed) == []


@pytest.mark.parametrize("package", [*LIBRARY, *(f"agent.{name}" for name in RUNTIME_MODULES)])
def test_library_code_never_imports_tools_conformance_or_the_reference_agents(package: str) -> None:
    assert violations(files_of(package), lambda name: not within(name, *ABOVE_THE_LIBRARY)) == []


def test_the_biller_and_the_consumer_never_import_each_other() -> None:
    assert violations(files_of("agent.biller"), lambda name: not within(name, "agent.consumer")) == []
    assert violations(files_of("agent.consumer"), lambda name: not within(name, "agent.biller")) == []


def test_the_protocol_core_knows_nothing_of_the_runtime() -> None:
    """No clock reads, sockets, threads or files in the core: time is passed in (DESIGN.md)."""
    forbidden = {"socket", "asyncio", "threading", "sqlite3", "grpc", "time", "subprocess"}
    assert violations(files_of("agent.protocol"), lambda name: name.partition(".")[0] not in forbidden) == []


def test_every_library_module_is_covered_by_a_rule() -> None:
    """A new top-level module in agent/ must be placed in a layer above, so no rule silently misses it."""
    placed = {*LIBRARY, *ABOVE_THE_LIBRARY, *(f"agent.{name}" for name in RUNTIME_MODULES), "agent.vectors"}
    unplaced = [
        module_name(path)
        for path in sorted(AGENT.iterdir())
        if (path.is_dir() and (path / "__init__.py").exists()) or (path.suffix == ".py" and path.name != "__init__.py")
        if module_name(path) not in placed
    ]
    assert unplaced == []


def test_the_rules_see_a_violation(tmp_path: Path) -> None:
    """The checker itself: a planted upward import is found, lazy and relative ones too."""
    planted = tmp_path / "agent" / "protocol" / "planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("def f():\n    from agent.tools import demo\n    from ..biller import BillerAgent\n")
    found = violations([planted], lambda name: not within(name, *ABOVE_THE_LIBRARY, "agent.biller"), tmp_path)
    assert found == [
        "agent/protocol/planted.py:2 imports agent.tools",
        "agent/protocol/planted.py:3 imports agent.biller",
    ]


def test_the_public_api_loads_each_name_from_its_home_and_the_core_stays_light() -> None:
    """`agent.__all__` names what `agent` serves; importing the protocol core does not load gRPC or a database."""
    import agent  # noqa: PLC0415

    assert sorted(agent.__all__) == sorted(["__version__", *agent._HOMES])
    for name in agent._HOMES:
        assert getattr(agent, name) is not None
    probe = "import sys, agent.protocol.agreement; print(sorted({'grpc', 'sqlite3', 'psycopg'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_stores_serve_each_name_from_its_module_and_a_consumer_loads_no_biller_back_end() -> None:
    """`agent.stores` loads its back ends on first use: a consumer client starts without the biller's SQL."""
    import agent.stores  # noqa: PLC0415

    assert sorted(agent.stores.__all__) == sorted([*agent.stores._HOMES, *STORE_FUNCTIONS])
    for name in agent.stores.__all__:
        assert getattr(agent.stores, name) is not None
    probe = "import sys, agent.consumer; print(sorted(name for name in sys.modules if 'stores.biller' in name))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
