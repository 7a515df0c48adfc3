"""Text generation with the frozen LLM that also encodes the prompts: same weights, same chat template handling.

LI-DiT's instruction asks the LLM to *describe* the image; here the LLM writes that description out, so that a short
prompt can be expanded before it is encoded. Sampling is transformers' `generate`, seeded on a forked RNG so that a
seed gives the same text every time without touching anyone else's random stream.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from . import gguf_weights, llm_encoder

EXPAND_INSTRUCTION = (
    "Rewrite the user's short image prompt as one detailed description of the picture: the objects, their colors, "
    "shapes, sizes, number and positions. Keep everything the prompt asks for and add nothing that contradicts it. "
    "Answer with the description only."
)
GENERATE_PRESETS = {"expand": EXPAND_INSTRUCTION, "li-dit": llm_encoder.LI_DIT_INSTRUCTION, "none": None}


class _NotFinite(Exception):
    pass


@contextlib.contextmanager
def _finite_logits(model):
    """Stops the answer at the first LM-head output holding NaN or inf (a half-precision overflow), before sampling
    turns it into an error or greedy decoding into an empty answer."""
    def check(module, args, out):
        if not bool(torch.isfinite(out).all()):
            raise _NotFinite
    handle = model.get_output_embeddings().register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()


class _EachToken(StoppingCriteria):
    """Called by `generate` after every new token: reports progress and lets the caller interrupt by raising."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token, self.count = on_token, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.count += 1
        self.on_token(self.count)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def dense_head(model, device):
    """The LM head in GGUF blocks, dequantized on `device` once for the whole answer rather than for every token: it is
    the LLM's largest matrix (a tied head is the embedding table), and the same for every token."""
    head = model.get_output_embeddings()
    if not isinstance(head, gguf_weights.GGUFLayer) or head.weight.is_floating_point():
        yield
        return
    blocks = head._parameters["weight"]
    head._parameters["weight"] = torch.nn.Parameter(head.dequantize_weight(blocks.to(device)), requires_grad=False)
    try:
        yield
    finally:
        head._parameters["weight"] = blocks


def chat_ids(tokenizer, prompt: str, *, instruction: str | None, use_chat_template: bool) -> list[int]:
    """The prompt as the model's turn-taking expects it, ending where its answer starts. The template's markers are
    control tokens; the instruction and the prompt are plain text, so a typed "<|im_end|>" never ends the turn."""
    llm_encoder.check_text(prompt, "prompt")
    prefix = llm_encoder.tokenize_prefix(tokenizer, instruction, use_chat_template)  # checks the instruction
    text = tokenizer(prompt.strip(), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    suffix = tokenizer(llm_encoder.prompt_suffix(tokenizer, instruction, use_chat_template),
                       add_special_tokens=False)["input_ids"]
    return list(prefix) + list(text) + list(suffix)


def stop_ids(model, tokenizer, instruction: str | None, use_chat_template: bool) -> list[int]:
    """Tokens that end the answer: the model's end-of-sequence tokens, and the chat template's end of turn (the first
    control token after the prompt), which GGUF files do not always list as an end-of-sequence token."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if llm_encoder.has_chat_template(tokenizer, use_chat_template):
        control = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t)
                                                    for t in tokenizer.get_added_vocab()}
        after = tokenizer(llm_encoder.prompt_suffix(tokenizer, instruction, True), add_special_tokens=False)
        ids.extend([t for t in after["input_ids"] if t in control][:1])
    return list(dict.fromkeys(ids))


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, *, instruction: str | None = EXPAND_INSTRUCTION,
                  use_chat_template: bool = True, max_new_tokens: int = 128, seed: int = 0,
                  temperature: float = 0.7, top_p: float = 0.9, device: torch.device | None = None,
                  on_token: Callable[[int], None] | None = None, name: str | None = None) -> str:
    """The model's answer to `prompt` (special tokens removed). temperature 0: greedy decoding, the same for every
    seed; above 0: sampling with nucleus top_p, the same text for the same seed. Logits that overflow half precision
    write the answer again in float32, with a warning naming the LLM (`name`), as encode_prompts does."""
    if max_new_tokens < 1:
        raise llm_encoder.LLMError(f"max_new_tokens is {max_new_tokens}: generate at least 1 token.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise llm_encoder.LLMError(f"temperature {temperature} / top_p {top_p}: temperature must be >= 0 (0 is "
                                   "greedy) and top_p in (0, 1].")
    device = torch.device(device or next(model.parameters()).device)
    ids = torch.tensor([chat_ids(tokenizer, prompt, instruction=instruction, use_chat_template=use_chat_template)],
                       dtype=torch.long, device=device)  # [1, P]
    stops = stop_ids(model, tokenizer, instruction, use_chat_template)
    sample = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1,
                              temperature=temperature if sample else None, top_p=top_p if sample else None,
                              top_k=None, eos_token_id=stops or None,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else (stops[0] if stops else 0))

    def answer() -> str:
        criteria = StoppingCriteriaList([_EachToken(on_token)] if on_token else [])
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                llm_encoder.no_forward_cycles(model), dense_head(model, device), _finite_logits(model):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 stopping_criteria=criteria)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    try:
        return answer()
    except _NotFinite:
        pass
    with llm_encoder.in_float32_after_overflow(model, name, "logits", "an empty or broken answer"):
        try:
            return answer()
        except _NotFinite:
            raise llm_encoder.broken_weights(model, name, "logits") from None
