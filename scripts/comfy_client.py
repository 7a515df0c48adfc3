"""Drives a real ComfyUI server: start it with the pack, convert UI-format workflows to the API format, post
them to /prompt, wait on /history and collect the outputs. Used by the main job and by the tests."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY_DIR = os.environ.get("COMFYUI_DIR", os.path.join(ROOT, ".comfyui"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class WorkflowError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, output_dir: str, port: int | None = None, log_path: str | None = None,
                 extra_args: list[str] | None = None, cpu: bool = True, comfy_dir: str | None = None):
        self.comfy_dir = comfy_dir or COMFY_DIR  # another ComfyUI folder (a clean copy, in the install test)
        self.extra_args = list(extra_args or []) + (["--cpu"] if cpu else [])
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = output_dir
        self.log_path = log_path or os.path.join(output_dir, "comfyui.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "ComfyServer":
        os.makedirs(self.output_dir, exist_ok=True)
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--output-directory", self.output_dir, "--disable-auto-launch", *self.extra_args]
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise WorkflowError(f"ComfyUI exited with {self.proc.returncode}; see {self.log_path}:\n"
                                    + self.log_tail())
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise WorkflowError(f"ComfyUI did not answer within {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
                return json.loads(body) if body.strip() else None  # /interrupt answers with no body
        except urllib.error.HTTPError as e:
            raise WorkflowError(f"POST {path} failed ({e.code}): {e.read().decode(errors='replace')}") from e

    def object_info(self) -> dict:
        return self.get("/object_info")

    def run(self, api_prompt: dict, timeout: float = 900) -> dict:
        """Queues an API-format prompt; returns its /history entry once done, raising on an execution error."""
        prompt_id = self.post("/prompt", {"prompt": api_prompt, "client_id": "llm-diffusion-tests"})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise WorkflowError(msgs[0][1].get("exception_message", str(msgs)) if msgs else str(status))
                if status.get("completed"):
                    return entry
            if self.proc.poll() is not None:
                raise WorkflowError("ComfyUI died while running the workflow:\n" + self.log_tail())
            time.sleep(0.3)
        raise WorkflowError(f"workflow did not finish within {timeout}s")

    def output_images(self, entry: dict) -> list[str]:
        paths = []
        for out in entry.get("outputs", {}).values():
            for img in out.get("images", []):
                if img.get("type") == "output":
                    paths.append(os.path.join(self.output_dir, img.get("subfolder", ""), img["filename"]))
        return paths


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """UI-format workflow (what users drag into ComfyUI) -> API format (what /prompt takes).

    Widget values are matched, in order, to the node's widget inputs as /object_info lists them; a widget with
    control_after_generate (seed) carries one extra value in the UI file.
    """
    if "nodes" not in workflow:
        return workflow  # already API format
    links = {link[0]: link for link in workflow.get("links", [])}
    api = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        if node["type"] not in object_info:
            raise WorkflowError(f"node type '{node['type']}' is not installed in this ComfyUI")
        info = object_info[node["type"]]
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order", {})
        names = order.get("required", []) + order.get("optional", []) if order else list(spec)
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name in names:
            kind, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            is_widget = isinstance(kind, list) or kind in WIDGET_TYPES
            if is_widget and values:
                value = values.pop(0)
                if opts.get("control_after_generate"):
                    values.pop(0)
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


# What the LLM Diff Adapter adds to a graph: each node, and the input its consumers get instead when it is taken out.
ADAPTER_NODES = {"ApplyLLMDiffAdapter": "model", "LLMConditioningAttach": "conditioning"}
LLM_NODES = {"LLMLoader", "LLMAdapterLoader", "LLMPromptEncode"}


def without_llm_adapter(api_prompt: dict) -> dict:
    """The same API-format graph with the base model alone: Apply LLM Diff Adapter and LLM Conditioning Attach taken
    out (their consumers wired to the model and the conditioning they were given), and the LLM nodes that fed only
    them."""
    prompt = json.loads(json.dumps(api_prompt))
    is_link = lambda v: isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt  # noqa: E731

    def source(link):
        while prompt[link[0]]["class_type"] in ADAPTER_NODES:
            node = prompt[link[0]]
            link = node["inputs"][ADAPTER_NODES[node["class_type"]]]
        return link
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if is_link(value):
                node["inputs"][name] = source(value)
    prompt = {i: n for i, n in prompt.items() if n["class_type"] not in ADAPTER_NODES}
    while True:
        used = {str(v[0]) for n in prompt.values() for v in n["inputs"].values() if is_link(v)}
        unused = [i for i, n in prompt.items() if n["class_type"] in LLM_NODES and i not in used]
        if not unused:
            return prompt
        for i in unused:
            del prompt[i]


def extra_model_paths(files: dict[str, list[str]], base: str) -> str:
    """Symlinks each file into base/<folder>/ (folder: a ComfyUI model folder name such as `lidit`) and writes the
    extra_model_paths.yaml that lists those folders, for --extra-model-paths-config: the server lists trained files
    under their own names, and nothing is copied into the ComfyUI folder. Returns the config's path."""
    for folder, paths in files.items():
        os.makedirs(os.path.join(base, folder), exist_ok=True)
        for path in paths:
            link = os.path.join(base, folder, os.path.basename(path))
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(path), link)
    config = os.path.join(base, "extra_model_paths.yaml")
    with open(config, "w") as f:
        f.write("llm_diffusion_files:\n    base_path: " + base + "\n"
                + "".join(f"    {folder}: {folder}\n" for folder in files))
    return config


def load_workflow(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main() -> int:
    """Main job: start ComfyUI with the pack, run the default workflow, print the PNG path, stop ComfyUI."""
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--workflow", default=os.path.join(ROOT, "workflows", "lidit_shapes_default.json"))
    p.add_argument("--output-dir", default=os.path.join(ROOT, "output"))
    args = p.parse_args()
    with ComfyServer(args.output_dir) as server:
        print(f"ComfyUI with the pack on {server.url} (log: {server.log_path})", flush=True)
        prompt = ui_to_api(load_workflow(args.workflow), server.object_info())
        started = time.time()
        images = server.output_images(server.run(prompt))
        print(f"ran {os.path.basename(args.workflow)} in {time.time() - started:.1f}s")
    for path in images:
        print(path)
    return 0 if images else 1


if __name__ == "__main__":
    sys.exit(main())
