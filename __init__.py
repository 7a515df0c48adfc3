"""LLM Diffusion: decoder-only LLMs as prompt encoders for diffusion models (LLM Diff Adapter, LI-DiT)."""
from .nodes import comfy_entrypoint  # noqa: F401
