"""The pack's custom ComfyUI types, declared once."""
from comfy_api.v0_0_2 import io

LLM = io.Custom("LLM")
LLM_ADAPTER = io.Custom("LLM_ADAPTER")
