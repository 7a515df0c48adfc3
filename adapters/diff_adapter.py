"""LLM Diff Adapter ("Decoder-Only LLMs are Better Controllers for Diffusion Models").

The blocks of a decoder-only LLM act like denoising steps over the text representation, so every block's output
carries information. The adapter weighs all of them with learned per-block weights, normalises and aligns the
result to the diffusion model's context dimension. `GatedCrossAttention` is the branch that feeds it into an
existing diffusion model next to its own cross-attention, mixed by a zero-initialised gate a*exp(b).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LLMDiffAdapter(nn.Module):
    def __init__(self, llm_hidden_size: int, num_hidden_states: int, context_dim: int):
        super().__init__()
        self.llm_hidden_size = llm_hidden_size
        self.num_hidden_states = num_hidden_states
        self.context_dim = context_dim
        self.block_logits = nn.Parameter(torch.zeros(num_hidden_states))  # uniform over blocks at start
        self.norm = nn.LayerNorm(llm_hidden_size)
        self.proj = nn.Linear(llm_hidden_size, context_dim)

    def block_weights(self) -> torch.Tensor:
        return self.block_logits.softmax(dim=0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [B, S, T, D], S = embeddings + every block
        if hidden_states.shape[1:2] != (self.num_hidden_states,) or hidden_states.shape[-1] != self.llm_hidden_size:
            raise ValueError(
                f"Adapter expects {self.num_hidden_states} hidden states of size {self.llm_hidden_size}, got "
                f"{hidden_states.shape[1]} of size {hidden_states.shape[-1]}: it was trained for another LLM, or "
                "LLM Prompt Encode is not set to layers='all'.")
        # Hidden-state scale grows with depth (and a few channels carry huge activations), so each block is
        # normalised on its own before mixing; otherwise the last blocks drown the rest.
        per_block = F.layer_norm(hidden_states.float(), (self.llm_hidden_size,))
        fused = torch.einsum("s,bstd->btd", self.block_weights(), per_block)  # [B, T, D]
        return self.proj(self.norm(fused.to(self.proj.weight.dtype)))       # [B, T, context_dim]


class GatedCrossAttention(nn.Module):
    """Second cross-attention on the LLM encoding, added beside a model's own: out = x + a*exp(b) * attn(x, llm).

    a starts at zero, so a freshly added branch leaves the host model's output unchanged.
    """

    def __init__(self, hidden_size: int, context_dim: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.gate_a = nn.Parameter(torch.zeros(1))
        self.gate_b = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, llm_context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, N, hidden], llm_context: [B, T, context_dim], mask: [B, T] (1 = token)
        pad = None if mask is None else mask == 0
        out, _ = self.attn(self.norm(x), llm_context, llm_context, key_padding_mask=pad, need_weights=False)
        return x + self.gate_a * self.gate_b.exp() * out
