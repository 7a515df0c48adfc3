"""Memory of adapter-only training (training/train_comfy_adapter.py) from parameter counts, for full-size SD 1.5 and
SDXL checkpoints: ComfyUI's own model classes built on the meta device (no weights, no memory), the LLM counted in
its GGUF file, the adapter and its second cross-attentions as the trainer builds them.

    .venv/bin/python -m benchmarks.adapter_memory [--llm .comfyui/models/LLM/SmolLM2-135M-Instruct.Q4_1.gguf]

What it counts, per phase of a run:
- encoding (once, before training): the LLM (fp32, on the CPU), the text encoders (fp16) and the VAE (fp32);
- training (on the device): the frozen UNet in fp16 or bf16 (2 bytes, as ComfyUI loads it on a GPU), and per
  adapter parameter 20 bytes (fp32 weight, gradient, AdamW's two moments, the EMA copy).
Not counted: the activations that the backward pass through the frozen UNet keeps, which grow with --resolution.
"""
from __future__ import annotations

import argparse
import os

import torch

from training.comfyui import comfyui_folder, import_comfyui
from training.adapter_recipe import ADAPTER_REFINER_DEPTH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ComfyUI 0.3.75's own UNet configs of the two families (comfy/model_detection.py, unet_config_from_diffusers_unet)
UNETS = {
    "SD 1.5": dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                   adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                   transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                   use_linear_in_transformer=False, context_dim=768, num_heads=8,
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
                   use_temporal_resblock=False),
    "SDXL": dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
                 use_temporal_resblock=False),
}
# ComfyUI's SD 1.x / SDXL VAE (comfy/sd.py fixes it; only the latent channels come from the file)
SD_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)
ADAPTER_BYTES = 4 * 5  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq, EMA
GiB = 2 ** 30


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def llm_size(path: str) -> tuple[int, int, int]:
    """(parameters, hidden size, hidden states) of a GGUF LLM, from its header."""
    import gguf
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    field = lambda key: int(reader.fields[f"{arch}.{key}"].parts[-1][0])  # noqa: E731
    params = sum(int(t.n_elements) for t in reader.tensors if t.name != "output.weight")  # the LM head never runs
    return params, field("embedding_length"), field("block_count") + 1


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", default=os.path.join(ROOT, ".comfyui", "models", "LLM", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--context-dim", type=int, default=768, help="the trainer's --context-dim")
    args = p.parse_args(argv)
    dan = import_comfyui(comfyui_folder(None))
    import comfy.ops
    import comfy.sd1_clip
    import comfy.sdxl_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from llm_diffusion.adapters.diff_adapter import HostAdapter

    llm_params, hidden, states = llm_size(args.llm)
    print(f"LLM {os.path.basename(args.llm)}: {llm_params / 1e6:.0f} M parameters, {states} hidden states of "
          f"{hidden}; adapter context {args.context_dim}\n")
    print("| model | UNet | text encoders | VAE | adapter (trained) | encoding: LLM fp32 + text encoders fp16 + VAE "
          "fp32 | training: UNet fp16 or bf16 + adapter x 20 B |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with torch.device("meta"):
        vae = count(AutoencoderKL(ddconfig=SD_VAE, embed_dim=4))
        text = {"SD 1.5": count(comfy.sd1_clip.SD1ClipModel()), "SDXL": count(comfy.sdxl_clip.SDXLClipModel())}
        for name, config in UNETS.items():
            net = UNetModel(**config, dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
            _, sites = dan.host_family(net)
            adapter = count(HostAdapter(hidden, states, args.context_dim, sites, "decoupled",
                                        refiner_depth=ADAPTER_REFINER_DEPTH))
            unet = count(net)
            encoding = (4 * llm_params + 2 * text[name] + 4 * vae) / GiB
            training = (2 * unet + ADAPTER_BYTES * adapter) / GiB
            print(f"| {name} ({len(sites)} cross-attention sites) | {unet / 1e6:,.0f} M | {text[name] / 1e6:,.0f} M "
                  f"| {vae / 1e6:.0f} M | {adapter / 1e6:.1f} M | {encoding:.1f} GiB | {training:.1f} GiB "
                  "+ activations |")


if __name__ == "__main__":
    main()
