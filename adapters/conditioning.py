"""From LLM hidden states to the context tokens a diffusion model cross-attends to."""
from __future__ import annotations

from typing import NamedTuple

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


# ComfyUI batches a model_conds entry as one tensor (padding shorter ones with zeros), so LLM hidden states travel
# there packed per token: [B, T, S * D + 2] = the S hidden states of size D side by side, the token mask, and 1 where
# the states are block contributions. The functions below are the only ones that know the layout.
class LLMTokens(NamedTuple):
    states: torch.Tensor         # [B, S, T, D]: what LLMDiffAdapter takes
    mask: torch.Tensor           # [B, T] bool, True = token
    contributions: torch.Tensor  # [B] bool: any token says its states are block contributions
    has_tokens: torch.Tensor     # [B] bool: a row of ComfyUI's padding only says nothing


def pack_llm_tokens(hidden: torch.Tensor, mask: torch.Tensor | None, contributions: bool) -> torch.Tensor:
    """hidden [B, T, S * D], mask [B, T] (1 = token; None: all tokens) -> [B, T, S * D + 2] float32."""
    mask = torch.ones(hidden.shape[:2]) if mask is None else mask
    flag = torch.full(hidden.shape[:2], float(contributions))
    return torch.cat([hidden.float(), mask.to(torch.float32).unsqueeze(-1), flag.unsqueeze(-1)], dim=-1)


def llm_tokens_width(num_states: int, hidden_size: int) -> int:
    return num_states * hidden_size + 2


def llm_token_features(tokens: torch.Tensor) -> int:
    """S * D: the hidden-state features per token of packed tokens."""
    return tokens.shape[-1] - 2


def unpack_llm_tokens(tokens: torch.Tensor, num_states: int, hidden_size: int) -> LLMTokens:
    """[B, T, S * D + 2] -> LLMTokens."""
    B, T, _ = tokens.shape
    states = tokens[..., :-2].view(B, T, num_states, hidden_size).permute(0, 2, 1, 3)
    mask = tokens[..., -2] > 0.5
    return LLMTokens(states, mask, (tokens[..., -1] > 0.5).any(1), mask.any(1))
