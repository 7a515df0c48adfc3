"""LI-DiT ("Exploring the Role of LLMs in Prompt Encoding for Diffusion Models", arXiv 2406.11831).

LLM tokens -> linguistic token refiner (one per LLM; bidirectional attention removes the causal positional
bias) -> collaborative refiner (each LLM's branch cross-attends to the others, then the branches are
concatenated) -> LI-DiT blocks (self-attention -> cross-attention to the refined tokens -> FFN, adaLN from
timestep + pooled text, QK RMSNorm) on patch tokens whose position comes from a conv ResBlock after patchify,
so any resolution works. Trained as a flow-matching velocity field: x_t = (1 - t) x_0 + t eps, v = eps - x_0.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class LIDiTError(ValueError):
    """Bad input for an LI-DiT model (conditioning, latent, size, sampler settings); the message names the problem
    and the fix."""


# (q, k, v, attn_mask) -> out, all [B, heads, N|T, head_dim], attn_mask boolean (True = attend) and broadcastable to
# [B, heads, N, T]: PyTorch's SDPA here; ComfyUI hands in its own backend (nodes/lidit_model.py).
AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

# Self-attention over more query x key pairs than this is computed in query chunks (exact: each query's softmax is
# its own), with the caller's interrupt check between chunks: at 2048 px one attention call alone takes minutes.
SCORES_PER_CHUNK = 2 ** 22


@dataclass
class LIDiTConfig:
    in_channels: int = 3
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    context_dims: tuple[int, ...] = (4096,)  # one feature size per LLM stream
    refiner_depth: int = 2
    refiner_causal: bool = False             # ablation: keep the LLM's causal mask inside the refiner
    fusion: str = "collaborative"            # "collaborative" | "concat" (several LLMs)
    pos_kernel_size: int = 3
    pos_embed: str = "conv"                  # "conv" (LI-DiT) | "conv+sincos" (adds normalised 2D sin-cos)

    def __post_init__(self):
        self.context_dims = tuple(int(d) for d in self.context_dims)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.pos_embed not in ("conv", "conv+sincos"):
            raise ValueError(f"pos_embed must be 'conv' or 'conv+sincos', not '{self.pos_embed}'")
        if self.fusion not in ("collaborative", "concat"):
            raise ValueError(f"fusion must be 'collaborative' or 'concat', not '{self.fusion}'")

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's model sizes (latent space, 16 channels); train_lidit.py --preset takes their widths and depths.
PRESETS = {
    "LI-DiT-1B": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2, in_channels=16),
    "LI-DiT-10B": dict(hidden_size=2816, depth=48, num_heads=44, patch_size=2, in_channels=16),
}


def pooled_mlp(dim: int, ops=nn) -> nn.Sequential:
    """Mean-pooled text tokens -> a [B, dim] conditioning vector added to the timestep embedding."""
    return nn.Sequential(ops.Linear(dim, dim), nn.SiLU(), ops.Linear(dim, dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # x: [B, T, D], mask: [B, T] -> [B, D]
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> [B, hidden] (sinusoidal frequencies over t * 1000, then an MLP, as in DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, ops=nn):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(ops.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 ops.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        # dtype: the compute dtype (the input's; under a manual cast it differs from the weights')
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(dtype or self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head attention with QK RMSNorm; self-attention when no context is given. `kernel` computes the
    attention itself (AttentionKernel)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, ops=nn):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = ops.Linear(dim, dim)
        self.kv = ops.Linear(context_dim or dim, 2 * dim)
        self.q_norm = ops.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = ops.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = ops.Linear(dim, dim)
        self.kernel: AttentionKernel = F.scaled_dot_product_attention

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                causal: bool = False, between_chunks: Callable[[], None] | None = None,
                replace: Callable | None = None) -> torch.Tensor:
        # x: [B, N, dim], context: [B, T, context_dim], key_mask: [B, T] (1 = attend)
        # replace(q, k, v, attn_mask, kernel) -> out: an attention patch (LLM Diff Adapter), layouts as the kernel's
        B, N, _ = x.shape
        context = x if context is None else context
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        attn_mask = None
        if key_mask is not None:
            attn_mask = key_mask.bool()[:, None, None, :]                         # [B, 1, 1, T]
        if causal:
            tri = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            attn_mask = tri if attn_mask is None else attn_mask & tri
        if replace is not None:
            out = replace(q, k, v, attn_mask, self.kernel)
        else:
            out = chunked_attention(q, k, v, attn_mask, between_chunks, self.kernel)  # [B, H, N, head_dim]
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


def chunked_attention(q, k, v, attn_mask, between_chunks: Callable[[], None] | None,
                      kernel: AttentionKernel = F.scaled_dot_product_attention) -> torch.Tensor:
    N, T = q.shape[2], k.shape[2]
    if between_chunks is None or N * T <= SCORES_PER_CHUNK:
        return kernel(q, k, v, attn_mask)
    rows, parts = max(1, SCORES_PER_CHUNK // T), []
    for i in range(0, N, rows):
        between_chunks()
        mask = attn_mask if attn_mask is None or attn_mask.shape[-2] == 1 else attn_mask[..., i:i + rows, :]
        parts.append(kernel(q[:, :, i:i + rows], k, v, mask))
    return torch.cat(parts, dim=2)


def scores_attention(q, k, v, attn_mask=None) -> torch.Tensor:
    """AttentionKernel with the scores formed explicitly, softmax in fp32. For training at small token counts (32 px:
    64 patch tokens): under CPU bf16 autocast PyTorch's flash kernel has a slow backward, and this form lets
    torch.compile fuse the softmax into its neighbours (benchmarks/bench_lidit.py times both). A query whose
    keys are all masked attends uniformly instead of giving NaN."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5            # [B, H, N, T]
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    return scores.softmax(-1).to(v.dtype) @ v


def set_attention_kernel(model: nn.Module, kernel: AttentionKernel) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernel = kernel


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mlp_ratio: float, ops=nn):
        hidden = int(dim * mlp_ratio)
        super().__init__(ops.Linear(dim, hidden), nn.GELU(approximate="tanh"), ops.Linear(hidden, dim))


class RefinerBlock(nn.Module):
    """Bidirectional self-attention + FFN whose residuals are scaled by gates that start at zero."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ops=nn):
        super().__init__()
        self.norm1 = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, ops=ops)
        self.norm2 = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, mlp_ratio, ops)
        self.adaLN_gates = nn.Sequential(nn.SiLU(), ops.Linear(dim, 2 * dim))
        nn.init.zeros_(self.adaLN_gates[1].weight)
        nn.init.zeros_(self.adaLN_gates[1].bias)

    def forward(self, x, c, mask, causal: bool = False):
        # x: [B, T, dim], c: [B, dim] (pooled tokens + timestep), mask: [B, T]
        gate_msa, gate_mlp = self.adaLN_gates(c).chunk(2, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(self.norm1(x), key_mask=mask, causal=causal)
        return x + gate_mlp.unsqueeze(1) * self.mlp(self.norm2(x))


class TokenRefiner(nn.Module):
    """Linguistic token refiner for one LLM: projection to the model width, then `depth` RefinerBlocks."""

    def __init__(self, context_dim: int, dim: int, num_heads: int, depth: int, mlp_ratio: float, causal: bool,
                 ops=nn):
        super().__init__()
        self.causal = causal
        self.in_proj = ops.Linear(context_dim, dim)
        self.pooled_proj = pooled_mlp(dim, ops)
        self.blocks = nn.ModuleList([RefinerBlock(dim, num_heads, mlp_ratio, ops) for _ in range(depth)])

    def forward(self, tokens, mask, t_emb=None):
        # tokens: [B, T, context_dim] -> [B, T, dim]; t_emb: [B, dim], or None where no timestep reaches the refiner
        # (the LLM Diff Adapter of an existing model)
        x = self.in_proj(tokens)
        c = self.pooled_proj(masked_mean(x, mask))
        if t_emb is not None:
            c = t_emb + c
        for block in self.blocks:
            x = block(x, c, mask, causal=self.causal)
        return x


class CollaborativeRefiner(nn.Module):
    """One TokenRefiner per LLM; with several LLMs each branch cross-attends to all other branches
    (zero-initialised gate) before the branches are concatenated along the token axis."""

    def __init__(self, config: LIDiTConfig, ops=nn):
        super().__init__()
        dim, heads = config.hidden_size, config.num_heads
        self.branches = nn.ModuleList([
            TokenRefiner(d, dim, heads, config.refiner_depth, config.mlp_ratio, config.refiner_causal, ops)
            for d in config.context_dims])
        self.collaborate = len(config.context_dims) > 1 and config.fusion == "collaborative"
        if self.collaborate:
            self.cross_norm = nn.ModuleList([ops.LayerNorm(dim, eps=1e-6) for _ in config.context_dims])
            self.cross_attn = nn.ModuleList([Attention(dim, heads, ops=ops) for _ in config.context_dims])
            self.cross_gate = nn.Parameter(torch.zeros(len(config.context_dims), dim))

    def forward(self, contexts: list[torch.Tensor], masks: list[torch.Tensor], t_emb: torch.Tensor):
        refined = [branch(c, m, t_emb) for branch, c, m in zip(self.branches, contexts, masks)]
        if self.collaborate:
            fused = []
            for i, x in enumerate(refined):
                others = torch.cat([r for j, r in enumerate(refined) if j != i], dim=1)
                others_mask = torch.cat([m for j, m in enumerate(masks) if j != i], dim=1)
                attn = self.cross_attn[i](self.cross_norm[i](x), context=others, key_mask=others_mask)
                fused.append(x + self.cross_gate[i] * attn)
            refined = fused
        return torch.cat(refined, dim=1), torch.cat(masks, dim=1)  # [B, sum T_i, dim], [B, sum T_i]


class PositionResBlock(nn.Module):
    """Conv ResBlock on the patch grid: zero padding tells each token where the borders are, so the model needs
    no fixed-size position table and runs at any resolution."""

    def __init__(self, dim: int, kernel_size: int, ops=nn):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = ops.Conv2d(dim, dim, kernel_size, padding=pad)
        self.conv2 = ops.Conv2d(dim, dim, kernel_size, padding=pad)
        self.norm = ops.GroupNorm(1, dim)

    def forward(self, x):  # [B, dim, h, w]
        return x + self.conv2(F.silu(self.conv1(self.norm(x))))


def sincos_2d(dim: int, gh: int, gw: int, device) -> torch.Tensor:
    """[gh * gw, dim] sin-cos embedding of each patch's centre in normalised image coordinates (0..1), so a
    position means the same place at every resolution."""
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) / gh * 16
    xs = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) / gw * 16
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    y, x = y.reshape(-1, 1) * freqs, x.reshape(-1, 1) * freqs               # [N, quarter]
    emb = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)           # [N, 4 * quarter]
    return F.pad(emb, (0, dim - emb.shape[1]))


class LIDiTBlock(nn.Module):
    """self-attention -> cross-attention to LLM tokens -> FFN, each modulated by adaLN-Zero."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ops=nn):
        super().__init__()
        self.norm1 = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(dim, num_heads, ops=ops)
        self.norm2 = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(dim, num_heads, context_dim=dim, ops=ops)
        self.norm3 = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, mlp_ratio, ops)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(dim, 9 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x, c, context, context_mask, between_chunks: Callable[[], None] | None = None,
                cross_attention_replace: Callable | None = None):
        # x: [B, N, dim], c: [B, dim], context: [B, T, dim], context_mask: [B, T]
        (sh1, sc1, g1, sh2, sc2, g2, sh3, sc3, g3) = self.adaLN_modulation(c).chunk(9, dim=-1)
        x = x + g1.unsqueeze(1) * self.self_attn(modulate(self.norm1(x), sh1, sc1), between_chunks=between_chunks)
        x = x + g2.unsqueeze(1) * self.cross_attn(modulate(self.norm2(x), sh2, sc2), context, context_mask,
                                                  replace=cross_attention_replace)
        return x + g3.unsqueeze(1) * self.mlp(modulate(self.norm3(x), sh3, sc3))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int, ops=nn):
        super().__init__()
        self.norm = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = ops.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(dim, 2 * dim))
        for layer in (self.linear, self.adaLN_modulation[1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class LIDiT(nn.Module):
    """ops: the namespace the layers come from (Linear, Conv2d, LayerNorm, GroupNorm, RMSNorm): torch.nn here,
    ComfyUI's `operations` inside ComfyUI (manual cast, fp8, low-VRAM partial loading)."""

    def __init__(self, config: LIDiTConfig, ops=nn):
        super().__init__()
        self.config = config
        # Called between blocks and attention chunks; may raise to stop a long forward (ComfyUI's interrupt).
        self.interrupt_check: Callable[[], None] | None = None
        dim, p = config.hidden_size, config.patch_size
        self.x_embedder = ops.Conv2d(config.in_channels, dim, kernel_size=p, stride=p)
        self.pos_block = PositionResBlock(dim, config.pos_kernel_size, ops)
        self.t_embedder = TimestepEmbedder(dim, ops=ops)
        self.refiner = CollaborativeRefiner(config, ops)
        self.pooled_text_proj = pooled_mlp(dim, ops)
        self.blocks = nn.ModuleList([LIDiTBlock(dim, config.num_heads, config.mlp_ratio, ops)
                                     for _ in range(config.depth)])
        self.final_layer = FinalLayer(dim, p, config.in_channels, ops)

    def check_contexts(self, contexts: list[torch.Tensor]) -> None:
        dims = tuple(c.shape[-1] for c in contexts)
        if dims != self.config.context_dims:
            raise LIDiTError(
                f"LI-DiT expects text encodings with feature sizes {self.config.context_dims} (one per LLM), got "
                f"{dims}. Encode with the LLM(s) and adapter this model was trained with (see its metadata).")

    def forward(self, x: torch.Tensor, t: torch.Tensor, contexts: list[torch.Tensor],
                masks: list[torch.Tensor] | None = None,
                cross_attention_replace: dict[int, Callable] | None = None) -> torch.Tensor:
        # x: [B, C, H, W], t: [B] in [0, 1], contexts[i]: [B, T_i, context_dims[i]], masks[i]: [B, T_i]
        # cross_attention_replace: block index -> Attention `replace` for that block's cross-attention
        self.check_contexts(contexts)
        if masks is None:
            masks = [torch.ones(c.shape[:2], device=c.device, dtype=torch.long) for c in contexts]
        B, C, H, W = x.shape
        p = self.config.patch_size
        x = F.pad(x, (0, (-W) % p, 0, (-H) % p))
        h = self.pos_block(self.x_embedder(x))                                 # [B, dim, h, w]
        gh, gw = h.shape[-2:]
        h = h.flatten(2).transpose(1, 2)                                        # [B, N, dim]
        if self.config.pos_embed == "conv+sincos":
            # At small token grids zero-padding cues reach the centre only through several convs; explicit
            # normalised coordinates let a small model learn "left" or "top" in a few hundred steps.
            h = h + sincos_2d(h.shape[-1], gh, gw, h.device).to(h.dtype)

        t_emb = self.t_embedder(t, h.dtype)
        context, context_mask = self.refiner(contexts, masks, t_emb)           # [B, T, dim]
        c = t_emb + self.pooled_text_proj(masked_mean(context, context_mask))
        replace = cross_attention_replace or {}
        for i, block in enumerate(self.blocks):
            if self.interrupt_check:
                self.interrupt_check()
            h = block(h, c, context, context_mask, self.interrupt_check, replace.get(i))
        h = self.final_layer(h, c)                                              # [B, N, p*p*C]
        h = h.view(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, gh * p, gw * p)
        return h[:, :, :H, :W]


def forward_bytes(config: LIDiTConfig, batch: int, height: int, width: int, element_size: int = 4) -> int:
    """Peak activation memory of one forward at this size (a slight overestimate): the widest
    tensors of a block live at once (residual, modulated input, q/k/v, attention and FFN outputs), plus the
    attention scores of one chunk and a few copies of the input."""
    p = config.patch_size
    tokens = math.ceil(height / p) * math.ceil(width / p)
    per_token = (10 + 2 * config.mlp_ratio) * config.hidden_size
    scores = config.num_heads * min(tokens * tokens, SCORES_PER_CHUNK)
    pixels = 6 * config.in_channels * height * width
    return int(batch * (tokens * per_token + scores + pixels) * element_size)


def sample_t(batch: int, device, generator=None) -> torch.Tensor:
    """Half logit-normal (SD3: mid-range noise levels decide the layout), half uniform: a small model rarely sees
    t near 0 under logit-normal alone and then leaves the last bit of noise in its images."""
    logit_normal = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    uniform = torch.rand(batch, generator=generator, device=device)
    pick = torch.rand(batch, generator=generator, device=device) < 0.5
    return torch.where(pick, logit_normal, uniform)


def flow_matching_loss(model: LIDiT, x0: torch.Tensor, contexts, masks, generator=None, noise=None,
                       t=None, per_sample: bool = False) -> torch.Tensor:
    """Rectified-flow velocity loss: x_t = (1 - t) x_0 + t eps, target v = eps - x_0. noise and t are drawn unless
    given (given: a batch split over processes can be compared with the whole batch in one). per_sample: each
    sample's loss [B] instead of the mean."""
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if t is None:
        t = sample_t(x0.shape[0], x0.device, generator)
    tb = t.view(-1, 1, 1, 1).to(x0.dtype)
    x_t = (1 - tb) * x0 + tb * noise
    v = model(x_t, t, contexts, masks)
    if per_sample:
        return F.mse_loss(v.float(), (noise - x0).float(), reduction="none").mean((1, 2, 3))
    return F.mse_loss(v.float(), (noise - x0).float())


@torch.no_grad()
def sample_euler(model: LIDiT, noise: torch.Tensor, contexts, masks, steps: int = 20, cfg: float = 1.0,
                 uncond_contexts=None, uncond_masks=None) -> torch.Tensor:
    """Plain Euler integration from t=1 (noise) to t=0; for training previews and evaluation outside ComfyUI."""
    x = noise
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        v = model(x, t, contexts, masks)
        if cfg != 1.0:
            v_u = model(x, t, uncond_contexts, uncond_masks)
            v = v_u + cfg * (v - v_u)
        x = x + (ts[i + 1] - ts[i]) * v
    return x
