"""A frozen decoder-only LLM as prompt encoder.

Loading (Hugging Face folders with safetensors, single GGUF files) and one forward pass that keeps the output
of every transformer block (hidden states 0..L, as the LLM Diff Adapter needs), with the LI-DiT instruction
prefix and the model's chat template. Only the prompt's own tokens are returned: instruction and template
tokens condition them through causal attention and are then cut off.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import re
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import gguf
import torch
import transformers
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from . import gguf_weights, prompt_weights

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "mistral", "phi3")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# LI-DiT, section 3.2: the instruction that makes an instruction-tuned LLM describe rather than continue.
LI_DIT_INSTRUCTION = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "and spatial relationships of the objects:"
)
INSTRUCTION_PRESETS = {"none": None, "li-dit": LI_DIT_INSTRUCTION}
# Chat templates that print today's date (Llama 3.x) would encode the same prompt differently each day.
TEMPLATE_DATE = datetime.date(2024, 7, 26)
_STRFTIME_NOW = re.compile(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""")
# transformers >= 4.56 takes `dtype` and warns on `torch_dtype`; older versions only know `torch_dtype`.
_DTYPE_KWARG = "dtype" if "dtype" in inspect.signature(transformers.PretrainedConfig.__init__).parameters \
    else "torch_dtype"


class LLMError(ValueError):
    """Bad input for the LLM side; the message names the problem and the fix."""


def check_weights_path(path: str) -> None:
    if not os.path.exists(path):
        raise LLMError(f"LLM not found: '{path}'. Put a Hugging Face folder (config.json + *.safetensors + "
                       "tokenizer) or a .gguf file in ComfyUI's models/LLM folder.")
    if os.path.isfile(path) and path.lower().endswith(PICKLE_SUFFIXES):
        raise LLMError(f"Refusing to load '{os.path.basename(path)}': pickled weights can run arbitrary code. "
                       "Convert the model to .safetensors (or use a .gguf file).")
    if os.path.isfile(path) and not path.lower().endswith(".gguf"):
        raise LLMError(f"'{os.path.basename(path)}' is not an LLM: expected a .gguf file or a Hugging Face folder.")
    if os.path.isdir(path):
        files = os.listdir(path)
        if "config.json" not in files:
            raise LLMError(f"'{path}' has no config.json: it is not a Hugging Face model folder.")
        if not any(f.endswith(".safetensors") for f in files):
            pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
            hint = f" It only has pickled weights ({', '.join(pickled)}), which are never loaded." if pickled else ""
            raise LLMError(f"'{path}' has no .safetensors weights.{hint} Convert the weights to safetensors.")


def load_llm(path: str, dtype: torch.dtype = torch.float32):
    """Returns (causal LM, tokenizer) on the CPU. A GGUF file's Linear and Embedding matrices stay in their GGUF
    blocks and are dequantized to `dtype` layer by layer in the forward (adapters.gguf_weights); nothing is
    written."""
    check_weights_path(path)
    if os.path.isfile(path):
        folder, kwargs = os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    else:
        folder, kwargs = path, {"use_safetensors": True}
    with gguf_metadata_reader() if "gguf_file" in kwargs else contextlib.nullcontext():
        return _load_llm(path, folder, kwargs, dtype)


@contextlib.contextmanager
def gguf_metadata_reader():
    """transformers reads a GGUF file's config and tokenizer through gguf.GGUFReader, two or three times per load;
    the metadata reader gives them the same values in a fraction of the time."""
    real = gguf.GGUFReader
    gguf.GGUFReader = gguf_weights.MetadataReader
    try:
        yield
    finally:
        gguf.GGUFReader = real


def _load_llm(path: str, folder: str, kwargs: dict, dtype: torch.dtype):
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except Exception as e:  # corrupt header, unknown GGUF architecture, broken config.json
        raise LLMError(f"Cannot read the LLM config of '{path}': {e}. Is the file complete and a supported "
                       f"architecture ({', '.join(SUPPORTED_MODEL_TYPES)})?") from e
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise LLMError(f"'{path}' is a '{config.model_type}' model; supported decoder-only architectures are "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
    try:
        # with the config given, the tokenizer does not parse it again to pick its class
        tokenizer = AutoTokenizer.from_pretrained(folder, config=config, trust_remote_code=False, **kwargs)
        if "gguf_file" in kwargs:
            with init_empty_weights(include_buffers=False):  # parameters on meta, filled from the file
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, **{_DTYPE_KWARG: dtype})
            gguf_weights.load_weights(model, path, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, low_cpu_mem_usage=True,
                                                         **{_DTYPE_KWARG: dtype}, **kwargs)
    except gguf_weights.GGUFError as e:
        raise LLMError(str(e)) from None
    except Exception as e:
        raise LLMError(f"Cannot load the LLM weights of '{path}': {e}. The file may be truncated or corrupt; "
                       "download it again.") from e
    model.eval().requires_grad_(False)
    return model, tokenizer


def decoder(model) -> torch.nn.Module:
    """The text transformer: embeddings, blocks, final norm. Multimodal Gemma 3 keeps it beside the vision tower,
    and transformers before 4.56 gives that class no get_decoder()."""
    if hasattr(model, "get_decoder"):
        return model.get_decoder()
    return model.model.language_model


def decoder_layers(model) -> torch.nn.ModuleList:
    return decoder(model).layers


def hidden_size(model) -> int:
    """Width of the hidden states (multimodal configs keep it under text_config)."""
    return model.get_input_embeddings().embedding_dim


def num_hidden_states(model) -> int:
    """Embeddings + one output per transformer block."""
    return len(decoder_layers(model)) + 1


def parse_layers(spec: str, num_states: int) -> list[int]:
    """'all' | 'last' | one index | a comma list; negative indices count from the last block (-3 = LI-DiT)."""
    spec = str(spec).strip().lower()
    if spec == "all":
        return list(range(num_states))
    if spec == "last":
        return [num_states - 1]
    try:
        picked = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise LLMError(f"Layer selection '{spec}' is not 'all', 'last' or a comma list of integers like '-3' "
                       "or '0,10,-1'.") from None
    out = []
    for i in picked:
        if not -num_states <= i < num_states:
            raise LLMError(f"Layer {i} does not exist: this LLM has hidden states 0..{num_states - 1} "
                           f"(embeddings and {num_states - 1} blocks).")
        out.append(i % num_states)
    if not out:
        raise LLMError("Layer selection is empty; use 'all', 'last', '-3' or a comma list.")
    return out


def render_chat(tokenizer, instruction: str | None, prompt: str, add_generation_prompt: bool) -> str:
    """The chat template around one user prompt, the instruction as the system turn (or at the head of the user's turn
    where the template has no system role, as Gemma 2's), with a fixed date."""
    # transformers 5 turns template arguments into plain data, so the date is written into the template itself
    template = _STRFTIME_NOW.sub(lambda m: repr(TEMPLATE_DATE.strftime(m.group(2))), tokenizer.get_chat_template())
    pinned = {"chat_template": template, "date_string": TEMPLATE_DATE.strftime("%d %b %Y"),
              "add_generation_prompt": add_generation_prompt}
    if not instruction:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, **pinned)
    try:
        return tokenizer.apply_chat_template([{"role": "system", "content": instruction},
                                              {"role": "user", "content": prompt}], tokenize=False, **pinned)
    except Exception:  # templates without a system role raise
        return tokenizer.apply_chat_template([{"role": "user", "content": f"{instruction}\n{prompt}"}],
                                             tokenize=False, **pinned)


def has_chat_template(tokenizer, use_chat_template: bool) -> bool:
    return bool(use_chat_template and getattr(tokenizer, "chat_template", None))


def prompt_prefix(tokenizer, instruction: str | None, use_chat_template: bool) -> tuple[str, bool]:
    """Text that precedes the prompt, and whether it already holds the special tokens (BOS).

    With a chat template, the prefix is where the template rendered around two different prompts stops agreeing:
    no marker string, so nothing typed into the instruction can be taken for the prompt's place. What follows the
    prompt never reaches the prompt's tokens through causal attention, so it is left out of the forward pass.
    """
    if not has_chat_template(tokenizer, use_chat_template):
        return (f"{instruction}\n" if instruction else ""), False
    return os.path.commonprefix([render_chat(tokenizer, instruction, p, False) for p in ("A", "B")]), True


def prompt_suffix(tokenizer, instruction: str | None, use_chat_template: bool) -> str:
    """Text that follows the prompt up to where the model's answer starts (the end of the user's turn and the
    opening of the assistant's): where the template rendered around two different prompts agrees again."""
    if not has_chat_template(tokenizer, use_chat_template):
        return "\n"
    rendered = [render_chat(tokenizer, instruction, p, True)[::-1] for p in ("A", "B")]
    return os.path.commonprefix(rendered)[::-1]


# Stands for the instruction while the template is rendered, to find where the instruction's own text lies: a
# private-use character that no template writes.
_INSTRUCTION_SLOT = "\ue000instruction\ue000"
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, what: str) -> None:
    """Tokenizers take only valid Unicode: a lone surrogate (half of a UTF-16 pair, left by a broken copy and paste or
    a JSON "\\ud800") makes them fail with a TypeError that names neither the text nor the character."""
    bad = _SURROGATE.search(text)
    if bad:
        raise LLMError(f"The {what} holds a lone surrogate {ascii(bad.group())} at character {bad.start() + 1}: half "
                       "of a UTF-16 character pair, which is not text and cannot be tokenized. Remove it, or copy the "
                       "text again from its source.")


def tokenize_prefix(tokenizer, instruction: str | None, use_chat_template: bool) -> list[int]:
    """Token ids of prompt_prefix: the template's markers (and BOS) as control tokens, the instruction as plain text,
    as prompts are, so that a "<|im_start|>" typed into it never opens a turn of the chat."""
    prefix, has_special = prompt_prefix(tokenizer, instruction, use_chat_template)
    # Only an instruction that holds a control token's text is tokenized apart from the template: cut at its edges,
    # the text no longer merges across them (BPE tokens such as ":\n"), and every other instruction would change ids.
    typed_markers = bool(instruction) and any(t in instruction for t in tokenizer.get_added_vocab())
    head, tail = prefix, ""
    if typed_markers:
        pieces = prompt_prefix(tokenizer, _INSTRUCTION_SLOT, use_chat_template)[0].split(_INSTRUCTION_SLOT)
        if len(pieces) != 2 or pieces[0] + instruction + pieces[1] != prefix:
            raise LLMError("This LLM's chat template does not write the instruction once and as it was given (it "
                           "trims or rewrites it, or moves it into the user's turn), so the control-token text typed "
                           "into it cannot be kept apart from the template's own. Remove the chat markers (such as "
                           "<|im_start|>) from the instruction, or turn chat_template off.")
        head, tail = pieces
    ids = tokenizer(head, add_special_tokens=not has_special)["input_ids"] if (head or not has_special) else []
    if typed_markers:
        ids = ids + tokenizer(instruction, add_special_tokens=False, split_special_tokens=True)["input_ids"] \
            + tokenizer(tail, add_special_tokens=False)["input_ids"]
    return list(ids)


@dataclass
class PromptEncoding:
    hidden_states: torch.Tensor   # [B, S, T, D] the S selected hidden states of the T prompt tokens
    attention_mask: torch.Tensor  # [B, T] 1 for a prompt token, 0 for padding
    layers: list[int]             # which hidden states (0 = embeddings, L = last block)
    truncated: list[int]          # per prompt: how many tokens the limit cut off


def tokenize_prompts(tokenizer, prompts: Sequence[str], *, instruction: str | None, use_chat_template: bool,
                     max_tokens: int, weighted: bool = False
                     ) -> tuple[list[int], list[list[int]], list[int], list[list[float]]]:
    """(ids of the prefix, ids of each prompt cut to max_tokens, how many tokens each lost, each token's weight).
    Typed text is text: a "<|im_end|>" in a prompt or in the instruction is never a control token. weighted: read
    ComfyUI's weight syntax (prompt_weights) and tokenize the text without it; else every weight is 1."""
    if instruction:
        check_text(instruction, "instruction")
    for b, p in enumerate(prompts):
        check_text(p, f"prompt {b + 1}" if len(prompts) > 1 else "prompt")
    prompt_ids, truncated, weights = [], [], []
    for p in prompts:
        pieces = prompt_weights.parse_weights(p) if weighted else [(p, 1.0)]
        text = "".join(t for t, _ in pieces)
        stripped = text.strip()
        weighted_prompt = prompt_weights.has_weights(w for _, w in pieces)
        if weighted_prompt and not getattr(tokenizer, "is_fast", False):
            raise LLMError("Prompt weights need to know which characters each token covers, which this LLM's "
                           "tokenizer (a slow, Python one) cannot tell. Remove the weights, or load the LLM from a "
                           "folder with tokenizer.json or from a GGUF file.")
        ids, token_weights = [], []
        if stripped:
            tokens = tokenizer(stripped, add_special_tokens=False, split_special_tokens=True,
                               return_offsets_mapping=weighted_prompt)
            ids = tokens["input_ids"]
            token_weights = prompt_weights.token_weights(pieces, tokens["offset_mapping"],
                                                         shift=len(text) - len(text.lstrip())) \
                if weighted_prompt else [1.0] * len(ids)
        truncated.append(max(0, len(ids) - max_tokens))
        prompt_ids.append(ids[:max_tokens])
        weights.append(token_weights[:max_tokens])
    return tokenize_prefix(tokenizer, instruction, use_chat_template), prompt_ids, truncated, weights


def filler_token(tokenizer) -> int:
    """The token that blanks a weighted word (prompt_weights): a lone space where the tokenizer has one, else its
    padding or end token."""
    ids = tokenizer(" ", add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return ids[0]
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return token
    raise LLMError("This LLM's tokenizer has no token for a space, no padding and no end token, so a weighted "
                   "word cannot be blanked. Remove the weights (the brackets) from the prompt.")


class PrefixCache:
    """The keys and values that the prefix (BOS, instruction, the chat template's opening) leaves in every block, kept
    for the next prompts. Under causal attention they do not depend on what follows the prefix, so a forward after
    them runs the prompt's tokens only. One entry: a new prefix, model, weights, dtype or device replaces it."""

    def __init__(self):
        self.key: tuple | None = None
        self.past: list[tuple[torch.Tensor, torch.Tensor]] = []  # per block (keys, values), each [1, H_kv, P, Dh]

    @torch.no_grad()
    def get(self, model, prefix_ids: list[int], device, weights_key=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """weights_key: whatever else changes the weights in place (ComfyUI's patches)."""
        key = (weakref.ref(model), weights_key, tuple(prefix_ids), model.dtype, torch.device(device))
        if key != self.key:
            self.key, self.past = None, []  # a forward that fails leaves no half entry
            ids = torch.tensor([prefix_ids], dtype=torch.long, device=device)  # [1, P]
            cache = DynamicCache()  # filled in place by the forward
            with no_forward_cycles(model):
                decoder(model)(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
            self.key, self.past = key, [(k, v) for k, v, *_ in cache]
        return self.past


def cache_kwarg(model) -> str:
    """The decoder forward's name for the key/value cache: newer transformers call it `cache` and warn on the older
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(decoder(model).forward).parameters else "past_key_values"


def reuses_prefix(model, sequence_length: int) -> bool:
    """Whether a cached prefix gives the full forward's states. Not past a sliding window: transformers' Gemma blocks
    may build their window mask as if the first token they run sat at position 0, as it does in a full forward.
    Within the window every block attends to all earlier tokens, however the window is written."""
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    return window is None or sequence_length <= window


def forward_prompts(model, prefix_ids: list[int], prompt_ids: list[list[int]], device,
                    prefix_past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[torch.Tensor, ...]:
    """Every hidden state of the prompts' tokens after the prefix, right-padded to the longest prompt: L + 1 tensors
    [B, T, D] (0 beyond a prompt's length). prefix_past: the prefix's keys and values (PrefixCache.get); then only
    the prompts' tokens run."""
    B, P, T = len(prompt_ids), len(prefix_ids), max(1, max(len(ids) for ids in prompt_ids))
    run = prefix_ids if prefix_past is None else []
    input_ids = torch.zeros(B, len(run) + T, dtype=torch.long)  # [B, run + T]; padding is never attended
    attention = torch.zeros(B, P + T, dtype=torch.long)          # [B, P + T]
    attention[:, :P] = 1
    for b, ids in enumerate(prompt_ids):
        input_ids[b, :len(run) + len(ids)] = torch.tensor(run + ids, dtype=torch.long)
        attention[b, P:P + len(ids)] = 1
    if not P:  # a row with nothing to run keeps one position attended, so that the softmax stays finite
        attention[:, 0] = 1
    cache = {"use_cache": False}
    if prefix_past is not None:  # a fresh cache over the stored tensors: the forward appends to it, not to them
        cache = {"use_cache": True, cache_kwarg(model): DynamicCache(
            [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix_past])}
    with no_forward_cycles(model):
        states = decoder(model)(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                output_hidden_states=True, **cache).hidden_states
    return tuple(s[:, len(run):] for s in states)


@torch.no_grad()
def encode_prompts(model, tokenizer, prompts: Sequence[str], *, name: str | None = None, **options) -> PromptEncoding:
    """encode_one_pass (its options), never with a NaN or inf in the returned states: half precision overflows in
    some LLMs' activations (the black images users report); such an encoding runs again with the weights in float32,
    with a warning naming the LLM (`name`) and its dtype."""
    enc = encode_one_pass(model, tokenizer, prompts, **options)
    if bool(torch.isfinite(enc.hidden_states).all()):
        return enc
    with in_float32_after_overflow(model, name, "hidden states", "a black image"):
        enc = encode_one_pass(model, tokenizer, prompts, **options)
    if not bool(torch.isfinite(enc.hidden_states).all()):
        raise broken_weights(model, name, "hidden states")
    return enc


def _llm_name(model, name: str | None) -> str:
    return name or getattr(model, "name_or_path", "") or model.config.model_type


def broken_weights(model, name: str | None, what: str) -> LLMError:
    return LLMError(f"LLM '{_llm_name(model, name)}' gives NaN or inf {what} even in float32: its weights are "
                    "broken. Download the model again, or use another file of it.")


def in_float32_after_overflow(model, name: str | None, what: str, harm: str):
    """After a run whose `what` held NaN or inf: the context that runs it again in float32 (computing_in), with a
    warning naming the LLM and its dtype; an LLM already in float32 is refused as broken."""
    if model.dtype == torch.float32:
        raise broken_weights(model, name, what)
    log.warning("LLM '%s' gave NaN or inf %s in %s (an overflow of half precision, which would give %s); running "
                "it again in float32. Load the LLM with dtype fp32 (or bf16) to skip the first pass.",
                _llm_name(model, name), what, str(model.dtype).removeprefix("torch."), harm)
    return computing_in(model, torch.float32)


@contextlib.contextmanager
def computing_in(model, dtype: torch.dtype):
    """The model's floating weights and buffers, and its GGUF layers' compute dtype, in `dtype` for the block; then
    the very tensors it had (tied weights stay tied, ComfyUI's pinned or patched weights stay what they were). For a
    GGUF model only the norms are copied; a dense half-precision model holds a float32 copy meanwhile."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.dtype != dtype}
    kept = {k: t.data for k, t in tensors.items()}
    layers = {m: m.compute_dtype for m in model.modules() if isinstance(m, gguf_weights.GGUFLayer)}
    try:
        for t in tensors.values():
            t.data = t.data.to(dtype)
        for m in layers:
            m.compute_dtype = dtype
        yield model
    finally:
        for k, t in tensors.items():
            t.data = kept[k]
        for m, d in layers.items():
            m.compute_dtype = d


@torch.no_grad()
def encode_one_pass(model, tokenizer, prompts: Sequence[str], *, instruction: str | None = None,
                    use_chat_template: bool = True, layers: str = "all", max_tokens: int = 256,
                    device: torch.device | None = None, contributions: bool = False, weighted: bool = False,
                    on_block: Callable[[int, int], None] | None = None,
                    prefix_cache: PrefixCache | None = None, weights_key=None) -> PromptEncoding:
    """One forward pass of [prefix + prompt] per prompt (right-padded batch); returns the prompt tokens only.

    An empty prompt gives a single all-zero token: the unconditional encoding that trainers drop captions to.
    contributions: every hidden state minus the same token's hidden state in a one-token prompt (the same prefix,
    then that token alone): what the prompt's other tokens add at each block; 0 for the embeddings, and for a
    prompt's first token up to rounding (a batch and a one-token prompt round differently).
    weighted: prompt weights in ComfyUI's syntax (prompt_weights); a prompt with a weight other than 1 runs as up to
    G + 2 rows in the same batch, G its distinct weights, and loses the tokens of weight 0. Without any weight, the
    encoding is the unweighted one.
    prefix_cache: runs the prefix once and then only the prompts' tokens after its keys and values (the states equal
    the full forward's up to rounding); weights_key names the weights' version in its key (ComfyUI's patches).
    """
    if not prompts:
        raise LLMError("No prompt given.")
    device = device or next(model.parameters()).device
    prefix_ids, prompt_ids, truncated, weights = tokenize_prompts(
        tokenizer, prompts, instruction=instruction, use_chat_template=use_chat_template, max_tokens=max_tokens,
        weighted=weighted)
    for p, cut in zip(prompts, truncated):
        if cut:
            log.warning("Prompt is %d tokens over the %d-token limit; the end was cut off: '...%s'. Raise "
                        "max_tokens or shorten the prompt.", cut, max_tokens, p.strip()[-40:])
    picked = parse_layers(layers, num_hidden_states(model))

    rows, spans, plans = [], [], []  # spans[b]: prompt b's rows; plans[b]: its weights' plan, None without any
    filler = filler_token(tokenizer) if any(w not in (0.0, 1.0) for ws in weights for w in ws) else None
    for ids, ws in zip(prompt_ids, weights):
        plan = prompt_weights.plan_weights(ids, ws, filler) if prompt_weights.has_weights(ws) else None
        spans.append(slice(len(rows), len(rows) + (len(plan.rows) if plan else 1)))
        rows += plan.rows if plan else [ids]
        plans.append(plan)
    states = prompt_states(model, prefix_ids, rows, picked, device, contributions, on_block, prefix_cache,
                           weights_key)                                          # [rows, S, T, D]
    encoded = [prompt_weights.blend(states[span], plan).to(states.dtype) if plan
               else states[span][0, :, :max(1, len(ids))]
               for span, plan, ids in zip(spans, plans, prompt_ids)]         # each [S, T_b, D]
    lengths = [e.shape[1] for e in encoded]
    out = torch.zeros(len(prompts), len(picked), max(lengths), states.shape[3], dtype=states.dtype)
    mask = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for b, e in enumerate(encoded):
        out[b, :, :lengths[b]] = e
        mask[b, :lengths[b]] = 1
    return PromptEncoding(out, mask, picked, truncated)


def prompt_states(model, prefix_ids: list[int], prompt_ids: list[list[int]], picked: list[int], device,
                  contributions: bool, on_block: Callable[[int, int], None] | None,
                  prefix_cache: PrefixCache | None, weights_key) -> torch.Tensor:
    """[N, S, T, D] in the model's dtype: the picked hidden states of each prompt's tokens after the prefix, 0 past a
    prompt's end (an empty prompt: one all-zero token)."""
    lengths = [len(ids) for ids in prompt_ids]
    out = torch.zeros(len(prompt_ids), len(picked), max(1, max(lengths)), hidden_size(model), dtype=model.dtype)
    if max(lengths) == 0:
        return out
    past = None
    if prefix_cache is not None and prefix_ids and reuses_prefix(model, len(prefix_ids) + max(lengths)):
        past = prefix_cache.get(model, prefix_ids, device, weights_key)
    with report_blocks(model, on_block):
        states = forward_prompts(model, prefix_ids, prompt_ids, device, past)
    selected = torch.stack([states[i] for i in picked], dim=1).to(out.device)  # [N, S, T, D]
    for b, n in enumerate(lengths):
        out[b, :, :n] = selected[b, :, :n]
    if contributions:
        alone = token_alone_states(model, prefix_ids, prompt_ids, picked, device, past)
        for b, ids in enumerate(prompt_ids):
            if ids:
                out[b, :, :len(ids)] -= torch.stack([alone[i] for i in ids], dim=1).to(out.dtype)
    return out


def token_alone_states(model, prefix_ids: list[int], prompt_ids: list[list[int]], picked: list[int], device,
                       prefix_past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[int, torch.Tensor]:
    """token id -> [S, D]: the picked hidden states of that token as a one-token prompt, after the same prefix (BOS,
    instruction, chat template) as every prompt, so that it sits where a prompt's tokens sit and not at position 0,
    whose states are the attention sink's. One batch over the distinct tokens."""
    unique = sorted({i for ids in prompt_ids for i in ids})
    states = forward_prompts(model, prefix_ids, [[token] for token in unique], device, prefix_past)
    selected = torch.stack([states[i][:, -1] for i in picked], dim=1).cpu()  # [U, S, D]
    return {token: selected[u] for u, token in enumerate(unique)}


@contextlib.contextmanager
def no_forward_cycles(model):
    """transformers 4.5x records hidden states by swapping each block's forward and "restores" it as a bound method
    in the block's __dict__: block -> method -> block, a cycle that only the cyclic GC frees, so a replaced LLM
    would stay in memory until the cyclic GC runs. Drop those leftovers."""
    try:
        yield
    finally:
        for module in model.modules():
            forward = module.__dict__.get("forward")
            if getattr(forward, "__self__", None) is module and \
                    getattr(forward, "__func__", None) is type(module).forward:
                del module.__dict__["forward"]


@contextlib.contextmanager
def report_blocks(model, on_block: Callable[[int, int], None] | None):
    """Calls on_block(i, L) after block i; raising there (an interrupt) stops the forward between blocks."""
    if on_block is None:
        yield
        return
    layers = decoder_layers(model)

    def after(i):
        def hook(module, args, output):  # returns None: a hook's return value would replace the block's output
            on_block(i, len(layers))
        return hook

    handles = [layer.register_forward_hook(after(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
