"""The LLM under ComfyUI's memory manager, in process: only its text transformer goes to the ModelPatcher, on
comfy.ops layers that ComfyUI's partial loading can leave on the offload device."""
import copy

import pytest
import torch
import transformers

import tiny_models  # noqa: F401  (sets up ComfyUI for the imports below)
import comfy.model_management as mm  # noqa: E402
import comfy.ops  # noqa: E402
from llm_diffusion.adapters import llm_encoder  # noqa: E402
from llm_diffusion.nodes.llm_nodes import LoadedLLM, on_comfy_ops  # noqa: E402


def test_patcher_holds_the_decoder_and_counts_tied_embeddings_once():
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    llm = LoadedLLM("tiny", model, tokenizer=None, device_policy="auto")
    decoder_bytes = sum(p.numel() * p.element_size() for p in model.model.parameters())
    assert llm.patcher.model_size() == decoder_bytes  # the 512 x 64 embedding once, no separate LM head
    mm.load_models_gpu([llm.patcher])  # what LLM Prompt Encode does before encoding
    states = model.model(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states
    assert len(states) == 3 and torch.isfinite(states[-1]).all()


def tiny_llm(arch: str):
    """Small random decoders of three families whose norms differ: Llama's RMSNorm, Qwen3's extra q/k norms, Gemma
    3's (1 + weight) RMSNorm."""
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**common, sliding_window=8))
    with torch.no_grad():  # norms start at 1 (Gemma: 0); random ones show whether the cast weight is the one used
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def states(model, ids):
    with torch.no_grad():
        return torch.stack(llm_encoder.decoder(model)(input_ids=ids, output_hidden_states=True).hidden_states)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_every_llm_layer_with_weights_is_a_comfy_cast_layer(arch):
    model = tiny_llm(arch)
    llm = LoadedLLM("tiny", model, tokenizer=None, device_policy="auto")
    with_weights = [m for m in llm.patcher.model.modules() if list(m.parameters(recurse=False))]
    assert with_weights and all(isinstance(m, comfy.ops.CastWeightBiasOp) for m in with_weights)
    kinds = {type(m).__name__ for m in with_weights}
    assert "Linear" in kinds and any(k.startswith("Comfy") and "RMSNorm" in k for k in kinds)
    assert "Embedding" in kinds or "ComfyGemma3TextScaledWordEmbedding" in kinds
    assert not any(m.comfy_cast_weights for m in with_weights)  # resident: no per-call cast


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_partially_loaded_llm_casts_every_offloaded_layer_and_gives_the_same_states(arch):
    model = tiny_llm(arch)
    reference = copy.deepcopy(model)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    expected = states(reference, ids)
    llm = LoadedLLM("tiny", model, tokenizer=None, device_policy="auto")
    patcher = llm.patcher
    # what ComfyUI does when the weights do not fit (--lowvram, or the diffusion model needs the room): no layer
    # fits in a budget of one byte, so every one stays on the offload device and is cast for its call
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    try:
        with_weights = [m for m in patcher.model.modules() if list(m.parameters(recurse=False))]
        assert patcher.model.model_lowvram
        assert all(m.comfy_cast_weights for m in with_weights)
        calls = []
        original = comfy.ops.cast_bias_weight

        def counting(s, *args, **kwargs):
            calls.append(s)
            return original(s, *args, **kwargs)
        comfy.ops.cast_bias_weight = counting
        try:
            got = states(model, ids)
        finally:
            comfy.ops.cast_bias_weight = original
        assert {id(m) for m in with_weights} == {id(m) for m in calls}  # every layer went through the cast
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    finally:
        patcher.unpatch_model()
    assert not any(m.comfy_cast_weights for m in with_weights)
    torch.testing.assert_close(states(model, ids), expected, atol=0, rtol=0)


def test_a_layer_with_weights_the_cast_cannot_reach_is_refused():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.scale

    with pytest.raises(llm_encoder.LLMError, match="scale"):
        on_comfy_ops(torch.nn.Sequential(torch.nn.Linear(4, 4), Scaled()))


class BiasedNorm(torch.nn.Module):
    """A norm with weight and bias, as a LayerNorm-based LLM has: on_comfy_ops takes it through CastParameters."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(dim))
        self.bias = torch.nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias)


@pytest.mark.parametrize("norm", [torch.nn.LayerNorm, BiasedNorm])
@pytest.mark.parametrize("cast", [False, True], ids=["resident", "cast"])
def test_a_layer_with_a_bias_keeps_it_on_comfy_ops(norm, cast):
    torch.manual_seed(0)
    layer = norm(8)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(8) * 3)  # far from 0: an output without it differs
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        expected = layer(x)
    bias = layer.bias
    converted = on_comfy_ops(torch.nn.Sequential(layer))[0]
    assert isinstance(converted, comfy.ops.CastWeightBiasOp)
    converted.comfy_cast_weights = cast
    calls = []
    original = comfy.ops.cast_bias_weight

    def counting(s, *args, **kwargs):
        out = original(s, *args, **kwargs)
        calls.append(out[1])
        return out
    comfy.ops.cast_bias_weight = counting
    try:
        with torch.no_grad():
            got = converted(x)
    finally:
        comfy.ops.cast_bias_weight = original
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert converted.bias is bias
    assert len(calls) == int(cast) and all(b is not None for b in calls)  # the cast reached the bias too


# A forward after a cached prefix adds its fp32 products up in another order: within 128 eps of each hidden state's
# largest value (the bound is argued in tests/unit/test_llm_encoder.py).
ROUNDING = 2 ** -16


def assert_equal_up_to_rounding(got: torch.Tensor, ref: torch.Tensor) -> None:
    error, largest = (got - ref).abs().amax(dim=(0, 2, 3)), ref.abs().amax(dim=(0, 2, 3))  # [S]
    assert (error <= ROUNDING * largest).all(), f"{(error / largest).max().item():.1e} of the largest value"


def word_tokenizer():
    """A word-level tokenizer with a ChatML template, whose words fill the tiny LLM's first ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user"] + \
        "a red circle two blue squares on the left photo of the quick brown fox".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return tok


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_the_cached_prefix_serves_a_partially_loaded_llm_and_follows_its_patches(arch):
    """LLM Prompt Encode keeps the prefix's keys and values with the LLM. ComfyUI may then load only part of it: the
    layers it leaves on the offload device compute the same, so the stored prefix still serves. A weight patch
    changes the patcher's patches_uuid, and the prefix runs again on the patched weights."""
    model, tok = tiny_llm(arch), word_tokenizer()
    reference = copy.deepcopy(model)
    prompts, options = ["a red circle", "two blue squares on the left"], dict(instruction=None, layers="all")
    expected = llm_encoder.encode_prompts(reference, tok, prompts, **options).hidden_states
    llm = LoadedLLM("tiny", model, tok, device_policy="auto")
    resident = llm.encode(prompts, None, **options).hidden_states
    key, past = llm.prefix_cache.key, llm.prefix_cache.past
    assert past and key[1] == llm.patcher.patches_uuid
    assert_equal_up_to_rounding(resident, expected)

    patcher = llm.patcher
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)  # no layer fits: all are cast
    try:
        assert patcher.model.model_lowvram
        partial = llm_encoder.encode_prompts(model, tok, prompts, prefix_cache=llm.prefix_cache,
                                             weights_key=patcher.patches_uuid, **options).hidden_states
        assert llm.prefix_cache.past is past
        torch.testing.assert_close(partial, resident, atol=0, rtol=0)
        fresh = llm_encoder.PrefixCache()
        llm_encoder.encode_prompts(model, tok, prompts, prefix_cache=fresh, **options)
        for (k, v), (k0, v0) in zip(fresh.past, past):  # the prefix computed by cast layers is the same
            torch.testing.assert_close((k, v), (k0, v0), atol=0, rtol=0)
    finally:
        patcher.unpatch_model()

    name = "decoder.layers.0.self_attn.k_proj.weight"
    patcher.add_patches({name: (torch.randn_like(patcher.model.get_parameter(name)),)})
    patched = llm.encode(prompts, None, **options).hidden_states
    assert llm.prefix_cache.key != key and llm.prefix_cache.key[1] == patcher.patches_uuid
    full = llm_encoder.encode_prompts(model, tok, prompts, **options).hidden_states  # the patched weights, no cache
    assert not torch.allclose(patched, resident, atol=1e-3)
    assert_equal_up_to_rounding(patched, full)


def gguf_llm(arch: str):
    """tiny_llm with every Linear and Embedding matrix as GGUF blocks (Q8_0, as gguf-py quantizes it), and the same
    model dense with the dequantized weights: the reference the GGUF layers must equal."""
    import gguf
    from llm_diffusion.adapters import gguf_weights

    model = tiny_llm(arch)
    dense = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            raw = torch.from_numpy(gguf.quants.quantize(m.weight.detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
                                   .view("uint8").reshape(m.weight.shape[0], -1))
            gguf_weights.to_gguf_layer(m, raw, gguf.GGMLQuantizationType.Q8_0, torch.float32)
            dense.get_submodule(name).weight = torch.nn.Parameter(m.dequantize_weight(raw), requires_grad=False)
    model.lm_head.weight = model.model.embed_tokens.weight if model.config.tie_word_embeddings else model.lm_head.weight
    return model, dense


def gguf_layers(module):
    from llm_diffusion.adapters import gguf_weights
    return [m for m in module.modules() if isinstance(m, gguf_weights.GGUFLayer)]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_gguf_layers_are_comfy_cast_layers_counted_by_their_blocks(arch):
    model, dense = gguf_llm(arch)
    llm = LoadedLLM("tiny", model, tokenizer=None, device_policy="auto")
    quantized = gguf_layers(llm.patcher.model)
    assert len(quantized) == 7 * 2 + 1  # q, k, v, o, gate, up, down per block, and the embedding
    assert all(isinstance(m, comfy.ops.CastWeightBiasOp) and m.weight.dtype == torch.uint8 for m in quantized)
    held = sum(p.numel() * p.element_size() for p in model.model.parameters())
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.model.parameters())
    assert llm.patcher.model_size() == held < dense_bytes / 3  # Q8_0: 34 bytes per 32 values, not 128
    mm.load_models_gpu([llm.patcher])
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    torch.testing.assert_close(states(model, ids), states(dense, ids), atol=0, rtol=0)


def test_a_tied_gguf_embedding_is_one_parameter_counted_once():
    model, _ = gguf_llm("gemma3")  # Gemma 3 ties its LM head to the scaled embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.uint8
    llm = LoadedLLM("tiny", model, tokenizer=None, device_policy="auto")
    assert llm.patcher.model_size() == sum(p.numel() * p.element_size() for p in model.parameters())  # each once


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_a_partially_loaded_gguf_llm_casts_the_blocks_and_gives_the_same_states(arch):
    model, dense = gguf_llm(arch)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    expected = states(dense, ids)
    patcher = LoadedLLM("tiny", model, tokenizer=None, device_policy="auto").patcher
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)  # no layer fits: all are cast
    try:
        quantized = gguf_layers(patcher.model)
        assert patcher.model.model_lowvram and all(m.comfy_cast_weights for m in quantized)
        cast = []
        original = comfy.ops.cast_bias_weight

        def counting(s, *args, **kwargs):
            out = original(s, *args, **kwargs)
            cast.append(out[0].dtype)
            return out
        comfy.ops.cast_bias_weight = counting
        try:
            got = states(model, ids)
        finally:
            comfy.ops.cast_bias_weight = original
        assert cast.count(torch.uint8) == len(quantized)  # every GGUF layer's blocks went through the cast as bytes
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    finally:
        patcher.unpatch_model()
    assert all(m.weight.dtype == torch.uint8 for m in gguf_layers(patcher.model))
    torch.testing.assert_close(states(model, ids), expected, atol=0, rtol=0)


@pytest.mark.parametrize("lowvram", [False, True], ids=["resident", "lowvram"])
def test_a_patched_gguf_layer_is_the_dense_layer_plus_the_patch(lowvram):
    """ComfyUI's weight patches (LoRA, add_patches) reach GGUF layers through convert_weight / set_weight: resident,
    the patched weight replaces the blocks until unpatch; under lowvram, each call patches the dequantized weight."""
    model, dense = gguf_llm("llama")
    name = "decoder.layers.0.self_attn.k_proj.weight"
    k_proj = model.model.layers[0].self_attn.k_proj
    torch.manual_seed(1)
    diff = torch.randn(k_proj.out_features, k_proj.in_features)  # a patch is shaped as the weight, not the blocks
    with torch.no_grad():
        dense.model.layers[0].self_attn.k_proj.weight.add_(diff)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    expected = states(dense, ids)
    patcher = LoadedLLM("tiny", model, tokenizer=None, device_policy="auto").patcher
    blocks = k_proj.weight
    patcher.add_patches({name: (diff,)})
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1 if lowvram else 0)
    try:
        assert (k_proj.weight is blocks) == lowvram and (k_proj.weight.dtype == torch.uint8) == lowvram
        torch.testing.assert_close(states(model, ids), expected, atol=0, rtol=0)
    finally:
        patcher.unpatch_model()
    assert torch.equal(k_proj.weight, blocks) and k_proj.weight.dtype == torch.uint8
    assert not torch.equal(states(model, ids), expected)
