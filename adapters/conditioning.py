"""From LLM hidden states to the context tokens a diffusion model cross-attends to."""
from __future__ import annotations

import torch

from .diff_adapter import LLMDiffAdapter


def hidden_states_to_context(hidden_states: torch.Tensor, adapter: LLMDiffAdapter | None = None,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S, T, D] -> [B, T, C]: through the adapter (all blocks fused, C = its context_dim; mask [B, T] for its
    refiner) or, without one, the selected hidden states side by side (C = S * D; one layer, as LI-DiT uses, gives
    C = D)."""
    if adapter is not None:
        return adapter(hidden_states.to(adapter.proj.weight.dtype), None if mask is None else mask.to(
            hidden_states.device))
    B, S, T, D = hidden_states.shape
    return hidden_states.permute(0, 2, 1, 3).reshape(B, T, S * D)
