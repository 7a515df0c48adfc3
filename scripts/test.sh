#!/usr/bin/env bash
# Test suite: build the environment, then unit tests of adapters/ and the real-ComfyUI-server tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# pytest runs from tests/ (its rootdir, tests/pytest.ini): the repository root is the pack's package, whose
# __init__.py imports ComfyUI and must not be imported by pytest as a test package.
cd "$ROOT/tests"
exec "$ROOT/.venv/bin/python" -m pytest -ra "$@"
