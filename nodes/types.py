"""The pack's custom ComfyUI types and its weight-dtype choices, declared once."""
import torch
from comfy_api.v0_0_2 import io

LLM = io.Custom("LLM")
LLM_ADAPTER = io.Custom("LLM_ADAPTER")

# The dtype combos of LLM Loader and LI-DiT Loader ("auto" is resolved by each loader).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
