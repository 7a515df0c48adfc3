"""LI-DiT Loader, LI-DiT Sampler, LLM Conditioning Join and LI-DiT Word Encode."""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

import comfy.samplers
import folder_paths
import nodes as comfy_nodes
from comfy_api.v0_0_2 import io

from . import model_folders
from ..adapters.checkpoint import DTYPES, load_word_encoder
from ..adapters.lidit import LIDiTError
from .lidit_model import load_lidit_patcher, split_streams


class LIDiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LIDiTLoader",
            display_name="LI-DiT Loader",
            category="llm_diffusion",
            description="Loads an LI-DiT diffusion model (.safetensors with its config in the metadata) as a "
                        "ComfyUI MODEL; KSampler and the other samplers work on it too.",
            inputs=[
                io.Combo.Input("model_name", options=model_folders.lidit_models()),
                io.Combo.Input("weight_dtype", options=["auto", *DTYPES], default="auto"),
            ],
            outputs=[io.Model.Output(tooltip="The LI-DiT model, for LI-DiT Sampler, KSampler or Apply LLM Diff "
                                                     "Adapter.")],
        )

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str) -> io.NodeOutput:
        patcher, _info = load_lidit_patcher(model_folders.lidit_path(model_name), weight_dtype)
        return io.NodeOutput(patcher)


class LIDiTSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LIDiTSampler",
            display_name="LI-DiT Sampler",
            category="llm_diffusion",
            description="Denoises a latent with an LI-DiT model and CONDITIONING from LLM Prompt Encode. Defaults "
                        "suit flow matching (Euler, simple schedule); the LLM is moved off the GPU when the "
                        "diffusion model needs the room.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=3.0, min=0.0, max=30.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent; decode a pixel-space model with VAELoader's "
                                                      "'pixel_space'.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                denoise) -> io.NodeOutput:
        # NaN passes ComfyUI's min/max validation and turns the whole image black without an error.
        for name, value, hint in (("cfg", cfg, "3 suits the default model"), ("denoise", denoise, "1.0 for text to "
                                  "image, less to keep part of the input latent")):
            if not math.isfinite(value):
                raise LIDiTError(f"{name} is {value}; it must be a finite number ({hint}).")
        net = model.model.diffusion_model
        for name, cond in (("positive", positive), ("negative", negative)):
            for context, extra in cond:
                try:
                    split_streams(context, extra.get("attention_mask"), net.config.context_dims)
                except LIDiTError as e:
                    raise LIDiTError(f"{name} conditioning: {e}") from None
        samples = latent_image["samples"]
        if samples.shape[1] != net.config.in_channels:
            raise LIDiTError(f"The latent has {samples.shape[1]} channels but this LI-DiT model works on "
                             f"{net.config.in_channels}. For a pixel-space model use "
                             "EmptyChromaRadianceLatentImage (3 channels) and VAELoader's 'pixel_space'.")
        # ComfyUI's own sampling path: progress bar, previews, interruption and memory management included.
        (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                             latent_image, denoise=denoise)
        return io.NodeOutput(out)


class LLMConditioningJoin(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMConditioningJoin",
            display_name="LLM Conditioning Join",
            category="llm_diffusion",
            description="Joins the encodings of two LLMs for an LI-DiT model that fuses several LLMs (collaborative "
                        "refiner): their features side by side, each with its own token mask.",
            inputs=[io.Conditioning.Input("first"), io.Conditioning.Input("second")],
            outputs=[io.Conditioning.Output(tooltip="Both encodings side by side, each with its own token mask.")],
        )

    @classmethod
    def execute(cls, first, second) -> io.NodeOutput:
        out = []
        for (c1, e1), (c2, e2) in zip(first, second):
            T = max(c1.shape[1], c2.shape[1])
            masks = []
            for c, e in ((c1, e1), (c2, e2)):
                m = e.get("attention_mask", torch.ones(c.shape[:2], dtype=torch.long))
                m = m.unsqueeze(1) if m.dim() == 2 else m
                masks.append(F.pad(m, (0, T - m.shape[-1])))
            joined = torch.cat([F.pad(c1, (0, 0, 0, T - c1.shape[1])), F.pad(c2, (0, 0, 0, T - c2.shape[1]))], -1)
            info = [e1.get("llm_encoding"), e2.get("llm_encoding")]
            out.append([joined, {"attention_mask": torch.cat(masks, 1), "llm_encoding": info}])
        return io.NodeOutput(out)


@functools.lru_cache(maxsize=4)
def _word_encoder(path: str, mtime: float):
    encoder, _ = load_word_encoder(path)
    return encoder.eval().requires_grad_(False)


class LIDiTWordEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LIDiTWordEncode",
            display_name="LI-DiT Word Encode",
            category="llm_diffusion",
            description="The no-LLM baseline's text encoder: word embeddings learned with an LI-DiT model "
                        "(train_lidit.py --text-encoder learned). Words it never saw in training become <unk>.",
            inputs=[
                io.Combo.Input("encoder_name", options=folder_paths.get_filename_list("llm_adapters"),
                               tooltip="The <model>-text-encoder.safetensors file exported beside the model."),
                io.String.Input("text", multiline=True, default=""),
            ],
            outputs=[io.Conditioning.Output(tooltip="Word embeddings for the LI-DiT model trained with them.")],
        )

    @classmethod
    def execute(cls, encoder_name: str, text: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("llm_adapters", encoder_name)
        encoder = _word_encoder(path, os.path.getmtime(path))
        ids, mask = encoder.tokenize([text])
        with torch.no_grad():
            context = encoder(ids)
        extra = {"llm_encoding": {"encoder": encoder_name}}
        if not bool(mask.all()):
            extra["attention_mask"] = mask
        return io.NodeOutput([[context.float(), extra]])


NODES = [LIDiTLoader, LIDiTSampler, LLMConditioningJoin, LIDiTWordEncode]
