"""ComfyUI imported into this process from its folder, and the pack as ComfyUI imports it: for the tools that run
ComfyUI's own model code outside its server (train_comfy_adapter, the ComfyUI benchmarks).

ComfyUI is a checkout at a folder the user chooses, not an installed package, so its folder goes on sys.path here,
the one place outside tests that puts anything there. Inside ComfyUI the pack is a package named after its folder
(its nodes import the core relatively); here it is registered as PACKAGE with its `adapters` subpackage made the
very modules this process imports from the repository root, so each class exists once."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys

import torch

import adapters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "llm_diffusion"


def comfyui_folder(arg: str | None) -> str:
    """--comfyui, else the ComfyUI this pack sits in (ComfyUI/custom_nodes/<pack>), else the repository's .comfyui."""
    installed = [os.path.dirname(os.path.dirname(path)) for path in (ROOT, os.path.realpath(ROOT))]
    for folder in ([arg] if arg else [*installed, os.path.join(ROOT, ".comfyui")]):
        if os.path.isfile(os.path.join(folder, "comfy", "model_management.py")):
            return os.path.abspath(folder)
    raise SystemExit(f"No ComfyUI found ({arg or 'looked above the pack and in ' + os.path.join(ROOT, '.comfyui')}); "
                     "give its folder with --comfyui.")


def import_comfyui(folder: str, cpu: bool | None = None):
    """ComfyUI's modules and the pack (as PACKAGE); on the CPU when `cpu`, or when None and there is no GPU.
    Returns the pack's diff_adapter_nodes module."""
    if folder in sys.path:  # first, before the repository root: ComfyUI's nodes.py and the pack's nodes/ share a name
        sys.path.remove(folder)
    sys.path.insert(0, folder)
    from comfy.cli_args import args as comfy_args  # ComfyUI's defaults; argv is not parsed
    if (not torch.cuda.is_available()) if cpu is None else cpu:
        comfy_args.cpu = True  # as main.py --cpu; before comfy.model_management is imported
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
        share_adapters(sys.modules[PACKAGE])
        spec.loader.exec_module(sys.modules[PACKAGE])
    return importlib.import_module(f"{PACKAGE}.nodes.diff_adapter_nodes")


def share_adapters(package) -> None:
    """Makes this process's `adapters` modules the package's own adapters subpackage, before its nodes import it."""
    # one copy of each class: an isinstance check or `except CheckpointError` here must match what the nodes use
    for module in pkgutil.iter_modules(adapters.__path__):
        importlib.import_module(f"adapters.{module.name}")
    for name in [n for n in sys.modules if n == "adapters" or n.startswith("adapters.")]:
        sys.modules[f"{package.__name__}.{name}"] = sys.modules[name]
    package.adapters = adapters
