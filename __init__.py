"""LLM Diffusion: decoder-only LLMs as prompt encoders for diffusion models (LLM Diff Adapter, LI-DiT)."""
from .nodes import comfy_entrypoint  # noqa: F401

# Node help pages, web/docs/<node id>.md: ComfyUI's frontend looks for them in /extensions/<folder>/docs/.
WEB_DIRECTORY = "./web"
