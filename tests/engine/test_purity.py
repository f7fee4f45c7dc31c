"""The engine stays free of I/O: no event loop, socket, exporter, watcher, clock or file."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "monitor" / "engine"
FORBIDDEN_MODULES = {
    "asyncio",
    "websockets",
    "prometheus_client",
    "watchdog",
    "pydantic",
    "socket",
    "threading",
    "time",
    "datetime",
    "sqlite3",
    "subprocess",
    "selectors",
    "os",
}
FORBIDDEN_CALLS = {"open", "print", "input"}


def _engine_modules() -> list[Path]:
    return sorted(ENGINE.rglob("*.py"))


def test_there_are_engine_modules() -> None:
    """The check below looks at a real tree (it would pass vacuously on an empty one)."""
    names = {p.name for p in _engine_modules()}
    assert {"job.py", "events.py", "plateau.py", "reduce_on_plateau.py", "cyclic.py"} <= names


def test_engine_imports_nothing_that_does_io() -> None:
    """No engine module imports asyncio, websockets, prometheus_client, watchdog, a clock or the OS."""
    offenders = []
    for path in _engine_modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
                offenders.append(f"{path.name}:{node.lineno} calls {node.func.id}()")
                continue
            else:
                continue
            for name in names:
                if name.split(".")[0] in FORBIDDEN_MODULES:
                    offenders.append(f"{path.name}:{node.lineno} imports {name}")
    assert offenders == []
