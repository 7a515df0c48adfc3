"""LI-DiT as a ComfyUI MODEL: model base + latent format + flow-matching sampling, so KSampler, every sampler,
scheduler and CFG of ComfyUI work on it as on any other model."""
from __future__ import annotations

import functools

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models_base
from comfy.ldm.modules.attention import optimized_attention_masked
from ..adapters.checkpoint import DTYPES, CheckpointError, load_weights, module_load, read_lidit
from ..adapters.lidit import LIDiT, LIDiTConfig, LIDiTError, forward_bytes, set_attention_kernel

LATENT_FORMATS = {3: comfy.latent_formats.ChromaRadiance, 16: comfy.latent_formats.Flux}


class LIDiTNet(LIDiT):
    """The diffusion_model inside ComfyUI's BaseModel: takes ComfyUI's (x, timesteps, context, ...) call."""

    def __init__(self, dtype=None, device=None, operations=None, **config):
        super().__init__(LIDiTConfig(**config), ops=operations or comfy.ops.disable_weight_init)
        self.dtype = dtype or torch.float32
        self.to(device=device, dtype=self.dtype)
        # ComfyUI's attention backend (xformers, sage, flash, PyTorch, sub-quadratic)
        set_attention_kernel(self, comfy_attention)
        self.interrupt_check = mm.throw_exception_if_processing_interrupted  # one step can take minutes
        self.fits = None  # (shape, device) of the last latent found to fit in memory

    def forward(self, x, timesteps, context=None, attention_mask=None, transformer_options={}, control=None, **kwargs):
        if control is not None:  # ignoring it would sample as if the ControlNet were not there
            raise LIDiTError("LI-DiT models take no ControlNet: remove the Apply ControlNet node from this model's "
                             "conditioning.")
        # Every sampler (KSampler too) comes here; checked once per latent size, not at every step.
        if self.fits != (x.shape, x.device):
            check_sampling_memory(self.config, x.shape, self.dtype, x.device)
            self.fits = (x.shape, x.device)
        contexts, masks = split_streams(context, attention_mask, self.config.context_dims)
        # attn2 replace patches ("lidit", block) take (q, k, v, attn_mask, kernel, extra_options) in the layouts of
        # adapters.lidit.AttentionKernel
        patches = transformer_options.get("patches_replace", {}).get("attn2", {})
        replace = {i: functools.partial(patches[("lidit", i)], extra_options=transformer_options)
                   for i in range(self.config.depth) if ("lidit", i) in patches}
        # BaseModel hands x and the context over in the compute dtype (the weights' or the manual-cast one)
        return super().forward(x, timesteps, [c.to(x.dtype) for c in contexts], masks,
                               cross_attention_replace=replace)


def comfy_attention(q, k, v, attn_mask=None):
    """adapters.lidit.AttentionKernel on ComfyUI's optimized_attention: [B, heads, N, head_dim] in and out, the
    boolean mask made additive as ComfyUI's backends take it."""
    if attn_mask is not None:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~attn_mask, -torch.finfo(q.dtype).max)
    return optimized_attention_masked(q, k, v, q.shape[1], mask=attn_mask, skip_reshape=True, skip_output_reshape=True)


def check_sampling_memory(config: LIDiTConfig, shape, dtype: torch.dtype, device: torch.device) -> None:
    """Refuses a latent whose forward would not fit in free memory, naming the largest size that does; without
    this an 8192 px image grows the process past all RAM."""
    batch, _, height, width = shape
    need = forward_bytes(config, batch, height, width, dtype.itemsize)
    free = mm.get_free_memory(device)
    if need <= free:
        return
    lo, hi = 0, max(height, width)  # largest square side (in pixels of the latent) that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if forward_bytes(config, batch, mid, mid, dtype.itemsize) <= free else (lo, mid - 1)
    raise LIDiTError(
        f"A {width}x{height} latent (batch {batch}) needs about {need / 2 ** 30:.1f} GB to sample with this LI-DiT "
        f"model, but only {free / 2 ** 30:.1f} GB is free on {device}. The largest square size that fits now is "
        f"about {lo}x{lo}: lower width and height (or the batch size), or free memory.")


def split_streams(context: torch.Tensor, mask: torch.Tensor | None, dims: tuple[int, ...]):
    """One conditioning tensor [B, T, sum(dims)] holds the LLM streams side by side (LLM Conditioning Join);
    its mask is [B, T] for one LLM or [B, n_llm, T] for several."""
    if context.shape[-1] != sum(dims):
        raise LIDiTError(
            f"This LI-DiT model expects text encodings of {sum(dims)} features "
            f"({' + '.join(map(str, dims))} from {len(dims)} LLM(s)), but the conditioning has "
            f"{context.shape[-1]}. Encode the prompt with the LLM and adapter named in the model's metadata "
            "(the default workflow shows the wiring).")
    contexts = list(context.split(list(dims), dim=-1))
    if mask is None:
        return contexts, None
    mask = mask.to(context.device)
    if mask.dim() == 2:
        mask = mask.unsqueeze(1).expand(-1, len(dims), -1)
    if mask.shape[-1] != context.shape[1]:  # ComfyUI repeated the tokens to batch cond and uncond together
        mask = mask.repeat(1, 1, -(-context.shape[1] // mask.shape[-1]))[..., :context.shape[1]]
    return contexts, [mask[:, i] for i in range(len(dims))]


class LIDiTBaseModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=LIDiTNet)

    def memory_required(self, input_shape, cond_shapes={}):
        # ComfyUI batches cond and uncond together, or frees models, by this number; its default is for UNets.
        batch, _, height, width = input_shape
        return forward_bytes(self.diffusion_model.config, batch, height, width, self.get_dtype().itemsize)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            out["attention_mask"] = comfy.conds.CONDRegular(mask)
        return out


class LIDiTModelConfig(comfy.supported_models_base.BASE):
    unet_extra_config = {}
    sampling_settings = {"shift": 1.0, "multiplier": 1.0}  # the net takes t in [0, 1]
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def __init__(self, config: LIDiTConfig):
        if config.in_channels not in LATENT_FORMATS:
            raise CheckpointError(f"LI-DiT with {config.in_channels} input channels has no latent format; use 3 "
                                  "(pixel space) or 16 (Flux/SD3 VAE family).")
        self.latent_format = LATENT_FORMATS[config.in_channels]
        super().__init__(config.to_dict())

    def get_model(self, state_dict, prefix="", device=None):
        return LIDiTBaseModel(self, device=device)


def load_lidit_patcher(path: str, dtype_choice: str = "auto") -> tuple[comfy.model_patcher.ModelPatcher, dict]:
    config, info = read_lidit(path)  # checked against the file's tensors before anything is built
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    model_config = LIDiTModelConfig(config)
    if dtype_choice == "auto":
        dtype = mm.unet_dtype(supported_dtypes=model_config.supported_inference_dtypes)
    else:
        dtype = DTYPES[dtype_choice]
    # weights the device cannot compute in (fp16 or bf16 on a CPU) are cast layer by layer by ComfyUI's operations
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                model_config.supported_inference_dtypes))
    model = model_config.get_model({}, device=offload_device)
    module_load(model.diffusion_model, load_weights(path))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "lidit_memory",
                                 refuse_latents_that_cannot_fit)
    return patcher, info


def refuse_latents_that_cannot_fit(executor, model, noise_shape, conds, model_options=None):
    """PREPARE_SAMPLING wrapper: the memory check before the sampler makes its copies of the latent (each the
    latent's size, several GB at 8192 px), with one prompt at a time, the least any sampler needs."""
    check_sampling_memory(model.model.diffusion_model.config, noise_shape, model.model_dtype(), model.load_device)
    return executor(model, noise_shape, conds, model_options=model_options)
