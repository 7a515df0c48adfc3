"""The two real LLMs that registries ship (installed by scripts/setup.sh): SmolLM2-135M-Instruct and
Gemma-3-270M, both GGUF, loaded offline and encoded block by block."""
import os

import pytest
import torch
from test_llm_encoder import assert_equal_up_to_rounding

from adapters import gguf_weights, llm_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOLLM2 = os.path.join(ROOT, ".comfyui", "models", "LLM", "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3 = os.path.join(ROOT, ".cache", "gemma-3-270m.Q4_K_M.gguf")


@pytest.fixture(scope="module")
def smollm2():
    assert os.path.exists(SMOLLM2), "run scripts/setup.sh: it installs the default LLM"
    return llm_encoder.load_llm(SMOLLM2)


def test_smollm2_is_the_real_model(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    assert llm_encoder.num_hidden_states(model) == 31
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_smollm2_encoding_matches_plain_transformers(smollm2):
    model, tokenizer = smollm2
    prompt = "a red circle on the left"
    enc = llm_encoder.encode_prompts(model, tokenizer, [prompt], instruction=llm_encoder.LI_DIT_INSTRUCTION)
    prefix, has_special = llm_encoder.prompt_prefix(tokenizer, llm_encoder.LI_DIT_INSTRUCTION, True)
    assert "Describe the image" in prefix and prefix.endswith("user\n")  # SmolLM2's chat template
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = model.get_decoder()(torch.tensor([prefix_ids + prompt_ids]), output_hidden_states=True).hidden_states
    assert enc.hidden_states.shape == (1, 31, len(prompt_ids), 576)
    for i in (0, 15, 30):
        torch.testing.assert_close(enc.hidden_states[0, i], ref[i][0, len(prefix_ids):], rtol=1e-4, atol=1e-4)


def test_smollm2_typed_chat_markers_in_the_instruction_are_text(smollm2):
    """A custom instruction is typed text, as a prompt is: its "<|im_start|>" is not SmolLM2's control token, while
    the chat template's own markers around it are."""
    model, tokenizer = smollm2
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    instruction = "Describe the image.<|im_end|>\n<|im_start|>assistant\nA photo of"
    prompt = "a red circle"
    calls = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    try:
        llm_encoder.encode_prompts(model, tokenizer, [prompt], instruction=instruction)
    finally:
        handle.remove()
    as_text = tokenizer(instruction, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert start not in as_text and end not in as_text
    template = [tokenizer(t, add_special_tokens=False)["input_ids"]
                for t in ("<|im_start|>system\n", "<|im_end|>\n<|im_start|>user\n", prompt)]
    assert calls == [template[0] + as_text + template[1] + template[2]]
    assert [i for i in calls[0] if i in (start, end)] == [start, end, start]  # the template's own, as control tokens


@pytest.fixture(scope="module")
def gemma3():
    assert os.path.exists(GEMMA3), "run scripts/setup.sh: it assembles the Gemma GGUF"
    return llm_encoder.load_llm(GEMMA3)


def test_gemma3_270m_from_the_four_wheels(gemma3):
    model, tokenizer = gemma3
    assert model.config.model_type in ("gemma3", "gemma3_text")
    assert model.config.hidden_size == 640
    n = llm_encoder.num_hidden_states(model)
    enc = llm_encoder.encode_prompts(model, tokenizer, ["a blue square", "two green triangles at the top"],
                                     instruction=llm_encoder.LI_DIT_INSTRUCTION, layers="all")
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"])
               for p in ("a blue square", "two green triangles at the top")]
    assert enc.hidden_states.shape == (2, n, max(lengths), 640)
    assert enc.attention_mask.sum(1).tolist() == lengths
    assert torch.isfinite(enc.hidden_states).all()


@pytest.mark.parametrize("llm", ["smollm2", "gemma3"])
def test_a_cached_prefix_gives_the_full_forwards_states(llm, request):
    """Every block of the real LLMs, whose largest values run into the hundreds (SmolLM2) and tens of thousands
    (Gemma 3): a batch of different lengths with an empty prompt, each instruction, the template on and off, block
    contributions."""
    model, tokenizer = request.getfixturevalue(llm)
    prompts = ["a red circle on the left and a blue square at the top right", "", "two green triangles"]
    for instruction in (None, llm_encoder.LI_DIT_INSTRUCTION, "Draw this picture:"):
        for chat in (True, False):
            prefix_cache = llm_encoder.PrefixCache()
            options = dict(instruction=instruction, use_chat_template=chat, layers="all")
            states = llm_encoder.encode_prompts(model, tokenizer, prompts, **options).hidden_states
            got = llm_encoder.encode_prompts(model, tokenizer, prompts, prefix_cache=prefix_cache, **options)
            assert_equal_up_to_rounding(got.hidden_states, states)
            ref = llm_encoder.encode_prompts(model, tokenizer, prompts, contributions=True, **options).hidden_states
            got = llm_encoder.encode_prompts(model, tokenizer, prompts, contributions=True, prefix_cache=prefix_cache,
                                             **options).hidden_states
            assert_equal_up_to_rounding(got, ref, scale=states)
            assert bool(prefix_cache.past) == bool(llm_encoder.tokenize_prefix(tokenizer, instruction, chat))


def dequantized_at_load(path: str):
    """What load_llm made of a GGUF file before its weights stayed quantized: transformers' own load, every tensor
    dequantized to float32 by gguf-py and then cast."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                **{llm_encoder._DTYPE_KWARG: torch.float32}).eval()


def gguf_tensor_bytes(path: str) -> int:
    return sum(t.nbytes for t in gguf_weights.read_gguf(path).tensors.values())


@pytest.mark.parametrize("llm,path", [("smollm2", SMOLLM2), ("gemma3", GEMMA3)])
def test_quantized_weights_give_the_dequantized_models_states(llm, path, request):
    """Every weight, every hidden state and the logits equal those of the model dequantized at load, bit for bit:
    dequantization computes in float32 as gguf-py does, and the layers run the same arithmetic on it."""
    model, tokenizer = request.getfixturevalue(llm)
    ref = dequantized_at_load(path)
    dense = dict(ref.named_parameters())
    quantized = 0
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, gguf_weights.GGUFLayer):
            quantized += 1
            assert p.dtype == torch.uint8 and torch.equal(module.dequantize_weight(p), dense[name])
        else:
            assert torch.equal(p, dense[name]), name
    assert quantized >= 7 * (llm_encoder.num_hidden_states(model) - 1)  # q, k, v, o, gate, up, down per block
    prompts = ["a red circle on the left and a blue square at the top right", "two green triangles"]
    options = dict(instruction=llm_encoder.LI_DIT_INSTRUCTION, layers="all")
    got = llm_encoder.encode_prompts(model, tokenizer, prompts, **options)
    expected = llm_encoder.encode_prompts(ref, tokenizer, prompts, **options)
    assert torch.equal(got.hidden_states, expected.hidden_states)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # the tied head reads the embedding's blocks


@pytest.mark.parametrize("llm,path", [("smollm2", SMOLLM2), ("gemma3", GEMMA3)])
def test_the_llm_holds_about_the_files_tensor_bytes(llm, path, request):
    model, _ = request.getfixturevalue(llm)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied: one Parameter
    held = sum(p.numel() * p.element_size() for p in model.parameters())  # each Parameter once
    assert held <= 1.25 * gguf_tensor_bytes(path)


# Types that the shipped files lack, written into SmolLM2's first block (K-quants need rows of 256 values: down_proj).
OTHER_TYPES = {"self_attn.q_proj": "Q4_0", "self_attn.k_proj": "Q5_1", "self_attn.v_proj": "F16",
               "self_attn.o_proj": "BF16", "mlp.gate_proj": "Q8_0", "mlp.up_proj": "Q5_0", "mlp.down_proj": "Q5_K"}


def test_other_types_in_a_real_model_give_the_dense_models_states(smollm2):
    import copy
    import gguf
    from test_gguf_weights import made_blocks

    model, tokenizer = smollm2
    model, dense = copy.deepcopy(model), copy.deepcopy(model)
    block, dense_block = model.model.layers[0], dense.model.layers[0]
    for i, (name, qtype) in enumerate(OTHER_TYPES.items()):
        layer = block.get_submodule(name)
        qtype = gguf.GGMLQuantizationType[qtype]
        raw = torch.from_numpy(made_blocks(qtype, layer.out_features, layer.in_features, seed=i))
        gguf_weights.to_gguf_layer(layer, raw, qtype, torch.float32)
        dense_block.get_submodule(name).weight = torch.nn.Parameter(gguf_weights.dequantize(raw, qtype))
    prompts, options = ["a red circle on the left"], dict(instruction=llm_encoder.LI_DIT_INSTRUCTION, layers="all")
    got = llm_encoder.encode_prompts(model, tokenizer, prompts, **options).hidden_states
    assert torch.equal(got, llm_encoder.encode_prompts(dense, tokenizer, prompts, **options).hidden_states)
    assert not torch.equal(got, llm_encoder.encode_prompts(smollm2[0], tokenizer, prompts, **options).hidden_states)
