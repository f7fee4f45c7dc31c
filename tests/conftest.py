"""Shared test set-up: make both packages importable from a plain checkout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "clients"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# keras 3 picks its backend at import time; lrpilot is tested with the torch backend.
os.environ.setdefault("KERAS_BACKEND", "torch")
