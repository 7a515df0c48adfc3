"""LLM Loader, LLM Adapter Loader and LLM Prompt Encode."""
from __future__ import annotations

import logging
from collections import OrderedDict
from types import SimpleNamespace

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..adapters import gguf_weights, llm_encoder, llm_generate
from ..adapters.checkpoint import DTYPES, contributions_fix, load_adapter, trained_on_contributions
from ..adapters.conditioning import hidden_states_to_context
from . import model_folders
from .types import LLM, LLM_ADAPTER

log = logging.getLogger(__name__)


class CastParameters(comfy.ops.CastWeightBiasOp):
    """Mixin for an LLM layer that comfy.ops has no class for (the model's own RMSNorm, Gemma's scaled embedding):
    when ComfyUI's partial loading leaves its weights on the offload device, they are cast to the input's device for
    the call, as comfy.ops layers do. The dtype stays the weights' own: the LLM computes in it, and an embedding's
    input is integer ids."""

    def forward(self, x, *args, **kwargs):
        if not (self.comfy_cast_weights or self.weight_function or self.bias_function):
            return super().forward(x, *args, **kwargs)
        weight, bias, stream = comfy.ops.cast_bias_weight(self, device=x.device, dtype=self.weight.dtype,
                                                          offloadable=True)
        stored = dict(self._parameters)
        self._parameters.update({"weight": weight} if bias is None else {"weight": weight, "bias": bias})
        try:  # the layer's own arithmetic on the cast tensors
            return super().forward(x, *args, **kwargs)
        finally:
            self._parameters.update(stored)
            comfy.ops.uncast_bias_weight(self, weight, bias, stream)


class CastGGUF(CastParameters):
    """Mixin for a GGUF layer (adapters.gguf_weights): ComfyUI's memory manager counts and moves its GGUF blocks,
    which comfy.ops casts to the input's device as they are (uint8) and the layer dequantizes there for the call.
    Weight patches follow ComfyUI's convert_weight / set_weight protocol: they see the dequantized weight, and a
    patched weight is stored dense in the blocks' place (restored on unpatch)."""

    def forward(self, x, *args, **kwargs):
        if self.weight.is_floating_point():  # patched: a dense layer until ComfyUI restores the blocks
            return super().forward(x, *args, **kwargs)
        # the weight functions are held back: they take the weight after convert_weight, not the bytes
        blocks = SimpleNamespace(weight=self.weight, bias=self.bias, weight_function=[],
                                 bias_function=self.bias_function)
        raw, bias, stream = comfy.ops.cast_bias_weight(blocks, device=x.device, dtype=torch.uint8, offloadable=True)
        stored = self._parameters.get("bias")
        if bias is not None:
            self._parameters["bias"] = bias
        try:
            if not self.weight_function:
                return self.forward_blocks(raw, x, *args, **kwargs)
            weight = raw
            for f in self.weight_function:  # ComfyUI's LowVramPatch converts the blocks itself
                if weight.dtype == torch.uint8 and not isinstance(f, comfy.model_patcher.LowVramPatch):
                    weight = self.dequantize_weight(weight)
                weight = f(weight)
            if weight.dtype == torch.uint8:
                weight = self.dequantize_weight(weight)
            return self.forward_dense(weight.to(self.compute_dtype), x, *args, **kwargs)
        finally:
            if bias is not None:
                self._parameters["bias"] = stored
            comfy.ops.uncast_bias_weight(self, raw, bias, stream)

    def convert_weight(self, weight, inplace=False, **kwargs):
        """ModelPatcher hands the stored blocks, as uint8 or as their byte values in float32."""
        return gguf_weights.dequantize(weight.to(torch.uint8), self.gguf_type)

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        dense = weight.to(self.compute_dtype)
        if return_weight:
            return dense
        if inplace_update:
            raise llm_encoder.LLMError("A GGUF layer's weight cannot be patched in place: its blocks are not the "
                                       "patched weight's shape. Turn off in-place weight patching for the LLM.")
        self.weight = torch.nn.Parameter(dense, requires_grad=False)


COMFY_LAYERS = {torch.nn.Linear: comfy.ops.disable_weight_init.Linear,
                torch.nn.Embedding: comfy.ops.disable_weight_init.Embedding}
_cast_classes: dict[type, type] = {}


def on_comfy_ops(module: torch.nn.Module) -> torch.nn.Module:
    """Every layer with weights becomes one that ComfyUI can leave on the offload device under partial loading
    (--lowvram, or a diffusion model that needs the room): GGUF layers through CastGGUF, Linear and Embedding as
    comfy.ops layers, any other layer with only weight/bias through CastParameters. Classes change in place; weights and arithmetic stay the same."""
    for name, m in module.named_modules():
        own = dict(m.named_parameters(recurse=False))
        if not own or isinstance(m, comfy.ops.CastWeightBiasOp):
            continue
        cls = type(m)
        if isinstance(m, gguf_weights.GGUFLayer):  # before COMFY_LAYERS: its forward must not cast bytes to floats
            if cls not in _cast_classes:
                _cast_classes[cls] = type(f"Comfy{cls.__name__}", (CastGGUF, cls), {})
            m.__class__ = _cast_classes[cls]
        elif cls in COMFY_LAYERS:
            m.__class__ = COMFY_LAYERS[cls]
        elif set(own) <= {"weight", "bias"} and not list(m.children()):
            if cls not in _cast_classes:
                _cast_classes[cls] = type(f"Comfy{cls.__name__}", (CastParameters, cls), {})
            m.__class__ = _cast_classes[cls]
        else:
            raise llm_encoder.LLMError(
                f"LLM layer '{name}' ({cls.__name__}) holds parameters {sorted(own)} that ComfyUI's memory manager "
                "cannot move layer by layer, so this architecture cannot be loaded safely. Load an LLM of a "
                "supported family (llama, qwen2, qwen3, gemma2, gemma3, mistral, phi3).")
        if not hasattr(m, "bias"):  # cast_bias_weight reads it; on the instance, so a real bias is never hidden
            m.bias = None
    return module


class LLMModule(torch.nn.Module):
    """Holds the LLM's text transformer for ModelPatcher, which needs to set `.device` (an HF model's is read-only).
    Only the decoder (embeddings, blocks, final norm): the LM head is never run, and with tied embeddings ComfyUI
    would count that matrix twice when it budgets memory. Its layers are on comfy.ops (on_comfy_ops), so ComfyUI
    may load any part of it."""

    def __init__(self, hf_model):
        super().__init__()
        self.decoder = on_comfy_ops(llm_encoder.decoder(hf_model))


class LoadedLLM:
    """What flows on an LLM wire: the model under ComfyUI's memory manager, its tokenizer and device policy."""

    def __init__(self, name: str, hf_model, tokenizer, device_policy: str):
        self.name = name
        self.tokenizer = tokenizer
        self.hf_model = hf_model
        load_device = torch.device("cpu") if device_policy == "cpu" else mm.text_encoder_device()
        self.patcher = comfy.model_patcher.ModelPatcher(LLMModule(hf_model), load_device=load_device,
                                                        offload_device=mm.text_encoder_offload_device())
        self.device_policy = device_policy
        # a GGUF layer's weight exists dequantized (float32, then the compute dtype) for its call, beside the blocks
        self.dequantized_layer_bytes = max((m.in_features * m.out_features * (4 + m.compute_dtype.itemsize)
                                            for m in self.patcher.model.modules()
                                            if isinstance(m, gguf_weights.GGUFLayer)
                                            and isinstance(m, torch.nn.Linear)), default=0)
        # Identical (text, options, adapter) are not encoded twice, also across workflows that differ elsewhere;
        # the cache lives and dies with this LLM.
        self.encodings: OrderedDict = OrderedDict()
        # The instruction and template's keys and values, computed once for the prompts after them.
        self.prefix_cache = llm_encoder.PrefixCache()
        head = hf_model.get_output_embeddings()
        if head is not None:  # only text generation runs it; outside the patcher, it is cast to each call's device
            on_comfy_ops(head).comfy_cast_weights = True

    @property
    def num_hidden_states(self) -> int:
        return llm_encoder.num_hidden_states(self.hf_model)

    @property
    def hidden_size(self) -> int:
        return llm_encoder.hidden_size(self.hf_model)

    def load(self) -> None:
        """ComfyUI's memory manager moves the weights, all of them or (when they do not fit, or for 'stream') as
        many as it allows, the rest cast layer by layer; it pushes them back when the diffusion model needs the
        room."""
        device = self.patcher.load_device
        extra = {"memory_required": self.dequantized_layer_bytes}
        if self.device_policy == "gpu":
            mm.load_models_gpu([self.patcher], force_full_load=True, **extra)
        elif self.device_policy == "stream" and device.type != "cpu":
            # asking to keep all free memory for the forward leaves ComfyUI's smallest weight share resident
            mm.load_models_gpu([self.patcher], minimum_memory_required=mm.get_free_memory(device), **extra)
        else:
            mm.load_models_gpu([self.patcher], **extra)

    def generate(self, prompt: str, on_token, **options) -> str:
        self.load()
        return llm_generate.generate_text(self.hf_model, self.tokenizer, prompt, device=self.patcher.load_device,
                                          on_token=on_token, name=self.name, **options)

    def encode(self, prompts: list[str], on_block, **options) -> llm_encoder.PromptEncoding:
        self.load()
        return llm_encoder.encode_prompts(self.hf_model, self.tokenizer, prompts, name=self.name,
                                          device=self.patcher.load_device,
                                          on_block=on_block, prefix_cache=self.prefix_cache,
                                          weights_key=self.patcher.patches_uuid, **options)


def pick_dtype(choice: str, device_policy: str) -> torch.dtype:
    if choice != "auto":
        return DTYPES[choice]
    device = torch.device("cpu") if device_policy == "cpu" else mm.text_encoder_device()
    if device.type == "cpu":
        return torch.float32  # half precision is slow or unsupported for many CPU kernels
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float16


class LLMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMLoader",
            display_name="LLM Loader",
            category="llm_diffusion",
            description="Loads a decoder-only LLM (Llama, Qwen, Gemma, SmolLM, Mistral, Phi) from models/LLM: a "
                        ".gguf file or a Hugging Face folder with safetensors weights.",
            inputs=[
                io.Combo.Input("llm_name", options=list(model_folders.llm_entries()),
                               tooltip="A .gguf file or a Hugging Face folder in models/LLM or models/text_encoders."),
                io.Combo.Input("dtype", options=["auto", *DTYPES], default="auto",
                               tooltip="auto: fp32 on the CPU, bf16 (or fp16) on a GPU. GGUF weights stay "
                                       "quantized in memory and are dequantized to this type layer by layer "
                                       "as the LLM runs."),
                io.Combo.Input("device", options=["auto", "gpu", "cpu", "stream"], default="auto",
                               tooltip="auto: GPU through ComfyUI's memory manager, which loads what fits and "
                                       "casts the rest layer by layer. gpu: all of it. stream: as little as "
                                       "ComfyUI allows, the rest layer by layer (leaves VRAM to the diffusion "
                                       "model)."),
            ],
            outputs=[LLM.Output(tooltip="The LLM under ComfyUI's memory manager, for LLM Prompt Encode.")],
        )

    @classmethod
    def execute(cls, llm_name: str, dtype: str, device: str) -> io.NodeOutput:
        entries = model_folders.llm_entries()
        if llm_name not in entries:
            raise llm_encoder.LLMError(f"LLM '{llm_name}' not found in {folder_paths.get_folder_paths('LLM')}. "
                                       "Put the .gguf file or model folder there and refresh.")
        model_folders.remove_old_gguf_cache()
        hf_model, tokenizer = llm_encoder.load_llm(entries[llm_name], pick_dtype(dtype, device))
        return io.NodeOutput(LoadedLLM(llm_name, hf_model, tokenizer, device))


class LLMAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMAdapterLoader",
            display_name="LLM Adapter Loader",
            category="llm_diffusion",
            description="Loads an LLM Diff Adapter: learned weights over every LLM block and a projection to the "
                        "diffusion model's context size.",
            inputs=[io.Combo.Input("adapter_name", options=folder_paths.get_filename_list("llm_adapters"))],
            outputs=[LLM_ADAPTER.Output(tooltip="The adapter, for the adapter input of LLM Prompt Encode.")],
        )

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        adapter, meta = load_adapter(folder_paths.get_full_path_or_raise("llm_adapters", adapter_name))
        adapter.name = adapter_name
        adapter.meta = meta
        return io.NodeOutput(adapter.eval().requires_grad_(False))


ENCODING_CACHE_SIZE = 16


class LLMPromptEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMPromptEncode",
            display_name="LLM Prompt Encode",
            category="llm_diffusion",
            description="Runs the prompt through the LLM once, keeps the output of every transformer block and "
                        "returns CONDITIONING: fused by the adapter when one is connected, else the chosen layers.",
            inputs=[
                LLM.Input("llm"),
                io.String.Input("text", multiline=True, default="",
                                tooltip="The prompt. Weights as in CLIP Text Encode: (red:1.4), (red) = 1.1, "
                                        "[red] = 1/1.1, 0 removes a word's meaning; \\( \\) \\[ \\] are the "
                                        "brackets themselves."),
                io.Combo.Input("instruction", options=["li-dit", "none", "custom"], default="li-dit",
                               tooltip="Text put before the prompt (LI-DiT: helps instruction-tuned LLMs describe "
                                       "rather than continue); its tokens are removed from the output."),
                io.String.Input("custom_instruction", multiline=True, default="",
                                tooltip="Used when instruction is 'custom'. Typed as a prompt is: a chat marker "
                                        "such as <|im_start|> in it is text, not a control token."),
                io.Boolean.Input("chat_template", default=True,
                                 tooltip="Wrap the prompt in the model's chat template when it has one."),
                io.String.Input("layers", default="all",
                                tooltip="Hidden states to keep: 'all' (needed by an adapter), 'last', '-3' "
                                        "(LI-DiT) or a comma list like '0,10,-1'."),
                io.Int.Input("max_tokens", default=256, min=1, max=8192,
                             tooltip="Prompt tokens kept; longer prompts are cut with a warning."),
                LLM_ADAPTER.Input("adapter", optional=True),
                io.Boolean.Input("block_contributions", default=False, optional=True,
                                 tooltip="Replace each hidden state by that state minus the same token's state in a "
                                         "one-token prompt (same instruction and template): what the rest of the "
                                         "prompt adds at each block. Only for adapters trained that way "
                                         "(train_lidit.py --block-outputs contributions)."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Every block's output fused by the adapter, or the chosen "
                                                            "layers side by side.")],
        )

    @classmethod
    def execute(cls, llm: LoadedLLM, text: str, instruction: str, custom_instruction: str, chat_template: bool,
                layers: str, max_tokens: int, adapter=None, block_contributions: bool = False) -> io.NodeOutput:
        chosen = pick_instruction(instruction, custom_instruction, llm_encoder.INSTRUCTION_PRESETS)
        if adapter is not None:
            check_adapter(adapter, llm, layers, block_contributions)
        options = dict(instruction=chosen, use_chat_template=chat_template, layers=layers, max_tokens=max_tokens,
                       contributions=block_contributions, weighted=True)
        key = (id(adapter), text, tuple(sorted(options.items())))
        if key in llm.encodings:
            llm.encodings.move_to_end(key)
            return io.NodeOutput(llm.encodings[key][1])

        pbar = comfy.utils.ProgressBar(llm.num_hidden_states - 1)

        def on_block(i: int, total: int) -> None:
            mm.throw_exception_if_processing_interrupted()
            pbar.update_absolute(i + 1, total)

        enc = llm.encode([text], on_block, **options)
        with torch.no_grad():
            context = hidden_states_to_context(enc.hidden_states.float(), adapter, enc.attention_mask)
        info = {"llm": llm.name, "layers": enc.layers, "adapter": getattr(adapter, "name", None),
                "truncated_tokens": enc.truncated[0], "contributions": block_contributions}
        extra = {"llm_encoding": info}
        if not bool(enc.attention_mask.all()):  # an all-ones mask would stop ComfyUI batching cond with uncond
            extra["attention_mask"] = enc.attention_mask.cpu()
        cond = [[context.float().cpu(), extra]]
        llm.encodings[key] = (adapter, cond)  # holding the adapter keeps its id from being reused
        while len(llm.encodings) > ENCODING_CACHE_SIZE:
            llm.encodings.popitem(last=False)
        return io.NodeOutput(cond)


def pick_instruction(instruction: str, custom_instruction: str, presets: dict[str, str | None]) -> str | None:
    if instruction == "custom":
        if not custom_instruction.strip():
            raise llm_encoder.LLMError("instruction is 'custom' but custom_instruction is empty: write the "
                                       f"instruction, or pick one of {sorted(presets)}.")
        return custom_instruction.strip()
    if instruction not in presets:
        raise llm_encoder.LLMError(f"Unknown instruction preset '{instruction}': pick one of {sorted(presets)} or "
                                   "'custom'.")
    return presets[instruction]


class LLMGenerateText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LLMGenerateText",
            display_name="LLM Generate Text",
            category="llm_diffusion",
            description="Writes text with the LLM that LLM Loader loaded (the same weights in memory, no second "
                        "copy): for example a short prompt expanded into a detailed description, for LLM Prompt "
                        "Encode.",
            inputs=[
                LLM.Input("llm"),
                io.String.Input("text", multiline=True, default="",
                                tooltip="What the LLM answers: the short prompt to expand, or any request."),
                io.Combo.Input("instruction", options=[*llm_generate.GENERATE_PRESETS, "custom"], default="expand",
                               tooltip="expand: rewrite the prompt as one detailed description of the picture. "
                                       "li-dit: LI-DiT's describe-the-image instruction. none: the text alone."),
                io.String.Input("custom_instruction", multiline=True, default="",
                                tooltip="Used when instruction is 'custom': the system turn of the chat."),
                io.Boolean.Input("chat_template", default=True,
                                 tooltip="Wrap the text in the model's chat template when it has one (instruction "
                                         "as the system turn; the answer ends at the end of the model's turn)."),
                io.Int.Input("max_new_tokens", default=128, min=1, max=4096,
                             tooltip="The answer stops here at the latest."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The same seed and settings give the same text."),
                io.Float.Input("temperature", default=0.7, min=0.0, max=2.0, step=0.05,
                               tooltip="0: greedy (always the most likely token, the seed does not matter); higher "
                                       "is more varied."),
                io.Float.Input("top_p", default=0.9, min=0.01, max=1.0, step=0.01,
                               tooltip="Sample only from the most likely tokens that together have this "
                                       "probability (ignored when greedy)."),
            ],
            outputs=[io.String.Output(tooltip="The LLM's answer, without the prompt or control tokens.")],
        )

    @classmethod
    def execute(cls, llm: LoadedLLM, text: str, instruction: str, custom_instruction: str, chat_template: bool,
                max_new_tokens: int, seed: int, temperature: float, top_p: float) -> io.NodeOutput:
        chosen = pick_instruction(instruction, custom_instruction, llm_generate.GENERATE_PRESETS)
        pbar = comfy.utils.ProgressBar(max_new_tokens)

        def on_token(n: int) -> None:
            mm.throw_exception_if_processing_interrupted()
            pbar.update_absolute(n, max_new_tokens)

        answer = llm.generate(text, on_token, instruction=chosen, use_chat_template=chat_template,
                              max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p)
        return io.NodeOutput(answer, ui=ui.PreviewText(answer))


def check_adapter(adapter, llm: LoadedLLM, layers: str, contributions: bool) -> None:
    mismatch = adapter.size_mismatch(llm.num_hidden_states, llm.hidden_size)
    if mismatch:
        raise llm_encoder.LLMError(
            f"Adapter '{adapter.name}' does not fit '{llm.name}': {mismatch}. Load the LLM the adapter was made for "
            f"({adapter.meta.get('llm', '?')}), or disconnect the adapter.")
    if layers.strip().lower() != "all":
        raise llm_encoder.LLMError(f"An adapter fuses every LLM block, but layers is '{layers}': set layers to "
                                   "'all', or disconnect the adapter.")
    trained_on = trained_on_contributions(adapter.meta)
    if trained_on != contributions:
        raise llm_encoder.LLMError(f"Adapter '{adapter.name}' {contributions_fix(trained_on)}.")



NODES = [LLMLoader, LLMAdapterLoader, LLMPromptEncode, LLMGenerateText]
