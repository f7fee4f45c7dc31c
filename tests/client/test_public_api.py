"""The public surface of lrpilot is deliberate, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lrpilot

CLIENTS = Path(__file__).resolve().parents[2] / "clients"


def test_exported_names_are_exactly_the_intended_ones() -> None:
    """lrpilot.__all__ lists the public API, and every name in it exists."""
    assert set(lrpilot.__all__) == {
        "PROTOCOL_VERSION",
        "Backoff",
        "Client",
        "ClientStats",
        "Connection",
        "Decision",
        "DecisionKind",
        "Halted",
        "ProtocolError",
        "Transport",
        "TransportClosed",
        "WebSocketTransport",
        "__version__",
    }
    for name in lrpilot.__all__:
        assert hasattr(lrpilot, name), name
    assert issubclass(lrpilot.Halted, Exception)


def test_import_does_not_pull_in_frameworks() -> None:
    """import lrpilot loads neither torch, keras, numpy, pydantic nor websockets."""
    code = (
        "import sys, lrpilot, lrpilot.torch, lrpilot.keras, lrpilot.lightning, lrpilot.hf\n"
        "heavy = [m for m in ('torch', 'keras', 'numpy', 'pydantic', 'websockets',"
        " 'lightning', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(CLIENTS), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == ""
