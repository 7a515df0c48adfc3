"""adapters.llm_encoder on tiny offline models of every supported architecture."""
from __future__ import annotations

import copy
import gc
import logging
import os
import shutil
import weakref

import pytest
import torch
from transformers import AutoTokenizer

from adapters import llm_encoder
from adapters.llm_encoder import (
    INSTRUCTION_PRESETS,
    LI_DIT_INSTRUCTION,
    SUPPORTED_MODEL_TYPES,
    LLMError,
    PrefixCache,
    encode_prompts,
    load_llm,
    num_hidden_states,
    parse_layers,
    prompt_prefix,
    report_blocks,
)

PROMPT = "a red circle on the left and a blue square at the top"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prompt_ids(tok, prompt: str) -> list[int]:
    return tok(prompt, add_special_tokens=False)["input_ids"]


def find_last(seq: list[int], sub: list[int]) -> int:
    for start in range(len(seq) - len(sub), -1, -1):
        if seq[start:start + len(sub)] == sub:
            return start
    raise AssertionError(f"{sub} not in {seq}")


def reference_states(model, tok, prompt: str, instruction: str | None, chat: bool) -> torch.Tensor:
    """Plain transformers: the whole conversation (template suffix included) in one forward pass, sliced at the
    prompt's positions. [L+1, T, D]."""
    if chat:
        messages = [{"role": "user", "content": prompt}]
        if instruction:
            messages.insert(0, {"role": "system", "content": instruction})
        try:
            text = tok.apply_chat_template(messages, tokenize=False)
        except Exception:  # no system role: the instruction leads the user turn
            text = tok.apply_chat_template([{"role": "user", "content": f"{instruction}\n{prompt}"}], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tok(f"{instruction}\n{prompt}" if instruction else prompt)["input_ids"]
    sub = prompt_ids(tok, prompt)
    start = find_last(ids, sub)
    with torch.no_grad():
        states = model.get_decoder()(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.stack([s[0, start:start + len(sub)] for s in states])


# ---------------------------------------------------------------------------------------------------------------
# Loading and shapes, every architecture


def test_load_every_architecture(arch, arch_specs, llm_loader):
    model, tok = llm_loader(arch)
    hidden, layers, _ = arch_specs[arch]
    assert model.config.model_type == ("gemma3_text" if arch == "gemma3" else arch)
    assert model.config.model_type in SUPPORTED_MODEL_TYPES
    assert num_hidden_states(model) == layers + 1
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())

    prompts = ["a red circle", "two blue squares on the left"]
    enc = encode_prompts(model, tok, prompts, layers="all")
    T = max(len(prompt_ids(tok, p)) for p in prompts)
    assert enc.hidden_states.shape == (2, layers + 1, T, hidden)
    assert enc.layers == list(range(layers + 1))
    assert enc.truncated == [0, 0]
    assert torch.isfinite(enc.hidden_states).all()


@pytest.mark.parametrize("instruction", ["none", "li-dit"])
def test_prompt_tokens_match_plain_transformers(arch, instruction, arch_specs, llm_loader):
    model, tok = llm_loader(arch)
    chat = arch_specs[arch][2] is not None
    instr = INSTRUCTION_PRESETS[instruction]
    enc = encode_prompts(model, tok, [PROMPT], instruction=instr, use_chat_template=True, layers="all")
    ref = reference_states(model, tok, PROMPT, instr, chat)
    assert enc.hidden_states.shape[1:] == ref.shape
    torch.testing.assert_close(enc.hidden_states[0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_chat_template_can_be_turned_off(arch, llm_loader):
    model, tok = llm_loader(arch)
    enc = encode_prompts(model, tok, [PROMPT], instruction=LI_DIT_INSTRUCTION, use_chat_template=False)
    ref = reference_states(model, tok, PROMPT, LI_DIT_INSTRUCTION, chat=False)
    torch.testing.assert_close(enc.hidden_states[0], ref, atol=1e-5, rtol=1e-5)
    with_template = encode_prompts(model, tok, [PROMPT], instruction=LI_DIT_INSTRUCTION, use_chat_template=True)
    assert not torch.allclose(enc.hidden_states[0, -1], with_template.hidden_states[0, -1], atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])  # no template, ChatML, template without system
def test_instruction_tokens_are_stripped_but_condition_the_prompt(arch, llm_loader):
    model, tok = llm_loader(arch)
    n = len(prompt_ids(tok, PROMPT))
    plain = encode_prompts(model, tok, [PROMPT], instruction=None)
    instructed = encode_prompts(model, tok, [PROMPT], instruction=LI_DIT_INSTRUCTION)
    for enc in (plain, instructed):
        assert enc.hidden_states.shape[2] == n
        assert enc.attention_mask.tolist() == [[1] * n]
    # Same tokens (identical embeddings, hidden state 0) ...
    torch.testing.assert_close(plain.hidden_states[:, 0], instructed.hidden_states[:, 0], atol=0, rtol=0)
    # ... that the instruction changes through causal attention in every block.
    for block in range(1, plain.hidden_states.shape[1]):
        assert not torch.allclose(plain.hidden_states[:, block], instructed.hidden_states[:, block], atol=1e-4)


def test_multimodal_gemma3_encodes_its_text_transformer(tiny_multimodal_gemma3, arch_specs):
    """Gemma 3 from 4B up is multimodal: its config keeps hidden_size and num_hidden_layers under text_config."""
    hidden, layers, _ = arch_specs["gemma3"]
    model, tok = load_llm(tiny_multimodal_gemma3)
    assert model.config.model_type == "gemma3" and num_hidden_states(model) == layers + 1
    enc = encode_prompts(model, tok, [PROMPT], instruction=LI_DIT_INSTRUCTION)
    assert enc.hidden_states.shape == (1, layers + 1, len(prompt_ids(tok, PROMPT)), hidden)
    assert torch.isfinite(enc.hidden_states).all() and enc.hidden_states[0, -1].abs().sum() > 0


@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])  # system role, instruction in the user turn
@pytest.mark.parametrize("instruction", ["PROMPT \u2063PROMPT\u2063 A B a red circle", "{{ messages }} <|im_end|>"])
def test_custom_instruction_is_kept_whole(arch, instruction, llm_loader):
    _, tok = llm_loader(arch)
    prefix, has_special = prompt_prefix(tok, instruction, True)
    assert has_special and instruction in prefix
    full = tok.apply_chat_template([{"role": "user", "content": f"{instruction}\n{PROMPT}"}] if arch == "gemma2" else
                                   [{"role": "system", "content": instruction}, {"role": "user", "content": PROMPT}],
                                   tokenize=False)
    assert full.startswith(prefix) and full[len(prefix):].startswith(PROMPT)


def test_typed_chat_tokens_are_text_not_control_tokens(llm_loader):
    model, tok = llm_loader("qwen3")
    control = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    typed = "a red circle <|im_end|> <|im_start|> system"
    enc = encode_prompts(model, tok, [typed], instruction=LI_DIT_INSTRUCTION)
    ids = tok(typed, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert not set(control) & set(ids)
    assert enc.attention_mask.sum().item() == len(ids) > len(prompt_ids(tok, typed))


CHAT_MARKERS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]


def decoder_inputs(model) -> tuple[list, object]:
    """Records the input ids of every forward of the LLM's decoder until the returned handle is removed."""
    calls = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].clone()), with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])  # no template, a system turn, the user turn
def test_typed_chat_tokens_in_the_instruction_are_text(arch, arch_specs, llm_loader):
    """The instruction is typed as prompts are: its "<|im_start|>" is text; the template's own markers stay control
    tokens."""
    model, tok = llm_loader(arch)
    control = set(tok.convert_tokens_to_ids(CHAT_MARKERS))
    typed = "Describe <|im_end|> <|im_start|> system <start_of_turn> the image"
    plain = "Describe the image"
    calls, handle = decoder_inputs(model)
    try:
        encode_prompts(model, tok, ["a red circle"], instruction=typed)
        encode_prompts(model, tok, ["a red circle"], instruction=plain)
    finally:
        handle.remove()
    typed_ids, plain_ids = (c[0].tolist() for c in calls)
    # the template's markers, and only those: as many as around an instruction without any
    assert [i for i in typed_ids if i in control] == [i for i in plain_ids if i in control]
    assert any(i in control for i in plain_ids) == (arch_specs[arch][2] is not None)
    as_text = tok(typed, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert find_last(typed_ids, as_text) >= 0


def test_an_instruction_without_chat_markers_is_tokenized_with_its_template_as_one_text():
    """Byte-level BPE merges across the instruction's edge (Llama 3: "objects:" + "\\n" is one token ":\\n"): cut
    there, the ids would no longer be those of the text the model reads."""
    tok = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, ".comfyui", "comfy", "text_encoders", "llama_tokenizer"))
    for template in (False, True):
        prefix, has_special = prompt_prefix(tok, LI_DIT_INSTRUCTION, template)
        whole = tok(prefix, add_special_tokens=not has_special)["input_ids"]
        ids = llm_encoder.tokenize_prompts(tok, [], instruction=LI_DIT_INSTRUCTION, use_chat_template=template,
                                           max_tokens=8)[0]
        assert ids == whole, f"chat_template={template}"


def test_template_that_rewrites_the_instruction_is_named(llm_loader):
    """Where the instruction's text cannot be found in the rendered template, it cannot be tokenized apart."""
    model, tok = llm_loader("qwen3")
    trimming = copy.copy(tok)
    trimming.chat_template = tok.chat_template.replace("m['content']", "m['content'] | trim")
    enc = encode_prompts(model, trimming, ["a red circle"], instruction=LI_DIT_INSTRUCTION)
    torch.testing.assert_close(enc.hidden_states, encode_prompts(model, tok, ["a red circle"],
                                                                 instruction=LI_DIT_INSTRUCTION).hidden_states)
    typed = f" <|im_start|> {LI_DIT_INSTRUCTION}\n"
    with pytest.raises(LLMError, match="does not write the instruction once and as it was given.*Remove the chat "
                                       "markers"):
        encode_prompts(model, trimming, ["a red circle"], instruction=typed)


@pytest.mark.parametrize("where", ["prompt", "instruction"])
def test_lone_surrogate_is_named_with_its_place(where, llm_loader):
    """A lone surrogate (half of a UTF-16 pair, as a broken copy and paste leaves) is no text a tokenizer takes."""
    model, tok = llm_loader("qwen3")
    text = "a blue square \ud800 top right"
    prompt, instruction = (text, LI_DIT_INSTRUCTION) if where == "prompt" else ("a blue square", text)
    with pytest.raises(LLMError) as err:
        encode_prompts(model, tok, ["a red circle", prompt], instruction=instruction)
    msg = str(err.value)
    assert "\\ud800" in msg and "character 15" in msg
    assert ("prompt 2" if where == "prompt" else "instruction") in msg
    assert "Remove it" in msg


def test_chat_template_date_is_pinned(llm_loader):
    """Llama 3.x templates print today's date: the same prompt must encode the same on every day."""
    _, tok = llm_loader("qwen3")
    dated = copy.copy(tok)
    dated.chat_template = "{{ strftime_now('%Y-%m-%d') }} {{ date_string | default('none') }}\n" + tok.chat_template
    prefix, _ = prompt_prefix(dated, LI_DIT_INSTRUCTION, True)
    assert prefix.startswith("2024-07-26 26 Jul 2024\n")


# ---------------------------------------------------------------------------------------------------------------
# Batches, masks, empty and long prompts


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3"])
def test_batch_padding_masks_and_independence(arch, llm_loader):
    model, tok = llm_loader(arch)
    prompts = ["a red circle", PROMPT, "three green triangles"]
    counts = [len(prompt_ids(tok, p)) for p in prompts]
    enc = encode_prompts(model, tok, prompts, instruction=LI_DIT_INSTRUCTION)
    assert enc.hidden_states.shape[2] == max(counts)
    assert enc.attention_mask.sum(1).tolist() == counts
    for b, (p, n) in enumerate(zip(prompts, counts)):
        assert enc.attention_mask[b, :n].eq(1).all() and enc.attention_mask[b, n:].eq(0).all()
        assert enc.hidden_states[b, :, n:].eq(0).all()
        alone = encode_prompts(model, tok, [p], instruction=LI_DIT_INSTRUCTION)
        torch.testing.assert_close(enc.hidden_states[b, :, :n], alone.hidden_states[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_empty_prompt_is_one_zero_token(arch, arch_specs, llm_loader):
    model, tok = llm_loader(arch)
    hidden, layers, _ = arch_specs[arch]
    alone = encode_prompts(model, tok, [""], instruction=LI_DIT_INSTRUCTION)
    assert alone.hidden_states.shape == (1, layers + 1, 1, hidden)
    assert alone.hidden_states.eq(0).all()
    assert alone.attention_mask.tolist() == [[1]]

    mixed = encode_prompts(model, tok, ["   ", "a red circle"], instruction=LI_DIT_INSTRUCTION)
    assert mixed.attention_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert mixed.hidden_states[0].eq(0).all()
    assert mixed.hidden_states[1].abs().sum() > 0


def test_long_prompt_is_truncated_with_a_warning(llm_loader, caplog):
    model, tok = llm_loader("llama")
    n = len(prompt_ids(tok, PROMPT))
    limit = 5
    with caplog.at_level(logging.WARNING, logger="adapters.llm_encoder"):
        enc = encode_prompts(model, tok, [PROMPT, "a red circle"], max_tokens=limit)
    assert enc.truncated == [n - limit, 0]
    assert enc.hidden_states.shape[2] == limit
    assert enc.attention_mask.sum(1).tolist() == [limit, 3]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "limit" in warnings[0].getMessage() and str(n - limit) in warnings[0].getMessage()
    # The kept tokens are the prompt's first `limit` words (one word = one token here), encoded as usual.
    head = encode_prompts(model, tok, [" ".join(PROMPT.split()[:limit])])
    torch.testing.assert_close(enc.hidden_states[0], head.hidden_states[0], atol=1e-5, rtol=1e-5)


def test_no_prompt_is_an_error(llm_loader):
    model, tok = llm_loader("llama")
    with pytest.raises(LLMError, match="No prompt"):
        encode_prompts(model, tok, [])


def test_layer_selection_picks_hidden_states(llm_loader):
    model, tok = llm_loader("llama")
    full = encode_prompts(model, tok, [PROMPT], layers="all")
    for spec, picked in (("last", [3]), ("-3", [1]), ("0,2,-1", [0, 2, 3])):
        enc = encode_prompts(model, tok, [PROMPT], layers=spec)
        assert enc.layers == picked
        torch.testing.assert_close(enc.hidden_states, full.hidden_states[:, picked], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# parse_layers


@pytest.mark.parametrize("spec, expected", [
    ("all", [0, 1, 2, 3, 4]), (" ALL ", [0, 1, 2, 3, 4]), ("last", [4]), ("-3", [2]), ("0,2,-1", [0, 2, 4]),
    ("4", [4]), ("-5", [0]), ("1, 3", [1, 3]),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 5) == expected


@pytest.mark.parametrize("spec", ["5", "-6", "0,7", "100"])
def test_parse_layers_out_of_range_names_the_valid_range(spec):
    with pytest.raises(LLMError, match=r"0\.\.4"):
        parse_layers(spec, 5)


@pytest.mark.parametrize("spec", ["abc", "1,x", "first", "1.5"])
def test_parse_layers_garbage(spec):
    with pytest.raises(LLMError, match="'all', 'last'"):
        parse_layers(spec, 5)


def test_parse_layers_empty_list():
    with pytest.raises(LLMError, match="empty"):
        parse_layers(",", 5)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_path(tmp_path):
    with pytest.raises(LLMError, match="not found"):
        load_llm(str(tmp_path / "nope"))


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "model.pth", "model.ckpt"])
def test_pickled_file_is_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04\x95" + os.urandom(64))
    with pytest.raises(LLMError, match="pickled"):
        load_llm(str(path))


def test_other_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(LLMError, match="not an LLM"):
        load_llm(str(path))


def test_folder_with_only_pickled_weights_is_refused(tmp_path, tiny_llm_dirs):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(os.path.join(tiny_llm_dirs["llama"], "config.json"), folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95" + os.urandom(64))
    with pytest.raises(LLMError, match="no .safetensors.*pytorch_model.bin"):
        load_llm(str(folder))


def test_folder_without_config_is_refused(tmp_path, tiny_llm_dirs):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    shutil.copy(os.path.join(tiny_llm_dirs["llama"], "model.safetensors"), folder)
    with pytest.raises(LLMError, match="no config.json"):
        load_llm(str(folder))


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(LLMError, match="Cannot read the LLM config"):
        load_llm(str(path))


def test_truncated_safetensors_in_folder(tmp_path, tiny_llm_dirs):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llm_dirs["llama"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LLMError, match="truncated or corrupt"):
        load_llm(str(folder))


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)).save_pretrained(
        folder, safe_serialization=True)
    with pytest.raises(LLMError) as err:
        load_llm(str(folder))
    msg = str(err.value)
    assert "'gpt2'" in msg
    assert all(t in msg for t in SUPPORTED_MODEL_TYPES)


# ---------------------------------------------------------------------------------------------------------------
# Block hooks: low-VRAM streaming and per-block progress / interrupts


def hooks(model) -> set:
    return {(name, kind, key) for name, m in model.named_modules()
            for kind, registry in (("pre", m._forward_pre_hooks), ("post", m._forward_hooks)) for key in registry}


def library_hooks(model, tok) -> set:
    """The hooks on the model after a plain forward: transformers 5 installs output-capturing hooks of its own on
    the first forward and keeps them. Ours must come and go on top of these."""
    encode_prompts(model, tok, ["a red circle"])
    return hooks(model)



def test_report_blocks_calls_once_per_block_in_order(arch_specs, llm_loader):
    model, tok = llm_loader("llama")
    before = library_hooks(model, tok)
    calls = []
    enc = encode_prompts(model, tok, [PROMPT, "a red circle"], on_block=lambda i, n: calls.append((i, n)))
    L = arch_specs["llama"][1]
    assert calls == [(i, L) for i in range(L)]
    assert hooks(model) == before
    torch.testing.assert_close(enc.hidden_states, encode_prompts(model, tok, [PROMPT, "a red circle"]).hidden_states,
                               atol=0, rtol=0)


class Interrupted(Exception):
    pass


def test_exception_in_on_block_stops_the_forward(llm_loader):
    model, tok = llm_loader("llama")
    before = library_hooks(model, tok)
    calls, final_norm_ran = [], []
    norm_hook = model.get_decoder().norm.register_forward_hook(lambda *a: final_norm_ran.append(True))

    def on_block(i, n):
        calls.append(i)
        if i == 0:
            raise Interrupted

    try:
        with pytest.raises(Interrupted):
            encode_prompts(model, tok, [PROMPT], on_block=on_block)
    finally:
        norm_hook.remove()
    assert calls == [0]
    assert not final_norm_ran
    assert hooks(model) == before


def test_a_dropped_model_is_freed_without_the_cyclic_gc(tiny_llm_dirs):
    """ComfyUI replaces the LLM when the loader's inputs change: the old one must go as soon as it is dropped, also
    while its prefix cache lives on."""
    model, tok = load_llm(tiny_llm_dirs["llama"])
    prefix_cache = PrefixCache()
    encode_prompts(model, tok, [PROMPT], on_block=lambda i, n: None, prefix_cache=prefix_cache)
    assert prefix_cache.past
    blocks = [weakref.ref(b) for b in model.get_decoder().layers]
    gc.disable()
    try:
        del model
        assert all(b() is None for b in blocks)
    finally:
        gc.enable()


def test_report_blocks_without_callback_adds_no_hooks(llm_loader):
    model, tok = llm_loader("llama")
    before = library_hooks(model, tok)
    with report_blocks(model, None):
        assert hooks(model) == before


@pytest.mark.parametrize("arch, instruction", [("llama", None), ("llama", LI_DIT_INSTRUCTION),
                                               ("qwen3", LI_DIT_INSTRUCTION), ("gemma3", None)])
def test_contributions_are_the_states_minus_each_token_in_a_one_token_prompt(arch, instruction, llm_loader):
    """Block contributions: a token's hidden state in the prompt minus its hidden state in a prompt of that token
    alone, with the same prefix (BOS, instruction, chat template) as the LLM sees any prompt; the embeddings
    contribute nothing. The one-token runs are one batch over the prompts' distinct tokens."""
    model, tok = llm_loader(arch)
    prompts = [PROMPT, "a red circle"]
    states = encode_prompts(model, tok, prompts, instruction=instruction, layers="all")
    calls, handle = decoder_inputs(model)
    try:
        contributions = encode_prompts(model, tok, prompts, instruction=instruction, layers="all", contributions=True)
    finally:
        handle.remove()
    prefix = llm_encoder.tokenize_prompts(tok, [], instruction=instruction, use_chat_template=True, max_tokens=64)[0]
    assert prefix  # BOS at least: what the one-token run must not leave out
    distinct = {t for p in prompts for t in prompt_ids(tok, p)}
    assert len(calls) == 2 and sorted(calls[1][:, -1].tolist()) == sorted(distinct)
    assert torch.equal(contributions.attention_mask, states.attention_mask)
    for b, prompt in enumerate(prompts):
        ids = prompt_ids(tok, prompt)
        n = int(states.attention_mask[b].sum())
        assert n == len(ids)
        for t, token in enumerate(ids):
            alone = model.get_decoder()(input_ids=torch.tensor([prefix + [token]]), output_hidden_states=True)
            alone = torch.stack([h[0, -1] for h in alone.hidden_states])              # [L+1, D]
            torch.testing.assert_close(contributions.hidden_states[b, :, t], states.hidden_states[b, :, t] - alone,
                                       atol=1e-5, rtol=1e-5)
        assert contributions.hidden_states[b, 0, :n].abs().max() < 1e-6               # embeddings: no context
        assert contributions.hidden_states[b, -1, 1:n].abs().mean() > 1e-3            # later tokens: context


@pytest.mark.parametrize("arch, instruction", [("llama", None), ("llama", LI_DIT_INSTRUCTION),
                                               ("qwen3", LI_DIT_INSTRUCTION), ("gemma2", None)])
def test_a_one_token_prompt_contributes_nothing(arch, instruction, llm_loader):
    """Its own run is the token-alone run: zero in every block. Also the first token of any prompt, which sees
    nothing of the prompt before it."""
    model, tok = llm_loader(arch)
    for prompt in ("circle", "red", PROMPT):
        enc = encode_prompts(model, tok, [prompt], instruction=instruction, contributions=True)
        largest = enc.hidden_states[0, :, 0].abs().max().item()
        assert largest < 1e-5, f"'{prompt}': its first token contributes up to {largest}"


# ---------------------------------------------------------------------------------------------------------------
# The prefix's keys and values, computed once

# fp32 keeps 24 significant bits (eps = 2^-23, 1.2e-7 of a value). With the prefix cached, each block's matmuls have
# other shapes and add their products up in another order: every block rounds differently by a few eps of its
# largest values, and the blocks after it carry that on. 2^-16 (128 eps) of the largest value of a hidden state
# bounds that for 30 blocks with room to spare, while a wrong mask, position or prefix moves states by percents.
ROUNDING = 2 ** -16


def assert_equal_up_to_rounding(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None):
    """got, ref [B, S, T, D]; the tolerance is ROUNDING of the largest value of each hidden state in `scale` (the
    states themselves, or for contributions the states they were taken from)."""
    scale = ref if scale is None else scale
    assert got.shape == ref.shape
    largest = scale.abs().amax(dim=(0, 2, 3))                                        # [S]
    error = (got - ref).abs().amax(dim=(0, 2, 3))                                    # [S]
    assert (error <= ROUNDING * largest).all(), f"{(error / largest).max().item():.1e} of the largest value"


def prefix_length(tok, instruction, chat: bool) -> int:
    return len(llm_encoder.tokenize_prefix(tok, instruction, chat))


SHORT_PROMPTS = ["a red circle", "", "two blue squares"]  # three lengths, one empty


@pytest.mark.parametrize("instruction", ["none", "li-dit", "custom"])
def test_a_cached_prefix_gives_the_full_forwards_states(arch, instruction, llm_loader):
    """Every block, a batch of different lengths with an empty prompt, the template on and off, block contributions.
    The tiny Gemmas slide a 16-token window, which the LI-DiT prefix overflows: they run it in full (tested below)."""
    model, tok = llm_loader(arch)
    instr = {"none": None, "li-dit": LI_DIT_INSTRUCTION, "custom": "photo of the quick brown fox"}[instruction]
    for chat in (True, False):
        prefix_cache = PrefixCache()
        for contributions in (False, True):
            options = dict(instruction=instr, use_chat_template=chat, layers="all", contributions=contributions)
            ref = encode_prompts(model, tok, SHORT_PROMPTS, **options)
            got = encode_prompts(model, tok, SHORT_PROMPTS, prefix_cache=prefix_cache, **options)
            scale = encode_prompts(model, tok, SHORT_PROMPTS, **(options | {"contributions": False})).hidden_states
            assert torch.equal(got.attention_mask, ref.attention_mask)
            assert_equal_up_to_rounding(got.hidden_states, ref.hidden_states, scale)
            assert got.hidden_states[:, 1:].abs().amax() > 0 and got.hidden_states[1].eq(0).all()
        if prefix_length(tok, instr, chat) == 0:  # no BOS, no instruction, no template: nothing to keep
            assert prefix_cache.key is None
        else:
            assert bool(prefix_cache.past) == (arch not in ("gemma2", "gemma3") or instruction != "li-dit")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_a_sequence_longer_than_the_sliding_window_runs_in_full(arch, llm_loader):
    """Within the window every block attends to every earlier token and the cached prefix serves; one token past it
    the forward runs prefix and prompt together, as without a cache."""
    model, tok = llm_loader(arch)
    window = model.config.sliding_window
    P = prefix_length(tok, None, True)
    words = "the quick brown fox jumps over the lazy dog on the mat photo of a cat".split()
    for length, cached in ((window - P, True), (window - P + 1, False)):
        prompt = " ".join(words[:length])
        assert len(prompt_ids(tok, prompt)) == length
        prefix_cache = PrefixCache()
        calls, handle = decoder_inputs(model)
        try:
            got = encode_prompts(model, tok, [prompt, "a red circle"], instruction=None, prefix_cache=prefix_cache)
        finally:
            handle.remove()
        ref = encode_prompts(model, tok, [prompt, "a red circle"], instruction=None)
        assert bool(prefix_cache.past) == cached
        assert [c.shape[1] for c in calls] == ([P, length] if cached else [P + length])
        assert_equal_up_to_rounding(got.hidden_states, ref.hidden_states)


def test_the_prefix_cache_is_keyed_by_what_the_prefix_depends_on(llm_loader):
    """Model, weights (ComfyUI's patches), instruction, template and dtype: each change runs a new prefix, which
    replaces the old one. An unchanged prefix runs only the prompts' tokens and never changes the stored tensors."""
    model, tok = llm_loader("qwen3")
    prefix_cache = PrefixCache()

    def encode(m=model, **options):
        calls, handle = decoder_inputs(m)
        try:
            enc = encode_prompts(m, tok, ["a red circle", PROMPT], prefix_cache=prefix_cache,
                                 **({"instruction": LI_DIT_INSTRUCTION} | options))
        finally:
            handle.remove()
        return enc, [c.shape for c in calls]

    P = prefix_length(tok, LI_DIT_INSTRUCTION, True)
    T = len(prompt_ids(tok, PROMPT))
    _, shapes = encode()
    assert shapes == [(1, P), (2, T)]
    stored = [(k.clone(), v.clone()) for k, v in prefix_cache.past]
    key, past = prefix_cache.key, prefix_cache.past
    _, shapes = encode(contributions=True)
    assert shapes == [(2, T), (len({*prompt_ids(tok, PROMPT), *prompt_ids(tok, "a red circle")}), 1)]
    assert prefix_cache.key == key and prefix_cache.past is past
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(past, stored))

    del past, stored
    keys = {key}
    other = copy.deepcopy(model)
    for change in (dict(instruction=None), dict(instruction="photo of the quick brown fox"),
                   dict(use_chat_template=False), dict(weights_key="patched"), dict(m=other)):
        old = weakref.ref(prefix_cache.past[0][0])
        _, shapes = encode(**change)
        assert len(shapes) == 2 and shapes[0][0] == 1, change  # the prefix ran again ...
        assert prefix_cache.key not in keys, change
        keys.add(prefix_cache.key)
        assert old() is None, change                           # ... and the old one is gone
    other.to(torch.float64)
    _, shapes = encode(m=other)
    assert len(shapes) == 2 and prefix_cache.key not in keys and prefix_cache.past[0][0].dtype == torch.float64


def test_the_prefix_cache_is_keyed_by_the_device(llm_loader):
    """Another device computes the prefix again there. Two names of the CPU stand in for two devices, which this
    test cannot assume; on a machine with CUDA the model also moves there and back."""
    model, tok = llm_loader("llama")
    want = encode_prompts(model, tok, [PROMPT]).hidden_states
    model = copy.deepcopy(model)  # one model object throughout: only the device changes
    prefix_cache = PrefixCache()
    devices = [torch.device("cpu"), torch.device("cpu", 0)] + ([torch.device("cuda")] if torch.cuda.is_available()
                                                                else [])
    computed = None
    for device in devices + devices[:1]:
        got = encode_prompts(model.to(device), tok, [PROMPT], prefix_cache=prefix_cache, device=device)
        assert prefix_cache.past is not computed, f"the prefix computed for another device was reused on {device}"
        computed = prefix_cache.past
        assert all(k.device.type == device.type for k, _ in computed)
        assert_equal_up_to_rounding(got.hidden_states.cpu(), want)


def test_progress_and_interrupts_with_a_cached_prefix(arch_specs, llm_loader):
    """on_block reports the prompts' forward once per block, whether the prefix ran before it or came from the
    cache; an interrupt leaves a cache that still serves."""
    model, tok = llm_loader("llama")
    before = library_hooks(model, tok)
    L = arch_specs["llama"][1]
    prefix_cache = PrefixCache()
    for _ in range(2):  # computing the prefix, then reusing it
        calls = []
        encode_prompts(model, tok, [PROMPT], prefix_cache=prefix_cache, on_block=lambda i, n: calls.append((i, n)))
        assert calls == [(i, L) for i in range(L)]

    def interrupt(i, n):
        if i == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        encode_prompts(model, tok, [PROMPT], prefix_cache=prefix_cache, on_block=interrupt)
    assert hooks(model) == before
    assert_equal_up_to_rounding(encode_prompts(model, tok, [PROMPT], prefix_cache=prefix_cache).hidden_states,
                                encode_prompts(model, tok, [PROMPT]).hidden_states)


def test_a_half_precision_overflow_is_encoded_again_in_float32_with_a_warning(overflowing_half_llm, caplog):
    model, tok = overflowing_half_llm()
    options = dict(instruction=LI_DIT_INSTRUCTION, layers="all")
    once = llm_encoder.encode_one_pass(model, tok, [PROMPT], **options).hidden_states
    assert not torch.isfinite(once).all()  # what LLM Prompt Encode would have passed on
    before = {name: (p.dtype, p.data_ptr()) for name, p in model.named_parameters()}
    with caplog.at_level("WARNING"):
        enc = encode_prompts(model, tok, [PROMPT], name="tiny-llama.gguf", **options)
    assert torch.isfinite(enc.hidden_states).all() and enc.hidden_states.dtype == torch.float32
    assert "tiny-llama.gguf" in caplog.text and "float16" in caplog.text and "float32" in caplog.text
    reference = copy.deepcopy(model).float()  # the same (half-precision) weights, computed in float32
    assert torch.equal(enc.hidden_states, llm_encoder.encode_one_pass(reference, tok, [PROMPT], **options).hidden_states)
    assert {name: (p.dtype, p.data_ptr()) for name, p in model.named_parameters()} == before  # the very tensors back


def test_an_llm_that_is_not_finite_even_in_float32_is_refused(tiny_llm_dirs):
    model, tok = load_llm(tiny_llm_dirs["llama"], torch.float16)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(LLMError, match="NaN or inf hidden states even in float32: its weights are broken"):
        encode_prompts(model, tok, [PROMPT], name="broken.gguf")
