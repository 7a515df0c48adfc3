"""Shipped workflows run in the real ComfyUI server on evaluation prompts, their images read back as the
shapes-world checker reads a sample: the graph's prompt and seed set, its models swapped for trained files."""
from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import torch
from PIL import Image

from scripts import comfy_client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_NODES = ("LIDiTWordEncode", "LLMPromptEncode")  # the no-LLM model's word encoder, the LLM's
MODEL_INPUTS = {"LIDiTLoader": "model_name", "LLMAdapterLoader": "adapter_name", "LIDiTWordEncode": "encoder_name"}


def load_api_workflow(server: comfy_client.ComfyServer, name: str) -> dict:
    """workflows/<name> in the API format of this server."""
    return comfy_client.ui_to_api(comfy_client.load_workflow(os.path.join(ROOT, "workflows", name)),
                                  server.object_info())


def with_prompt(api_prompt: dict, text: str, seed: int) -> dict:
    """The graph with `text` as its positive prompt (every prompt node whose text is not empty) and `seed`."""
    prompt = {i: {**n, "inputs": dict(n["inputs"])} for i, n in api_prompt.items()}
    for node in prompt.values():
        if node["class_type"] == "LIDiTSampler":
            node["inputs"]["seed"] = seed
        if node["class_type"] in PROMPT_NODES and node["inputs"]["text"]:
            node["inputs"]["text"] = text
    return prompt


def with_models(api_prompt: dict, files: dict[str, str]) -> dict:
    """The graph with every node of a class in `files` (LIDiTLoader, LLMAdapterLoader, LIDiTWordEncode) loading
    that file name instead; a class the graph lacks is an error, so a swap is never silently skipped."""
    missing = set(files) - {n["class_type"] for n in api_prompt.values()}
    if missing:
        raise ValueError(f"the workflow has no {', '.join(sorted(missing))} node to load a file into")
    prompt = {i: {**n, "inputs": dict(n["inputs"])} for i, n in api_prompt.items()}
    for node in prompt.values():
        if node["class_type"] in files:
            node["inputs"][MODEL_INPUTS[node["class_type"]]] = files[node["class_type"]]
    return prompt


@contextlib.contextmanager
def server_with_files(output: str, files: dict[str, list[str]]):
    """A ComfyUI server that also lists the given files (folder name -> paths: `lidit`, `llm_adapters`) under their
    own names (comfy_client.extra_model_paths)."""
    for path in (p for paths in files.values() for p in paths):
        if not os.path.isfile(path):
            raise SystemExit(f"{path} does not exist: give the path of a trained .safetensors file")
    with tempfile.TemporaryDirectory() as folders:
        config = comfy_client.extra_model_paths(files, folders)
        with comfy_client.ComfyServer(output, extra_args=["--extra-model-paths-config", config]) as server:
            yield server


def sample(server: comfy_client.ComfyServer, api_prompt: dict) -> tuple[Image.Image, torch.Tensor]:
    """Runs the graph; its one image, and the sample as the checker reads it ([3, H, W] in [0, 1])."""
    (latent,) = [n for n in api_prompt.values() if n["class_type"] == "EmptyChromaRadianceLatentImage"]
    (path,) = server.output_images(server.run(api_prompt))
    image = Image.open(path).convert("RGB")
    # the workflows scale the sample up by nearest neighbours: every stride-th pixel is the sample
    stride = image.width // latent["inputs"]["width"]
    pixels = torch.from_numpy(np.asarray(image)[::stride, ::stride].copy()).permute(2, 0, 1).float() / 255
    return image, pixels
