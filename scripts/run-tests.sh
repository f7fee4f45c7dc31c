#!/usr/bin/env bash
# Runs the test suite (ruff and mypy run inside it, in tests/test_lint.py).
# pytest's exit status 5 means "no tests were collected": that is a broken suite, not a pass.
set -uo pipefail
BIN=${1:-.venv/bin}
export KERAS_BACKEND=torch
"$BIN/python" -m pytest -q -p no:cacheprovider "${@:2}"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "run-tests: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit "$rc"
