"""``python -m monitor`` is the ``lrpilot`` command."""

from .cli import main

raise SystemExit(main())
