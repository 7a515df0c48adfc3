#!/usr/bin/env bash
# Main job: build what it runs (.venv, ComfyUI, the default LLM; first run: a few minutes), start ComfyUI on
# 127.0.0.1 with the pack, run workflows/lidit_shapes_default.json, print the PNG it wrote, stop ComfyUI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/comfy_client.py" "$@"
