"""Train an LLM Diff Adapter for an existing checkpoint of a ComfyUI model family (SD 1.x, SD 2.x and SDXL UNets,
SD3) on a folder of captioned images; the checkpoint with its CLIP and VAE, and the LLM, stay frozen.

    python -m training.train_comfy_adapter --checkpoint ComfyUI/models/checkpoints/sd_xl_base_1.0.safetensors \\
        --llm ComfyUI/models/LLM/SmolLM2-135M-Instruct.Q4_1.gguf --data my_images/ --resolution 1024 \\
        --out runs/sdxl-smollm2 --name sdxl-smollm2 --steps 2000 --batch-size 4 --resume

--data: images (.png, .jpg, .jpeg, .webp) with a same-name .txt caption each, centre-cropped to --resolution.
The output <out>/<name>.safetensors goes into ComfyUI/models/llm_adapters/ for Apply LLM Diff Adapter.

Everything that touches the model is ComfyUI's own: its checkpoint loader (model, CLIP, VAE), the CLIP Text Encode
and VAE Encode calls, its memory manager and its sampling path (CFGGuider: cond processing, model_conds, patches
and wrappers), with the very patch that Apply LLM Diff Adapter applies, so what is trained is what the node runs.
Only the adapter and its second cross-attentions learn. Each image is one model call (ComfyUI averages, not
batches, several conditionings on one call); --batch-size accumulates them into one optimizer step. Checkpoints
every --save-every steps resume with --resume; the step's draws come from (seed, step), so a resumed run draws
what an uninterrupted one would have.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import time

import torch
import torch.utils.checkpoint

from adapters.checkpoint import DTYPES, save_host_adapter
from adapters.conditioning import hidden_states_to_context
from adapters.diff_adapter import HostAdapter
from dataset.features import caption_features, encoder_settings
from training import adapter_recipe
from training.comfyui import comfyui_folder, import_comfyui
from training.checkpoints import (STREAM_STRIDE, load_optimizer_state, load_training_state, recover_checkpoint,
                                  save_training_state, start_run)
from training.data import FolderData
from training.loop import DivergedError, LossLog, check_gradients, diverged, ema_update, lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

log = logging.getLogger("train_comfy_adapter")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a ComfyUI checkpoint (.safetensors with the diffusion model, its CLIP and its VAE), as Load "
                        "Checkpoint reads it")
    p.add_argument("--llm", required=True, help="the frozen LLM (.gguf or a Hugging Face folder)")
    p.add_argument("--data", required=True, help="a folder of images with same-name .txt captions")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="llm-host-adapter")
    p.add_argument("--comfyui", default=None,
                   help="ComfyUI's folder (default: the one this pack is installed in, else the repository's .comfyui)")
    p.add_argument("--resolution", type=int, default=512, help="image size in pixels (1024 for SDXL)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4, help="images per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-dim", type=int, default=768, help="the adapter's output size")
    p.add_argument("--instruction", default="li-dit", choices=["li-dit", "none"])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="share of images trained on the empty prompt (CLIP and LLM), for classifier-free guidance")
    adapter_recipe.add_flags(p)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--export-weights", default="ema", choices=["ema", "raw"])
    p.add_argument("--weight-dtype", default="auto", choices=["auto", *DTYPES],
                   help="the frozen model's weights (auto: ComfyUI's choice, the dtype that Load Checkpoint gives "
                        "this model on this device: fp16 or bf16 on most GPUs, fp32 on the CPU; the adapter trains in "
                        "fp32 either way, but gradients through an fp16 model have no loss scaling: if a run "
                        "diverges in fp16, use bf16 or fp32)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the frozen model's blocks in the backward pass instead of keeping their "
                        "activations: less memory, more time")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--cache-dir", default=None, help="LLM feature cache (default <out>/cache)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    args = p.parse_args(argv)
    if not args.checkpoint.endswith(".safetensors"):
        p.error(f"'{os.path.basename(args.checkpoint)}' is not a .safetensors file; only safetensors checkpoints are "
                "loaded (pickled .ckpt/.pt files can run arbitrary code). Convert it to safetensors first.")
    if error := adapter_recipe.problem(args):
        p.error(error)
    for flag, path in (("--checkpoint", args.checkpoint), ("--llm", args.llm), ("--data", args.data)):
        if not os.path.exists(path):
            p.error(f"{flag} '{path}' does not exist.")
    return args


def weight_dtype(name: str) -> torch.dtype | None:
    """--weight-dtype; None for auto, where ComfyUI's checkpoint loader picks it (model_management.unet_dtype)."""
    return None if name == "auto" else DTYPES[name]


def prediction_loss(model_sampling, denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The model's own training loss from ComfyUI's denoised output: the MSE of its prediction target (noise for
    eps models, velocity for v-prediction and flow models), which is the x0 error times a per-sigma weight."""
    import comfy.model_sampling as ms
    s = sigma.float().view(-1, *([1] * (x0.ndim - 1)))
    if isinstance(model_sampling, ms.V_PREDICTION):  # x0 error = sigma*sigma_data/sqrt(sigma^2+sigma_data^2) * v error
        sd2 = model_sampling.sigma_data ** 2
        weight = (s ** 2 + sd2) / (s ** 2 * sd2)
    elif isinstance(model_sampling, (ms.EPS, ms.CONST)):  # eps: x0 error = sigma * eps error; flow: sigma * v error
        weight = 1 / s ** 2
    else:
        raise SystemExit(f"Training on a {type(model_sampling).__name__} model is not supported (eps, v-prediction "
                         "and flow models are).")
    return (weight * (denoised.float() - x0.float()) ** 2).mean()


def encode_images(vae, data: FolderData, chunk: int = 8) -> torch.Tensor:
    """VAE Encode of every image, a few at a time (a folder of 1024 px images does not fit in memory at once)."""
    latents = []
    with torch.no_grad():
        for start in range(0, len(data.items), chunk):
            pixels = torch.stack([data.image(i) for i in range(start, min(start + chunk, len(data.items)))])
            latents.append(vae.encode(pixels.permute(0, 2, 3, 1)).float().cpu())  # ComfyUI's IMAGE: [B, H, W, 3]
    return torch.cat(latents)


class AdapterTraining:
    """A ComfyUI sampler that trains instead of sampling: CFGGuider calls it with the model loaded and patched and
    the conditionings processed, and every model call goes through the guider as in sampling."""

    def __init__(self, host, ema, latents: torch.Tensor, args, start_step: int, ckpt: str, opt_state_from=None):
        self.host, self.ema, self.latents, self.args = host, ema, latents, args
        self.step, self.ckpt, self.opt_state_from = start_step, ckpt, opt_state_from

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        import comfy.model_management as mm
        import comfy.utils
        from tqdm import tqdm
        args, inner = self.args, model_wrap.inner_model
        sampling, device = inner.model_sampling, noise.device
        # one per image, then the empty prompt, then one per image with the empty prompt for the model's own encoder
        conds = model_wrap.conds["positive"]
        n = len(self.latents)
        latents = inner.process_latent_in(self.latents.to(device))
        params = [p for p in self.host.parameters() if p.requires_grad]
        self.ema.to(device)
        # made here, after ComfyUI moved the adapter to the load device
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
        if self.opt_state_from:
            load_optimizer_state(self.opt_state_from, opt)
        bar = tqdm(total=args.steps, initial=self.step, desc="train", disable=disable_pbar)
        pbar = comfy.utils.ProgressBar(args.steps)
        t0, seen = time.time(), 0
        with LossLog(os.path.join(args.out, "loss.csv"), self.step) as loss_log, torch.inference_mode(False), \
                torch.enable_grad():
            while self.step < args.steps:
                mm.throw_exception_if_processing_interrupted()
                g = torch.Generator().manual_seed(args.seed * STREAM_STRIDE + self.step)
                idx = torch.randint(len(latents), (args.batch_size,), generator=g).tolist()
                dropped = (torch.rand(args.batch_size, generator=g) < args.caption_dropout).tolist()
                percent = torch.rand(args.batch_size, generator=g).clamp(1e-4, 1 - 1e-4).tolist()
                host_dropped = (torch.rand(args.batch_size, generator=g) < args.host_text_dropout).tolist()
                draws = torch.randn((args.batch_size, *latents.shape[1:]), generator=g).to(device)
                for group in opt.param_groups:
                    group["lr"] = lr_at(self.step, args)
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for b, i in enumerate(idx):
                    model_wrap.conds["positive"] = [conds[n] if dropped[b] else conds[n + 1 + i] if host_dropped[b]
                                                    else conds[i]]
                    sigma = torch.tensor([sampling.percent_to_sigma(percent[b])], device=device)
                    x0 = latents[i:i + 1]
                    xt = sampling.noise_scaling(sigma, draws[b:b + 1], x0)
                    loss = prediction_loss(sampling, model_wrap(xt, sigma, **extra_args), x0, sigma) / args.batch_size
                    loss.backward()
                    total += loss.item()
                model_wrap.conds["positive"] = conds
                try:
                    check_gradients(torch.nn.utils.clip_grad_norm_(params, 1.0))
                except DivergedError as e:
                    raise diverged(self.step + 1, e, "Lower --lr, or keep the model in fp32 (--weight-dtype fp32).") \
                        from None
                opt.step()
                ema_update(self.ema, self.host, args.ema)
                self.step += 1
                seen += args.batch_size
                rate = seen / (time.time() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}", ips=f"{rate:.2f}")
                pbar.update_absolute(self.step, args.steps)
                loss_log.write([self.step, f"{total:.5f}", f"{lr_at(self.step - 1, args):.6g}", f"{rate:.3f}", ""])
                if self.step % args.save_every == 0 or self.step == args.steps:
                    save_training_state(self.ckpt, self.host, self.ema, opt, self.step, args)
        bar.close()
        return latent_image


def checkpoint_blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    """Gradient checkpointing on the model's outermost blocks (those ComfyUI's Train LoRA node picks). Unlike that
    node's, each block recomputes with the transformer_options it ran with: the model rewrites that dict's "block"
    as it goes, and the adapter's attn2 patches are looked up by it, so a recompute after the forward would run
    the last block's branch everywhere."""
    from comfy_extras.nodes_train import find_all_highest_child_module_with_forward
    snapshot = lambda v: dict(v) if isinstance(v, dict) else v  # noqa: E731
    blocks = find_all_highest_child_module_with_forward(net)
    for block in blocks:
        def forward(*args, _forward=block.forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(
                lambda a, k: _forward(*a, **k), tuple(map(snapshot, args)),
                {k: snapshot(v) for k, v in kwargs.items()}, use_reentrant=False)
        block.forward = forward
    log.info("gradient checkpointing on %d blocks", len(blocks))
    return blocks


def main(argv=None):
    args = parse_args(argv)
    start_run(args)
    dan = import_comfyui(comfyui_folder(args.comfyui))
    import comfy.model_management as mm
    import comfy.samplers
    import comfy.sd
    os.makedirs(args.out, exist_ok=True)

    data = FolderData(args.data, args.seed, args.resolution)
    captions = [c for _, c in data.items]
    settings = encoder_settings(args.llm, "all", args.instruction, args.max_tokens)
    feats, num_states = caption_features(args.llm, captions + [""], settings,
                                         args.cache_dir or os.path.join(args.out, "cache"))
    llm_hidden_size = feats[0].shape[-1]

    dtype = weight_dtype(args.weight_dtype)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        args.checkpoint, output_vae=True, output_clip=True, model_options={"dtype": dtype} if dtype else {})
    if model is None or clip is None or vae is None:
        raise SystemExit(f"'{os.path.basename(args.checkpoint)}' lacks its diffusion model, CLIP or VAE; "
                         "--checkpoint takes a full checkpoint as Load Checkpoint reads it.")
    try:
        family, sites = dan.host_family(model.model.diffusion_model)
    except dan.AdapterError as e:
        raise SystemExit(str(e)) from None
    if family == "flux":
        raise SystemExit("Flux adapters cannot be trained in ComfyUI 0.3.75: its Flux blocks update activations in "
                         "place, so no gradient passes through the model. Train for an SD 1.x, SD 2.x, SDXL or SD3 "
                         "checkpoint.")
    log.info("%s checkpoint, %d cross-attention sites; %d images", family, len(sites), len(captions))

    latents = encode_images(vae, data)
    with torch.no_grad():
        clip_conds = [clip.encode_from_tokens_scheduled(clip.tokenize(c)) for c in captions + [""]]
        llm_tokens = [hidden_states_to_context(feat[None].float()) for feat in feats]
        # as AdapterTraining.sample reads them: every caption, the empty prompt, every caption for the LLM alone
        conditionings = []
        for cond, tokens in [*zip(clip_conds, llm_tokens), *((clip_conds[-1], t) for t in llm_tokens[:-1])]:
            conditionings += dan.attach_llm_tokens(cond, tokens, None, False)
    del clip, vae

    torch.manual_seed(args.seed)  # the adapter's initial weights
    host = HostAdapter(llm_hidden_size, num_states, args.context_dim, sites,
                       "decoupled" if family in ("unet", "lidit") else "gated", llm_gate=args.llm_gate,
                       refiner_depth=args.adapter_refiner_depth)
    ema = copy.deepcopy(host).requires_grad_(False)
    info = {"family": family, "llm": settings["llm"]}
    patched = dan.apply_host_adapter(model, host, info, args.name, 1.0)
    patched.model.requires_grad_(False)
    ckpt = os.path.join(args.out, "checkpoint")
    step = recover_checkpoint(ckpt) if args.resume else None
    if step:
        load_training_state(ckpt, host, ema)  # the optimizer's state is loaded where it is made, if steps remain
        log.info("resuming from %s at step %d", ckpt, step)
    training = AdapterTraining(host, ema, latents, args, step or 0, ckpt, ckpt if step else None)
    if training.step < args.steps:
        # the whole model on the device, everything else out, as ComfyUI's own LoRA trainer loads it
        mm.load_models_gpu([patched], memory_required=1e20, force_full_load=True)
        guider = comfy.samplers.CFGGuider(patched)
        guider.inner_set_conds({"positive": conditionings})
        dummy = latents[:1]
        blocks = checkpoint_blocks(patched.model.diffusion_model) if args.gradient_checkpointing else []
        try:
            guider.sample(torch.zeros_like(dummy), dummy, training, torch.tensor([1.0, 0.0]), seed=args.seed)
        finally:
            for block in blocks:
                del block.forward  # the class's own again
    n_params = sum(p.numel() for p in host.parameters())
    export = ema if args.export_weights == "ema" else host
    path = os.path.join(args.out, f"{args.name}.safetensors")
    save_host_adapter(path, export, family, settings["llm"],
                      extra={"encoder": dict(settings),
                             "base": os.path.basename(args.checkpoint), "training": vars(args)})
    print(f"wrote {path} ({n_params / 1e6:.2f}M parameters, {family}, {len(sites)} sites)")


if __name__ == "__main__":
    main()
