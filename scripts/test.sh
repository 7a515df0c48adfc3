#!/usr/bin/env bash
# Test suite: build the environment, then run the tests against both ends of every range in requirements.txt:
#   .venv        the newest versions (what a fresh ComfyUI install gets): unit tests + real-ComfyUI-server tests
#   .venv-floor  the lowest versions: unit tests + the real-server run of the default workflow
# Each venv is checked first to hold only what its own resolution installed (scripts/check_venv.py).
# Arguments go to both pytest runs (e.g. -q, -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" --tests
"$ROOT/.venv/bin/python" "$ROOT/scripts/check_venv.py"
"$ROOT/.venv-floor/bin/python" "$ROOT/scripts/check_venv.py"
# pytest runs from tests/ (its rootdir, tests/pytest.ini): the repository root is the pack's package, whose
# __init__.py imports ComfyUI and must not be imported by pytest as a test package.
cd "$ROOT/tests"
versions() { "$1" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in
  ("transformers", "tokenizers", "huggingface-hub", "accelerate", "gguf", "safetensors")))'; }
newest="$(versions "$ROOT/.venv/bin/python")" floors="$(versions "$ROOT/.venv-floor/bin/python")"
if [ "$newest" = "$floors" ]; then  # the range collapsed: the two runs would test one set of versions
  echo "[test] .venv and .venv-floor hold the same versions ($newest): requirements.txt allows only one"; exit 1
fi
# The suite writes GBs (checkpoints, ComfyUI models, pytest's tmp folders): a full disk shows up here first.
disk() { df -h "$ROOT" | awk -v when="$1" 'NR == 2 {print "[test] disk " when ": " $4 " free of " $2}'; }
disk "before the tests"
echo "== newest: $newest"
"$ROOT/.venv/bin/python" -m pytest -ra "$@"
disk "after the newest run"
echo "== floors: $floors"
"$ROOT/.venv-floor/bin/python" -m pytest -ra "$@" unit comfy/test_server.py::test_default_workflow_follows_its_prompt
disk "after the floor run"
