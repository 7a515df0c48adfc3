"""Test-only nodes, loaded by the test server alone (tests/comfy/conftest.py, through extra_model_paths).

SD3 models need a pooled text embedding beside the token conditioning, which only SD3's CLIP text encoders give;
no CLIP weights exist here, so this node adds a fixed random one to an LLM Prompt Encode output. Everything else
in the SD3 graph is ComfyUI's and the pack's own.
"""
import torch


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


NODE_CLASS_MAPPINGS = {"TestSetPooledOutput": TestSetPooledOutput}
