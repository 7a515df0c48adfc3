"""The pack installed the way artists install it: by ComfyUI Manager, from a git URL, into a clean ComfyUI.

A clone of this repository's committed HEAD stands in for the public repository: Manager's `cm-cli install
<git url>` takes any URL with a scheme and a host (`is_valid_url` in comfyui_manager/glob/manager_core.py), and
git clones `file://localhost/<path>` like any remote. Manager clones it into custom_nodes/<repo name>, installs
requirements.txt line by line with pip (into the running Python, here .venv, where everything is already there)
and would run an install.py (the pack has none). The clean ComfyUI is a hard-link copy of .comfyui's code
without the pack, with empty model folders and the default LLM linked in; .comfyui itself is not touched.
The same clone then passes the Comfy Registry's check, `comfy node validate` (comfy-cli).
"""
import os
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

import comfy_client
from conftest import DEFAULT_WORKFLOW, ROOT

PACK_NODES = ("LLMLoader", "LLMPromptEncode", "LIDiTLoader", "LIDiTSampler", "LLMAdapterLoader",
              "LLMConditioningJoin")
LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_NAME = "llm-diffusion"  # the public repository's name, which Manager uses for the folder
BIN = os.path.dirname(sys.executable)
# Written by ComfyUI or holding the pack / models: made fresh in the copy instead of linked.
NOT_LINKED = {"custom_nodes", "models", "user", "output", "input", "temp"}


def run(cmd, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    started = time.time()
    result = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    print(f"$ {' '.join(cmd)}  ({time.time() - started:.1f}s, rc {result.returncode})")
    return result


def clean_comfyui(dest: str) -> str:
    src = comfy_client.COMFY_DIR
    os.makedirs(dest)
    for name in os.listdir(src):
        if name in NOT_LINKED:
            continue
        path = os.path.join(src, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dest, name), copy_function=os.link, symlinks=True)
        else:
            os.link(path, os.path.join(dest, name))
    os.makedirs(os.path.join(dest, "custom_nodes"))
    for name in os.listdir(os.path.join(src, "custom_nodes")):  # ComfyUI's own examples, not the pack's link
        path = os.path.join(src, "custom_nodes", name)
        if os.path.isfile(path) and not os.path.islink(path):
            shutil.copy(path, os.path.join(dest, "custom_nodes", name))
    for folder in os.listdir(os.path.join(src, "models")):
        if os.path.isdir(os.path.join(src, "models", folder)):
            os.makedirs(os.path.join(dest, "models", folder))
    os.symlink(os.path.join(src, "models", "LLM", LLM_FILE), os.path.join(dest, "models", "LLM", LLM_FILE))
    return dest


@pytest.fixture(scope="module")
def source_clone(tmp_path_factory):
    """This repository's committed HEAD, as a git repository named like the public one."""
    path = str(tmp_path_factory.mktemp("git") / REPO_NAME)
    result = run(["git", "clone", "-q", ROOT, path], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def manager_installed(tmp_path_factory, source_clone):
    comfy = clean_comfyui(str(tmp_path_factory.mktemp("clean") / "ComfyUI"))
    assert not os.path.exists(os.path.join(comfy, "custom_nodes", "llm_diffusion"))
    assert not os.path.exists(os.path.join(comfy, "custom_nodes", REPO_NAME))
    result = run([os.path.join(BIN, "cm-cli"), "install", "file://localhost" + source_clone], cwd=comfy,
                 env={"COMFYUI_PATH": comfy})
    print(result.stdout[-3000:], result.stderr[-3000:])
    return comfy, result


def test_manager_installs_the_pack_from_its_git_url(manager_installed, source_clone):
    comfy, result = manager_installed
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[INSTALLED]" in result.stdout and "Installation was successful" in result.stdout
    installed = os.path.join(comfy, "custom_nodes", REPO_NAME)
    assert os.path.isfile(os.path.join(installed, "__init__.py")), os.listdir(os.path.join(comfy, "custom_nodes"))
    head = lambda repo: run(["git", "rev-parse", "HEAD"], cwd=repo).stdout.strip()  # noqa: E731
    assert head(installed) == head(source_clone) == head(ROOT)
    # every requirement went through pip (already satisfied here, so the venv is unchanged)
    for line in open(os.path.join(installed, "requirements.txt")):
        req = line.split("#")[0].strip()
        if req:
            assert f"'install', '{req}'" in result.stdout.replace("\n", ""), req
    # the shipped default model came with the clone (Manager installs no models)
    assert os.path.isfile(os.path.join(installed, "models", "lidit", "lidit-shapes-smollm2.safetensors"))


def test_clean_comfyui_with_the_manager_install_runs_the_default_workflow(manager_installed, tmp_path):
    comfy, result = manager_installed
    assert result.returncode == 0
    out = str(tmp_path / "output")
    with comfy_client.ComfyServer(out, comfy_dir=comfy) as server:
        log = server.log_tail(200_000)
        # ComfyUI's start-up summary has one line per custom node folder, "(IMPORT FAILED)" on the failed ones
        pack_lines = [l for l in log.splitlines() if l.rstrip().endswith(os.path.join("custom_nodes", REPO_NAME))]
        assert pack_lines and not any("IMPORT FAILED" in l for l in pack_lines), log[-3000:]
        info = server.object_info()
        missing = [n for n in PACK_NODES if n not in info]
        assert not missing, f"nodes not registered: {missing}\n{log[-3000:]}"
        assert info["LLMLoader"]["python_module"] == f"custom_nodes.{REPO_NAME}"
        assert LLM_FILE in info["LLMLoader"]["input"]["required"]["llm_name"][1]["options"]
        started = time.time()
        entry = server.run(comfy_client.ui_to_api(comfy_client.load_workflow(DEFAULT_WORKFLOW), info))
        print(f"default workflow in the clean ComfyUI: {time.time() - started:.1f}s")
        images = server.output_images(entry)
    assert len(images) == 1 and images[0].startswith(out)
    with Image.open(images[0]) as im:
        assert im.format == "PNG" and im.size == (256, 256)
        assert im.convert("RGB").getextrema() != ((0, 0), (0, 0), (0, 0))
    print(images[0])


def test_registry_validation_passes(source_clone, tmp_path):
    """`comfy node validate`: what the Comfy Registry checks before publishing (pyproject, security lint)."""
    result = run([os.path.join(BIN, "comfy"), "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                 cwd=source_clone, env={"XDG_CONFIG_HOME": str(tmp_path)}, timeout=120)
    said = result.stdout + result.stderr  # rich prints some of it to stderr
    print(said)
    assert result.returncode == 0, said
    assert "All validation checks passed successfully" in said
    assert "Security warnings" not in said
