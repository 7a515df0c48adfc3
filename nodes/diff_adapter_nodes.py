"""Apply LLM Diff Adapter and LLM Conditioning Attach: an existing diffusion model (our LI-DiT, ComfyUI's UNet of
the SD 1.x / SDXL family, Flux, SD3) keeps its own text path and gains a second cross-attention on the fused LLM
blocks.

Everything goes through ComfyUI's patch machinery on a clone of the MODEL, never an edit in place, so the patch
stacks with LoRAs and other patches and leaves with the clone:
- the LLM hidden states ride in the conditioning (`model_conds`), beside the model's own prompt conditioning, so
  ComfyUI batches cond and uncond and slices areas as it does for any conditioning;
- an APPLY_MODEL wrapper fuses them with the adapter once per model call and hands the result to the patches in
  `transformer_options`; a CALC_COND_BATCH wrapper refuses a step where some of the conditioning carries them and
  some does not (the adapter would change one side of CFG only);
- the second cross-attention sits in attention replace patches (UNet `attn2`, LI-DiT `attn2` ("lidit", i)) or
  in block replace patches (`dit` double blocks of Flux and SD3); a replace patch already on the model is kept
  and called for the host branch;
- the adapter's weights are an additional model of the MODEL, so ComfyUI's memory manager moves them with it.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

import comfy.conds
import comfy.ldm.flux.model
import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import folder_paths
from comfy.ldm.modules.attention import optimized_attention
from comfy_api.v0_0_2 import io

from ..adapters.checkpoint import (CheckpointError, contributions_fix, load_host_adapter, read_metadata,
                                   trained_on_contributions)
from ..adapters.conditioning import llm_token_features, llm_tokens_width, pack_llm_tokens, unpack_llm_tokens
from ..adapters.diff_adapter import HostAdapter, heads_attention, lidit_cross_attention_replace, lidit_sites
from ..adapters.lidit import set_attention_kernel
from .lidit_model import LIDiTNet, comfy_attention

COND_KEY = "llm_diff_adapter_tokens"   # model_conds entry: LLM tokens (adapters.conditioning.pack_llm_tokens)
OPTIONS_KEY = "llm_diff_adapter"       # transformer_options entry: (context [B, T, C], mask [B, T])
WRAPPER_KEY = "llm_diff_adapter"


class AdapterError(ValueError):
    """An adapter, model or conditioning that do not fit together; the message names the fix."""


class CONDLLMTokens(comfy.conds.CONDRegular):
    """LLM hidden states of one prompt, padded (mask 0) rather than refused when cond and uncond differ in length,
    so that CFG keeps batching them together."""

    def can_concat(self, other):
        return self.cond.shape[0] == other.cond.shape[0] and self.cond.shape[2] == other.cond.shape[2] \
            and self.cond.device == other.cond.device

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        T = max(c.shape[1] for c in conds)
        return torch.cat([torch.nn.functional.pad(c, (0, 0, 0, T - c.shape[1])) for c in conds])


# ---------------------------------------------------------------------------------------------------------------
# Host families: where the second cross-attention goes


def unet_sites(net) -> list[tuple[tuple, object]]:
    """((block name, number, transformer index), BasicTransformerBlock) of every cross-attention, in the keys
    ComfyUI's UNet gives its attn2 replace patches."""
    sites = []
    for name, blocks in (("input", net.input_blocks), ("middle", [net.middle_block]), ("output", net.output_blocks)):
        for number, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, openaimodel.SpatialTransformer):
                    sites += [((name, number, i), tb) for i, tb in enumerate(layer.transformer_blocks)
                              if tb.attn2 is not None]
    return sites


def host_family(net) -> tuple[str, list[tuple[str, int, int]]]:
    """(family, [(site, width, heads)]) of a diffusion model, or an AdapterError naming what is supported."""
    if isinstance(net, LIDiTNet):
        return "lidit", lidit_sites(net.config)
    if isinstance(net, openaimodel.UNetModel):
        return "unet", [("{}.{}.{}".format(*key), tb.attn2.heads * tb.attn2.dim_head, tb.attn2.heads)
                        for key, tb in unet_sites(net)]
    if type(net) is comfy.ldm.flux.model.Flux:
        return "flux", [(f"double_block{i}", net.hidden_size, net.num_heads) for i in range(len(net.double_blocks))]
    if isinstance(net, mmdit.MMDiT):
        return "mmdit", [(f"double_block{i}", net.hidden_size, net.num_heads) for i in range(len(net.joint_blocks))]
    raise AdapterError(f"Apply LLM Diff Adapter supports LI-DiT, ComfyUI's UNet (SD 1.x, SD 2.x, SDXL), Flux and "
                       f"SD3 (MMDiT) models; this MODEL is a {type(net).__name__}. Use one of those families.")


# Every patch returns the host's own output where the conditioning carries no LLM encoding: with none, and at
# strength 0 (see DecoupledCrossAttention, GatedCrossAttention), the patched model is the base model exactly.


class UNetPatch:
    """attn2 replace patch: the host branch is the previous replace patch or ComfyUI's attention, exactly as
    CrossAttention computes it."""

    def __init__(self, branch, strength: float, previous=None):
        self.branch, self.strength, self.previous = branch, strength, previous

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        host_out = self.previous(q, k, v, extra_options) if self.previous else optimized_attention(
            q, k, v, heads, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options)
        llm = extra_options.get(OPTIONS_KEY)
        if llm is None:
            return host_out
        return self.branch(q, host_out, *llm, heads_attention(comfy_attention, heads), self.strength)


class LIDiTPatch:
    """LI-DiT's attn2 replace patch ("lidit", block): q, k, v as [B, heads, N, head_dim] after the QK norm, and
    LI-DiT's attention kernel for both branches."""

    def __init__(self, branch, strength: float):
        self.branch, self.strength = branch, strength

    def __call__(self, q, k, v, attn_mask, kernel, extra_options):
        llm = extra_options.get(OPTIONS_KEY)
        if llm is None:
            return kernel(q, k, v, attn_mask)
        return lidit_cross_attention_replace(self.branch, *llm, self.strength)(q, k, v, attn_mask, kernel)


class DiTPatch:
    """dit replace patch of a Flux double block or an SD3 joint block (both take {"img", "txt", "vec", ...}): the
    block (or the previous patch), then the gated cross-attention of the image tokens to the LLM encoding."""

    def __init__(self, branch, heads: int, strength: float, previous=None):
        self.branch, self.heads, self.strength, self.previous = branch, heads, strength, previous

    def __call__(self, args, extras):
        out = self.previous(args, extras) if self.previous else extras["original_block"](args)
        llm = args["transformer_options"].get(OPTIONS_KEY)
        if llm is not None:
            out["img"] = self.branch(out["img"], *llm, heads_attention(comfy_attention, self.heads), self.strength)
        return out


def fuse_tokens(host: HostAdapter, tokens: torch.Tensor, name: str, llm: str, contributions: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM tokens as pack_llm_tokens packs them -> the adapter's context [B, T, C], mask [B, T]."""
    a = host.adapter
    B, T, width = tokens.shape
    if width != llm_tokens_width(a.num_hidden_states, a.llm_hidden_size):
        raise AdapterError(
            f"The LLM encoding attached to this conditioning has {llm_token_features(tokens)} features per token, but "
            f"'{name}' was trained on {llm} ({a.num_hidden_states} hidden states of size {a.llm_hidden_size}, "
            f"{a.num_hidden_states * a.llm_hidden_size} features). Encode with that LLM in LLM Prompt Encode "
            "(layers 'all', no adapter) and attach that.")
    llm_tokens = unpack_llm_tokens(tokens, a.num_hidden_states, a.llm_hidden_size)
    # per sample: cond and uncond share one forward, and each must match; a prompt without tokens says nothing
    flagged = llm_tokens.contributions
    wrong = (flagged != contributions) & (flagged | llm_tokens.has_tokens)
    if wrong.any():
        raise AdapterError(f"'{name}' {contributions_fix(contributions)} in the LLM Prompt Encode nodes attached "
                           f"to this model's conditioning ({int(wrong.sum())} of the {B} encodings in this batch "
                           f"have it {'off' if contributions else 'on'}).")
    weight = a.proj.weight
    mask = llm_tokens.mask.to(weight.device)
    return a(llm_tokens.states.to(weight.device, torch.float32).to(weight.dtype), mask), mask


def check_llm_encodings(conds: list) -> None:
    """conds: [positive, negative, ...] as calc_cond_batch gets them, each a list of cond dicts or None (a side
    that is not computed). Either all of them carry an LLM encoding or none does: with one side only, the adapter
    changes the model's output on that side of CFG alone, and guidance amplifies a difference training never saw."""
    sides = {}
    for i, side in enumerate(conds):
        for cond in side or []:
            sides.setdefault(i, set()).add(COND_KEY in cond.get("model_conds", {}))
    if len(set().union(*sides.values())) > 1:
        # CFGGuider passes [positive, negative]; other guiders order and count their sides otherwise
        side = (lambda i: ("the positive", "the negative")[i]) if len(conds) == 2 else \
            (lambda i: f"#{i + 1} of the guider's {len(conds)}")
        mixed = [side(i) for i, flags in sides.items() if len(flags) > 1]
        where = (f"some entries of {' and '.join(mixed)} conditioning carry one and some do not" if mixed else
                 f"{', '.join(side(i) for i, f in sides.items() if True in f)} conditioning carries one, "
                 f"{', '.join(side(i) for i, f in sides.items() if False in f)} does not")
        raise AdapterError(f"Only part of the conditioning carries an LLM encoding ({where}), so Apply LLM Diff "
                           "Adapter would change the model for part of the guidance only, and guidance would "
                           "amplify that difference. Attach an LLM encoding to every conditioning that reaches the "
                           "sampler (positive and negative, and each entry combined into them) with LLM "
                           "Conditioning Attach; an empty prompt is a valid one.")


def apply_host_adapter(model: comfy.model_patcher.ModelPatcher, host: HostAdapter, info: dict, name: str,
                       strength: float, host_patcher: comfy.model_patcher.ModelPatcher | None = None
                       ) -> comfy.model_patcher.ModelPatcher:
    """A clone of `model` with the adapter patched in. host_patcher: the one ModelPatcher that moves the adapter's
    weights (shared by every model the same file is applied to)."""
    net = model.model.diffusion_model
    family, sites = host_family(net)
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        raise AdapterError("This MODEL has an LLM Diff Adapter applied already; one adapter reads the attached LLM "
                           "encoding. Remove one of the Apply LLM Diff Adapter nodes.")
    if info["family"] != family:
        raise AdapterError(f"'{name}' was trained for a {info['family']} model, but this MODEL is {family}. Load the "
                           f"adapter made for this model family, or the {info['family']} model it belongs to.")
    if [tuple(s[1:]) for s in host.sites] != [tuple(s[1:]) for s in sites]:
        widths = lambda ss: ", ".join(str(w) for _, w, _ in ss)  # noqa: E731
        raise AdapterError(f"'{name}' was trained for a {family} model with {len(host.sites)} cross-attention "
                           f"sites of widths [{widths(host.sites)}], but this one has {len(sites)} of widths "
                           f"[{widths(sites)}]: it belongs to another {family} model (e.g. SD 1.5 vs SDXL). Load the "
                           "adapter trained for this model.")
    contributions = trained_on_contributions(info)
    patched = model.clone()
    replace = patched.model_options["transformer_options"].get("patches_replace", {})
    if family == "unet":
        previous = replace.get("attn2", {})
        for (key, _), branch in zip(unet_sites(net), host.branches):
            # a patch set without a transformer index covers the whole block
            patched.set_model_attn2_replace(UNetPatch(branch, strength, previous.get(key, previous.get(key[:2]))),
                                            *key)
    elif family == "lidit":
        for i, branch in enumerate(host.branches):
            patched.set_model_attn2_replace(LIDiTPatch(branch, strength), "lidit", i)
    else:  # flux, mmdit
        previous = replace.get("dit", {})
        for i, branch in enumerate(host.branches):
            patched.set_model_patch_replace(DiTPatch(branch, net.num_heads, strength,
                                                      previous.get(("double_block", i))), "dit", "double_block", i)

    def fuse_llm_tokens(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                        **kwargs):
        tokens = kwargs.pop(COND_KEY, None)
        if tokens is not None:
            transformer_options = {**transformer_options,
                                   OPTIONS_KEY: fuse_tokens(host, tokens, name, info["llm"], contributions)}
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def same_llm_encodings(executor, model, conds, x_in, timestep, model_options):
        check_llm_encodings(conds)
        return executor(model, conds, x_in, timestep, model_options)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, fuse_llm_tokens)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                                 same_llm_encodings)
    patched.set_additional_models(WRAPPER_KEY, [host_patcher or adapter_patcher(host)])
    return patched


def adapter_patcher(host: HostAdapter) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(host, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: float):
    host, info = load_host_adapter(path)
    host.eval().requires_grad_(False)
    set_attention_kernel(host, comfy_attention)  # the adapter's refiner, if it has one
    return host, info, adapter_patcher(host)


class ApplyLLMDiffAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyLLMDiffAdapter",
            display_name="Apply LLM Diff Adapter",
            category="llm_diffusion",
            description="Gives an existing diffusion model (LI-DiT, SD 1.x/SDXL UNet, Flux, SD3) a second "
                        "cross-attention on every block of an LLM, through a trained LLM Diff Adapter file; the "
                        "model's own text path stays. Feed the LLM encoding with LLM Conditioning Attach, on both "
                        "positive and negative (an empty prompt is a valid one): an encoding on one side only is "
                        "refused when sampling starts; with none on either side the model samples as it is.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("adapter_name", options=folder_paths.get_filename_list("llm_adapters"),
                               tooltip="An adapter trained for this model: training/train_lidit.py --base (LI-DiT) "
                                       "or training/train_comfy_adapter.py (SD 1.x, SD 2.x, SDXL, SD3)."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=4.0, step=0.05,
                               tooltip="Scales all that the adapter changes, its gate on the model's own branch "
                                       "included: 0 gives the model's own output exactly, 1 the adapter as "
                                       "trained."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the adapter patched in (the input model is unchanged).")],
        )

    @classmethod
    def execute(cls, model, adapter_name: str, strength: float) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("llm_adapters", adapter_name)
        try:
            host, info, host_patcher = _load(path, os.path.getmtime(path))
        except CheckpointError:
            with contextlib.suppress(CheckpointError):
                read_metadata(path, "llm-diff-adapter")
                raise AdapterError(f"'{adapter_name}' is an LLM Diff Adapter for an LI-DiT model trained with it: "
                                   "load it with LLM Adapter Loader into LLM Prompt Encode. Apply LLM Diff Adapter "
                                   "takes an adapter trained for an existing model: training/train_lidit.py --base "
                                   "for an LI-DiT, training/train_comfy_adapter.py for an SD 1.x, SD 2.x, SDXL or "
                                   "SD3 checkpoint.") from None
            raise
        return io.NodeOutput(apply_host_adapter(model, host, info, adapter_name, strength, host_patcher))


class LLMConditioningAttach(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMConditioningAttach",
            display_name="LLM Conditioning Attach",
            category="llm_diffusion",
            description="Attaches an LLM Prompt Encode output (layers 'all', no adapter) to a model's own "
                        "conditioning (e.g. CLIP Text Encode), for a model patched by Apply LLM Diff Adapter.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The model's own prompt conditioning."),
                io.Conditioning.Input("llm_encoding", tooltip="LLM Prompt Encode with layers 'all' and no adapter."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The conditioning, carrying the LLM hidden states as well.")],
        )

    @classmethod
    def execute(cls, conditioning, llm_encoding) -> io.NodeOutput:
        hidden, extra = llm_encoding[0]
        info = extra.get("llm_encoding") or {}
        if not isinstance(info, dict) or "layers" not in info:
            raise AdapterError("llm_encoding must come from LLM Prompt Encode (one LLM, not LLM Conditioning Join).")
        if info.get("adapter"):
            raise AdapterError(f"llm_encoding went through the adapter '{info['adapter']}'; the Apply LLM Diff Adapter "
                               "file holds its own. Disconnect the adapter from LLM Prompt Encode.")
        return io.NodeOutput(attach_llm_tokens(conditioning, hidden, extra.get("attention_mask"),
                                               bool(info.get("contributions"))))


def attach_llm_tokens(conditioning: list, hidden: torch.Tensor, mask: torch.Tensor | None, contributions: bool) -> list:
    """conditioning with LLM hidden states [B, T, S * D] (LLM Prompt Encode, layers 'all', no adapter) in its
    model_conds, as Apply LLM Diff Adapter reads them; mask [B, T] (1 = token), None for all tokens."""
    tokens = pack_llm_tokens(hidden, mask, contributions)
    out = []
    for context, cond_extra in conditioning:
        model_conds = {**cond_extra.get("model_conds", {}), COND_KEY: CONDLLMTokens(tokens)}
        out.append([context, {**cond_extra, "model_conds": model_conds}])
    return out


NODES = [ApplyLLMDiffAdapter, LLMConditioningAttach]
