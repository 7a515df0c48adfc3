"""The LLM under ComfyUI's memory manager, in process: only its text transformer goes to the ModelPatcher."""
import torch
import transformers

import tiny_models  # noqa: F401  (sets up ComfyUI for the imports below)
import comfy.model_management as mm  # noqa: E402
from llm_diffusion.nodes.llm_nodes import LoadedLLM  # noqa: E402


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
