"""adapters.llm_generate: the loaded LLM writes text (a prompt expanded before it is encoded)."""
import pytest
import torch

from adapters import llm_encoder, llm_generate


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "llama"])
def test_the_prompt_sits_in_the_template_and_ends_where_the_answer_starts(arch, llm_loader):
    """qwen2: ChatML with a system role; gemma2: no system role (the instruction opens the user's turn); llama: no
    template at all."""
    model, tok = llm_loader(arch)
    ids = llm_generate.chat_ids(tok, "red circle <|im_end|>", instruction="describe", use_chat_template=True)
    prefix = llm_encoder.tokenize_prefix(tok, "describe", True)
    assert ids[:len(prefix)] == prefix
    text = tok("red circle <|im_end|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids[len(prefix):len(prefix) + len(text)] == text
    assert tok.convert_tokens_to_ids("<|im_end|>") not in text  # typed, not a control token
    if arch == "llama":
        assert ids[len(prefix) + len(text):] == tok("\n", add_special_tokens=False)["input_ids"]
        return
    rendered = llm_encoder.render_chat(tok, "describe", "red circle", add_generation_prompt=True)
    after = rendered.split("red circle")[1]  # the tiny word-level tokenizer drops whitespace
    assert "".join(tok.decode(ids[len(prefix) + len(text):]).split()) == "".join(after.split())
    end_of_turn = "<|im_end|>" if arch == "qwen2" else "<end_of_turn>"
    assert tok.convert_tokens_to_ids(end_of_turn) in llm_generate.stop_ids(model, tok, "describe", True)


def test_greedy_decoding_is_the_argmax_continuation_whatever_the_seed(llm_loader):
    model, tok = llm_loader("qwen2")
    text = llm_generate.generate_text(model, tok, "red circle", max_new_tokens=6, temperature=0, seed=1)
    assert text == llm_generate.generate_text(model, tok, "red circle", max_new_tokens=6, temperature=0, seed=2)

    ids = llm_generate.chat_ids(tok, "red circle", instruction=llm_generate.EXPAND_INSTRUCTION,
                                use_chat_template=True)
    stops = llm_generate.stop_ids(model, tok, llm_generate.EXPAND_INSTRUCTION, True)
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt in stops:
                break
    assert text == tok.decode(new, skip_special_tokens=True).strip()
    assert text  # a random tiny model still writes words


def test_sampling_is_fixed_by_the_seed_and_leaves_the_global_rng_alone(llm_loader):
    model, tok = llm_loader("qwen2")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    runs = {seed: llm_generate.generate_text(model, tok, "blue square", max_new_tokens=12, temperature=1.5,
                                             top_p=1.0, seed=seed) for seed in (0, 0, 1, 2, 3)}
    assert torch.equal(torch.random.get_rng_state(), state)
    again = llm_generate.generate_text(model, tok, "blue square", max_new_tokens=12, temperature=1.5, top_p=1.0,
                                       seed=0)
    assert again == runs[0]
    assert len(set(runs.values())) > 1  # a random model at temperature 1.5: the seeds give different texts


def test_every_token_is_reported_and_the_caller_can_stop_it(llm_loader):
    model, tok = llm_loader("qwen2")
    seen = []
    llm_generate.generate_text(model, tok, "red circle", max_new_tokens=5, temperature=0, on_token=seen.append)
    assert seen and seen == list(range(1, len(seen) + 1)) and len(seen) <= 5

    class Interrupted(Exception):
        pass

    def stop(n):
        if n == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        llm_generate.generate_text(model, tok, "red circle", max_new_tokens=5, temperature=0, on_token=stop)


@pytest.mark.parametrize("options, message", [
    ({"max_new_tokens": 0}, "max_new_tokens is 0"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_p": 0}, r"top_p in \(0, 1\]"),
])
def test_bad_settings_are_named(options, message, llm_loader):
    model, tok = llm_loader("qwen2")
    with pytest.raises(llm_encoder.LLMError, match=message):
        llm_generate.generate_text(model, tok, "red circle", **options)


def test_an_lm_head_in_gguf_blocks_is_dequantized_once_per_answer_and_gives_the_same_text(llm_loader):
    """The head's blocks are swapped for their dequantized weight while the answer is written, and back after it."""
    import copy

    import gguf
    import numpy as np

    from adapters import gguf_weights

    model, tok = llm_loader("llama")  # width 32: whole Q8_0 blocks
    model = copy.deepcopy(model)
    head = model.get_output_embeddings()
    raw = torch.from_numpy(gguf.quants.quantize(head.weight.detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
                           .view(np.uint8))
    gguf_weights.to_gguf_layer(head, raw, gguf.GGMLQuantizationType.Q8_0, torch.float32)
    blocks = head.weight
    dense = copy.deepcopy(model)
    gguf_weights.dequantize_layers(dense)
    calls = []
    original = gguf_weights.GGUFLayer.dequantize_weight
    try:
        gguf_weights.GGUFLayer.dequantize_weight = lambda self, r: calls.append(r.shape) or original(self, r)
        text = llm_generate.generate_text(model, tok, "red circle", max_new_tokens=6, temperature=0)
    finally:
        gguf_weights.GGUFLayer.dequantize_weight = original
    assert len(calls) == 1 and head.weight is blocks  # once for the whole answer, then the blocks again
    assert text == llm_generate.generate_text(dense, tok, "red circle", max_new_tokens=6, temperature=0)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logits_that_overflow_half_precision_are_written_again_in_float32_with_a_warning(
        temperature, overflowing_half_llm, caplog):
    """Left in fp16, greedy decoding of NaN logits gives an empty answer and sampling a torch error; the answer is
    written again in float32 instead: the text of a float32 copy, and the model keeps its very tensors."""
    import copy
    model, tok = overflowing_half_llm()
    options = dict(max_new_tokens=6, temperature=temperature, seed=3)
    reference = llm_generate.generate_text(copy.deepcopy(model).float(), tok, "red circle", **options)
    before = {name: (p.dtype, p.data_ptr()) for name, p in model.named_parameters()}
    with caplog.at_level("WARNING"):
        text = llm_generate.generate_text(model, tok, "red circle", name="tiny-llama.gguf", **options)
    assert text == reference and text
    assert "tiny-llama.gguf" in caplog.text and "logits in float16" in caplog.text and "float32" in caplog.text
    assert {name: (p.dtype, p.data_ptr()) for name, p in model.named_parameters()} == before


def test_an_llm_whose_logits_are_not_finite_even_in_float32_is_refused(llm_loader):
    import copy
    model, tok = llm_loader("llama")
    model = copy.deepcopy(model).half()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(llm_encoder.LLMError, match="NaN or inf logits even in float32: its weights are broken"):
        llm_generate.generate_text(model, tok, "red circle", max_new_tokens=3, temperature=0, name="broken.gguf")
