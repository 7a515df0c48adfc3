"""ComfyUI glue of the pack: thin V3 nodes over adapters/."""
from __future__ import annotations

import importlib
import logging

from comfy_api.v0_0_2 import ComfyExtension, io

log = logging.getLogger(__name__)

NODE_MODULES = ("llm_nodes", "lidit_nodes", "diff_adapter_nodes")


def _load_nodes() -> list[type[io.ComfyNode]]:
    """A module whose optional dependency is missing is left out with a logged reason, never crashing ComfyUI."""
    from . import model_folders
    model_folders.register()
    found = []
    for name in NODE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ImportError as e:
            log.warning("[llm_diffusion] %s nodes disabled: %s. Install the pack's requirements.txt "
                        "(pip install -r requirements.txt) and restart ComfyUI.", name, e)
            continue
        found.extend(module.NODES)
    return found


class LLMDiffusionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return _load_nodes()


async def comfy_entrypoint() -> LLMDiffusionExtension:
    return LLMDiffusionExtension()
