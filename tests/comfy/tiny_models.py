"""Small random-weight instances of ComfyUI's own diffusion model classes, for the Apply LLM Diff Adapter tests.

`*_state_dict()` files are detected by ComfyUI's own loader (UNETLoader / comfy.sd.load_diffusion_model): an SD 1.5
UNet (its detection needs 320 channels and a 768-wide context, so it is one level deep) and an SD3 MMDiT of depth 2.
The `*_net()` instances are shrunk further and built directly (SDXL's and Flux's detection only matches full-size
models).
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMFY = os.path.join(ROOT, ".comfyui")
for path in (COMFY, os.path.join(COMFY, "custom_nodes")):
    if path not in sys.path:
        sys.path.insert(0, path)

from comfy.cli_args import args as comfy_args  # noqa: E402  (ComfyUI's defaults; argv is not parsed)

if not torch.cuda.is_available():
    comfy_args.cpu = True  # as main.py --cpu; must precede the first import of comfy.model_management

LLM_WIDTH = 576  # SmolLM2-135M, the LLM of the server tests

# The SD 1.5 layout, shrunk: SD15's own keys (320 channels, context 768, no linear in/out, no ADM), one level.
SD15_DETECTABLE = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
                       num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_middle=1,
                       transformer_depth_output=[1, 1], use_linear_in_transformer=False, context_dim=768,
                       num_heads=8, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
                       use_temporal_attention=False, use_temporal_resblock=False)
SD15_SHRUNK = dict(SD15_DETECTABLE, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
                   transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], context_dim=48, num_heads=4)
# The SDXL layout, shrunk: linear in/out, several transformer blocks per level, ADM (pooled text + sizes), heads
# by channel count, a wider context.
SDXL_SHRUNK = dict(SD15_SHRUNK, use_linear_in_transformer=True, transformer_depth=[0, 2], transformer_depth_middle=2,
                   transformer_depth_output=[0, 0, 2, 2], context_dim=80, num_heads=-1, num_head_channels=16,
                   num_classes="sequential", adm_in_channels=2816)  # SDXL's ADM: pooled 1280 + 6 size embeddings
FLUX_SHRUNK = dict(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=128, mlp_ratio=2.0,
                   num_heads=1, depth=2, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                   qkv_bias=True, guidance_embed=False)
MMDIT_POOLED = 32  # SD3's pooled text embedding (2048 in the real model)
MMDIT_DETECTABLE = dict(in_channels=16, out_channels=16, depth=2, patch_size=2, pos_embed_max_size=16,
                        num_patches=256, adm_in_channels=MMDIT_POOLED, pos_embed_scaling_factor=None,
                        context_embedder_config={"target": "torch.nn.Linear",
                                                 "params": {"in_features": LLM_WIDTH, "out_features": 128}})


def randomize(net: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Every weight random: ComfyUI's zero-initialised output layers would otherwise make every model output 0, and
    its uninitialised buffers (MMDiT's pos_embed) hold whatever memory had."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*net.parameters(), *(b for b in net.buffers() if b.is_floating_point())]:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def ops():
    import comfy.ops
    return comfy.ops.disable_weight_init  # what ComfyUI's loaders build with; randomize() sets the weights


def unet_net(config: dict, seed: int = 0):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return randomize(UNetModel(**config, dtype=torch.float32, operations=ops()), seed)


def flux_net(seed: int = 0):
    from comfy.ldm.flux.model import Flux
    return randomize(Flux(**FLUX_SHRUNK, dtype=torch.float32, operations=ops()), seed)


def mmdit_net(seed: int = 0):
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    return randomize(OpenAISignatureMMDITWrapper(**MMDIT_DETECTABLE, dtype=torch.float32, operations=ops()), seed)


def patcher(net, model_config):
    """A ComfyUI MODEL (BaseModel + ModelPatcher) around an instance, as the loaders give it."""
    import comfy.model_management as mm
    import comfy.model_patcher
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    model.diffusion_model = net
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def sd15_model(config: dict = SD15_SHRUNK, seed: int = 0):
    import comfy.supported_models
    return patcher(unet_net(config, seed), comfy.supported_models.SD15(dict(config)))


def sdxl_model(seed: int = 0):
    import comfy.supported_models
    return patcher(unet_net(SDXL_SHRUNK, seed), comfy.supported_models.SDXL(dict(SDXL_SHRUNK)))


def flux_model(seed: int = 0):
    import comfy.supported_models
    return patcher(flux_net(seed), comfy.supported_models.FluxSchnell(dict(FLUX_SHRUNK, image_model="flux")))


def mmdit_model(seed: int = 0):
    import comfy.supported_models
    return patcher(mmdit_net(seed), comfy.supported_models.SD3(dict(MMDIT_DETECTABLE)))


def save_detectable(folder: str) -> dict[str, str]:
    """tiny-sd15.safetensors and tiny-sd3.safetensors for UNETLoader; returns family -> file name."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    files = {"unet": ("tiny-sd15.safetensors", unet_net(SD15_DETECTABLE)),
             "mmdit": ("tiny-sd3.safetensors", mmdit_net())}
    for name, net in files.values():
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(folder, name))
    return {family: name for family, (name, _) in files.items()}


def initialize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """PyTorch's default initialisation for every layer (comfy.ops layers skip it), so that a deep random network
    (CLIP, the VAE) keeps finite activations; other parameters small and random."""
    torch.manual_seed(seed)
    randomize(net, seed, std=0.02)
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm)
    for m in net.modules():
        for cls in layers:
            if isinstance(m, cls):
                cls.reset_parameters(m)
    return net


def save_sd15_checkpoint(path: str, seed: int = 0) -> None:
    """A full SD 1.5 checkpoint that Load Checkpoint detects: the one-level UNet above, a random CLIP-L (ComfyUI's
    SD 1.x text encoder, full size: its loader fixes the config) and a random SD VAE; fp16, about 0.45 GB."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.sd1_clip import SDClipModel
    from safetensors.torch import save_file

    from benchmarks.adapter_memory import SD_VAE  # ComfyUI's SD 1.x VAE config (its loader fixes it)
    parts = {"model.diffusion_model.": unet_net(SD15_DETECTABLE, seed),
             "cond_stage_model.": initialize(SDClipModel(dtype=torch.float32), seed),
             "first_stage_model.": initialize(AutoencoderKL(ddconfig=SD_VAE, embed_dim=4), seed)}
    save_file({prefix + k: v.to(torch.float16).contiguous() for prefix, net in parts.items()
               for k, v in net.state_dict().items()}, path)


@torch.no_grad()
def open_gates(host) -> None:
    """A HostAdapter's gates as training leaves them: the LLM branches open and, where the host branch has a gate of
    its own (UNet, LI-DiT), that gate away from 1 (exp(0.1) = 1.105 of the host's own output)."""
    for name, p in host.named_parameters():
        if name.endswith("gate_a") and "host_gate" not in name:
            p.fill_(0.5)
        if name.endswith("host_gate_b"):
            p.fill_(0.1)
