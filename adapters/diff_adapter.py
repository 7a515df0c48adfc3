"""LLM Diff Adapter ("Decoder-Only LLMs are Better Controllers for Diffusion Models").

The blocks of a decoder-only LLM act like denoising steps over the text representation, so every block's output
carries information. The adapter weighs all of them with learned per-block weights, normalises and aligns the
result to the diffusion model's context dimension, optionally followed by LI-DiT's bidirectional token refiner. An
existing diffusion model keeps its own text path and gains a
second cross-attention on that encoding, mixed with its own by gates a*exp(b) per branch (or, where the host has no
separable text branch, added by one such gate); a fresh branch adds nothing, by a closed gate (the paper) or an open
one with a zero value projection (`HostAdapter`: the adapter and one such branch per cross-attention site of the
host).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lidit import TokenRefiner

REFINER_HEAD_DIM = 32


def refiner_problem(depth: int, context_dim: int) -> str | None:
    """What is wrong with a token refiner of this depth on this context size, or None."""
    if depth < 0:
        return f"a refiner's depth is a number of blocks (>= 0), not {depth}"
    if depth and context_dim % REFINER_HEAD_DIM:
        return f"a refiner needs a context size divisible by {REFINER_HEAD_DIM}, not {context_dim}"
    return None


class LLMDiffAdapter(nn.Module):
    """refiner_depth > 0 adds LI-DiT's linguistic token refiner (bidirectional self-attention blocks, conditioned on
    the mean of the prompt's tokens) after the projection: a causal LLM's token knows nothing of the words after
    it ("a red circle on the left": "circle" does not know "left"), and a host model's frozen cross-attention cannot
    gather that itself, while a jointly trained LI-DiT learns to through its own refiner."""

    def __init__(self, llm_hidden_size: int, num_hidden_states: int, context_dim: int, feature_noise: float = 0.0,
                 refiner_depth: int = 0):
        super().__init__()
        self.llm_hidden_size = llm_hidden_size
        self.num_hidden_states = num_hidden_states
        self.context_dim = context_dim
        self.refiner_depth = refiner_depth
        # Training only: the std of Gaussian noise on the fused states. Noise on the input of a linear map is ridge
        # regression on it in every direction, also those that no training caption's states span and that unseen
        # words' states fall into, which would otherwise keep their random initial projection.
        self.feature_noise = feature_noise
        self.block_logits = nn.Parameter(torch.zeros(num_hidden_states))  # uniform over blocks at start
        self.norm = nn.LayerNorm(llm_hidden_size)
        self.proj = nn.Linear(llm_hidden_size, context_dim)
        self.refiner = None
        if problem := refiner_problem(refiner_depth, context_dim):
            raise ValueError(problem)
        if refiner_depth:
            self.refiner = TokenRefiner(context_dim, context_dim, context_dim // REFINER_HEAD_DIM, refiner_depth,
                                        mlp_ratio=4.0, causal=False)

    def block_weights(self) -> torch.Tensor:
        return self.block_logits.softmax(dim=0)

    def size_mismatch(self, num_hidden_states: int, llm_hidden_size: int) -> str | None:
        """None when an LLM's states fit this adapter, else a sentence naming both sizes (the caller adds the fix)."""
        if (num_hidden_states, llm_hidden_size) == (self.num_hidden_states, self.llm_hidden_size):
            return None
        return (f"the adapter was trained on {self.num_hidden_states} hidden states of size {self.llm_hidden_size}, "
                f"but the LLM gives {num_hidden_states} of size {llm_hidden_size}")

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # hidden_states: [B, S, T, D], S = embeddings + every block; mask: [B, T] (1 = token), for the refiner
        mismatch = self.size_mismatch(hidden_states.shape[1], hidden_states.shape[-1])
        if mismatch:
            raise ValueError(f"{mismatch[0].upper()}{mismatch[1:]}: it was trained for another LLM, or LLM Prompt "
                             "Encode is not set to layers='all'.")
        # Hidden-state scale grows with depth (and a few channels carry huge activations), so each block is
        # normalised on its own before mixing; otherwise the last blocks drown the rest.
        per_block = F.layer_norm(hidden_states.float(), (self.llm_hidden_size,))
        fused = torch.einsum("s,bstd->btd", self.block_weights(), per_block)  # [B, T, D]
        if self.training and self.feature_noise:
            fused = fused + self.feature_noise * torch.randn_like(fused)
        context = self.proj(self.norm(fused.to(self.proj.weight.dtype)))    # [B, T, context_dim]
        if self.refiner is None:
            return context
        B, T = context.shape[:2]
        mask = torch.ones(B, T, dtype=torch.bool, device=context.device) if mask is None else mask.bool()
        # a prompt without tokens keeps one key, so its softmax is defined; the branches give it zeros (attend)
        mask = mask.clone()
        mask[:, 0] |= ~mask.any(-1)
        return self.refiner(context, mask, None)


# (q, k, v, key_mask) -> out: q [B, N, inner], k and v [B, T, inner], key_mask [B, T] (1 = token) or None; the
# host model's own attention kernel (ComfyUI passes optimized_attention), so the new branch runs on the same backend.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def gate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # a * exp(b): a starts the gate (0 = closed, 1 = open), exp(b) rescales it multiplicatively
    return a * b.exp()


def attend(attention: AttentionFn, q, k, v, key_mask):
    """attention(q, k, v, key_mask), where a prompt without any token gives zeros (an all-masked softmax is NaN)."""
    if key_mask is None:
        return attention(q, k, v, None)
    empty = ~key_mask.bool().any(-1)                                       # [B]
    if k.shape[1] == 0:
        return torch.zeros_like(q)
    if empty.any():
        key_mask = key_mask.clone()
        key_mask[empty, 0] = 1
    return attention(q, k, v, key_mask) * (~empty).to(q.dtype)[:, None, None]


class DecoupledCrossAttention(nn.Module):
    """The paper's second cross-attention beside a host model's own, for hosts that have one (UNet, LI-DiT): the
    host's query attends to the LLM encoding through new key and value projections, and each branch has its gate:

        out = a_h exp(b_h) attn(q, k, v) + a_l exp(b_l) attn(q, W_k llm, W_v llm),   a_h = 1, a_l = 0 at start,

    so a fresh adapter returns the host's output bit for bit. Works on the attention output before the host's
    output projection, which stays the host's. A strength s scales all that the adapter changes, the host gate's
    share included, so that s = 0 is the host model exactly and s = 1 the gates as trained:

        out = host_out + s ((a_h exp(b_h) - 1) host_out + a_l exp(b_l) llm_out)

    llm_gate is a_l at the start. 0 (the paper) closes the gate, and while it is closed the new key and value
    projections get no gradient and the gate none that points anywhere: the branch opens slowly or not at all. > 0
    starts it open with the value projection at zero instead (LoRA's zero-initialised B, ControlNet's zero
    convolutions), so the branch still adds nothing at the start but W_v learns from the first step.
    """

    def __init__(self, inner_dim: int, context_dim: int, llm_gate: float = 0.0):
        super().__init__()
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        if llm_gate:
            nn.init.zeros_(self.to_v.weight)
        self.host_gate_a = nn.Parameter(torch.ones(1))
        self.host_gate_b = nn.Parameter(torch.zeros(1))
        self.llm_gate_a = nn.Parameter(torch.full((1,), float(llm_gate)))
        self.llm_gate_b = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def gates(self) -> dict[str, float]:
        """The trained gates: the base branch's, the LLM branch's, and the LLM branch's times the RMS of its value
        projection (how much it can add, comparable between a closed and a zero-valued start)."""
        llm = gate(self.llm_gate_a, self.llm_gate_b).item()
        return {"host": gate(self.host_gate_a, self.host_gate_b).item(), "llm": llm,
                "llm_x_value_rms": abs(llm) * self.to_v.weight.float().pow(2).mean().sqrt().item()}

    def forward(self, q: torch.Tensor, host_out: torch.Tensor, llm_context: torch.Tensor,
                llm_mask: torch.Tensor | None, attention: AttentionFn, strength: float = 1.0) -> torch.Tensor:
        # q, host_out: [B, N, inner], llm_context: [B, T, context_dim], llm_mask: [B, T]
        llm_context = llm_context.to(self.to_k.weight.dtype)
        llm_out = attend(attention, q.to(llm_context.dtype), self.to_k(llm_context), self.to_v(llm_context), llm_mask)
        host_change = (strength * (gate(self.host_gate_a, self.host_gate_b) - 1)).to(host_out.dtype)
        llm_gain = (strength * gate(self.llm_gate_a, self.llm_gate_b)).to(host_out.dtype)
        return host_out + (host_change * host_out + llm_gain * llm_out.to(host_out.dtype))


class GatedCrossAttention(nn.Module):
    """Second cross-attention for hosts without a separable text branch (Flux-style joint attention): the image
    tokens attend to the LLM encoding with their own query, out = x + s a exp(b) attn(norm(x), llm), a = llm_gate
    at start (> 0: the output projection starts at zero instead, as DecoupledCrossAttention's value projection);
    the strength s scales all that the adapter changes, so s = 0 is x exactly."""

    def __init__(self, hidden_size: int, context_dim: int, num_heads: int, llm_gate: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(hidden_size)
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_k = nn.Linear(context_dim, hidden_size)
        self.to_v = nn.Linear(context_dim, hidden_size)
        self.to_out = nn.Linear(hidden_size, hidden_size)
        if llm_gate:
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.to_out.bias)
        self.gate_a = nn.Parameter(torch.full((1,), float(llm_gate)))
        self.gate_b = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, llm_context: torch.Tensor, mask: torch.Tensor | None = None,
                attention: AttentionFn | None = None, strength: float = 1.0) -> torch.Tensor:
        # x: [B, N, hidden], llm_context: [B, T, context_dim], mask: [B, T] (1 = token)
        attention = attention or sdpa_attention(self.num_heads)
        h = self.norm(x.to(self.to_q.weight.dtype))
        llm_context = llm_context.to(h.dtype)
        out = self.to_out(attend(attention, self.to_q(h), self.to_k(llm_context), self.to_v(llm_context), mask))
        return x + (strength * gate(self.gate_a, self.gate_b) * out).to(x.dtype)


class HostAdapter(nn.Module):
    """What an existing diffusion model gains: the LLM Diff Adapter (every LLM block -> context tokens) and one
    second cross-attention per cross-attention site of the host. sites: (name, width, heads) in the host's
    order; kind "decoupled" shares the host's query (DecoupledCrossAttention), "gated" has its own
    (GatedCrossAttention); llm_gate: the new branches' gate at the start (their docstrings); refiner_depth: the
    adapter's token refiner (LLMDiffAdapter)."""

    def __init__(self, llm_hidden_size: int, num_hidden_states: int, context_dim: int,
                 sites: list[tuple[str, int, int]], kind: str, feature_noise: float = 0.0, llm_gate: float = 0.0,
                 refiner_depth: int = 0):
        super().__init__()
        if kind not in ("decoupled", "gated"):
            raise ValueError(f"kind must be 'decoupled' or 'gated', not '{kind}'")
        self.kind = kind
        self.sites = [(str(n), int(w), int(h)) for n, w, h in sites]
        self.adapter = LLMDiffAdapter(llm_hidden_size, num_hidden_states, context_dim, feature_noise, refiner_depth)
        self.branches = nn.ModuleList([
            DecoupledCrossAttention(w, context_dim, llm_gate) if kind == "decoupled"
            else GatedCrossAttention(w, context_dim, h, llm_gate)
            for _, w, h in self.sites])

    def branch(self, site: str) -> nn.Module:
        return self.branches[[n for n, _, _ in self.sites].index(site)]


def heads_attention(kernel, num_heads: int) -> AttentionFn:
    """An AttentionFn (q, k, v [B, N, inner], key_mask [B, T]) on an LI-DiT attention kernel ([B, heads, N, head_dim],
    boolean mask)."""
    def attention(q, k, v, key_mask=None):
        B, N, inner = q.shape
        q, k, v = (x.view(B, x.shape[1], num_heads, inner // num_heads).transpose(1, 2) for x in (q, k, v))
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
        return kernel(q, k, v, mask).transpose(1, 2).reshape(B, N, inner)
    return attention


def sdpa_attention(num_heads: int) -> AttentionFn:
    return heads_attention(F.scaled_dot_product_attention, num_heads)


def lidit_cross_attention_replace(branch: DecoupledCrossAttention, llm_context: torch.Tensor,
                                  llm_mask: torch.Tensor | None, strength: float = 1.0):
    """The LI-DiT cross-attention replacement of one block (adapters.lidit.Attention's `replace`): q, k, v and the
    result are [B, heads, N, head_dim], after LI-DiT's QK norm; both branches run on LI-DiT's own kernel."""
    def replace(q, k, v, attn_mask, kernel):
        B, H, N, hd = q.shape
        host_out = kernel(q, k, v, attn_mask)
        flat = lambda x: x.transpose(1, 2).reshape(B, x.shape[2], H * hd)  # noqa: E731
        out = branch(flat(q), flat(host_out), llm_context, llm_mask, heads_attention(kernel, H), strength)
        return out.view(B, N, H, hd).transpose(1, 2)
    return replace


def lidit_sites(config) -> list[tuple[str, int, int]]:
    """The cross-attention sites (name, width, heads) of an LI-DiT with this LIDiTConfig: one per block."""
    return [(f"block{i}", config.hidden_size, config.num_heads) for i in range(config.depth)]


class AdaptedLIDiT(nn.Module):
    """A frozen LI-DiT with the branches of a HostAdapter: called as LIDiT is, the last text stream being the fused
    LLM encoding that the branches attend to (the others are the base model's own streams)."""

    def __init__(self, base: nn.Module, branches: nn.ModuleList):
        super().__init__()
        self.base = base
        self.branches = branches
        self.config = base.config

    def forward(self, x, t, contexts, masks=None):
        llm, llm_mask = contexts[-1], None if masks is None else masks[-1]
        replace = {i: lidit_cross_attention_replace(b, llm, llm_mask) for i, b in enumerate(self.branches)}
        return self.base(x, t, contexts[:-1], None if masks is None else masks[:-1], cross_attention_replace=replace)
