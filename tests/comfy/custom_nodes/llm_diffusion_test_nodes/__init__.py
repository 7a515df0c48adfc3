"""Test-only nodes, loaded by the test server alone (tests/comfy/conftest.py, through extra_model_paths).

SD3 models need a pooled text embedding beside the token conditioning, which only SD3's CLIP text encoders give;
no CLIP weights exist here, so this node adds a fixed random one to an LLM Prompt Encode output. Everything else
in the SD3 graph is ComfyUI's and the pack's own. TestSaveConditioning writes a conditioning's tensor to the output
folder, so that a test can read what an encode node passed on.
"""
import os

import folder_paths
import torch
from safetensors.torch import save_file


class TestSetPooledOutput:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "width": ("INT", {"default": 32, "min": 1}),
                             "seed": ("INT", {"default": 0, "min": 0})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "set_pooled"
    CATEGORY = "testing"

    def set_pooled(self, conditioning, width, seed):
        pooled = torch.randn(1, width, generator=torch.Generator().manual_seed(seed))
        return ([[c, {**extra, "pooled_output": pooled}] for c, extra in conditioning],)


class TestSaveConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "filename": ("STRING", {"default": "conditioning"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, conditioning, filename):
        path = os.path.join(folder_paths.get_output_directory(), f"{filename}.safetensors")
        save_file({"context": conditioning[0][0].contiguous()}, path)
        return {"ui": {"text": [path]}}


NODE_CLASS_MAPPINGS = {"TestSetPooledOutput": TestSetPooledOutput, "TestSaveConditioning": TestSaveConditioning}
