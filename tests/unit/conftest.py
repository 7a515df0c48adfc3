"""Shared fixtures for the unit tests of the pure-PyTorch core (adapters/) and the trainer (training/).

Everything is built offline: tiny randomly initialised Hugging Face models of every supported architecture, and
a word-level tokenizer over the words the tests and the shapes world use. Nothing is downloaded.

There is deliberately no __init__.py in tests/ or tests/unit/: the repository root is a ComfyUI custom-node
package whose __init__.py imports ComfyUI, and these tests must run without it.
"""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

torch.set_num_threads(1)  # the CI machine has two shared cores: one thread is much faster there

from dataset import captions, shapes_world  # noqa: E402
from adapters.llm_encoder import LI_DIT_INSTRUCTION  # noqa: E402

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]
EXTRA_WORDS = "system user assistant model photo of cat dog on mat the quick brown fox jumps over lazy".split()

# ChatML-style template with a system role (Qwen, Phi-3).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma-style template that refuses a system role, like the real Gemma 2 template.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# name -> (hidden size, blocks, chat template). Hidden sizes differ so that multi-LLM tests see different widths.
ARCHS = {
    "llama": (32, 3, None),
    "qwen2": (48, 2, CHATML_TEMPLATE),
    "qwen3": (32, 2, CHATML_TEMPLATE),
    "gemma2": (32, 2, GEMMA_TEMPLATE),
    "gemma3": (48, 2, GEMMA_TEMPLATE),
    "mistral": (32, 2, None),
    "phi3": (48, 2, CHATML_TEMPLATE),
}


def vocabulary() -> list[str]:
    from tokenizers.pre_tokenizers import Whitespace

    def strings(x):
        if isinstance(x, str):
            yield re.sub(r"\{\w*\}", " ", x)  # without the templates' placeholders
        elif isinstance(x, dict):
            yield from strings(list(x.values()))
        else:
            for item in x:
                yield from strings(item)

    # every phrasing of the caption language, held-out ones included, and the canonical captions
    tables = (captions.COLOR_WORDS, captions.SHAPE_WORDS, captions.POSITION_WORDS, captions.RELATION_WORDS,
              captions.ITS_RELATION, captions.QUANTIFIERS, captions.COUNT_WORDS, captions.FRAMES, captions.TEMPLATES,
              shapes_world.POSITIONS, shapes_world.NUMBERS, list(shapes_world.COLORS), shapes_world.SHAPES)
    texts = [LI_DIT_INSTRUCTION, " ".join(EXTRA_WORDS), " ".join(s + "s" for s in shapes_world.SHAPES)]
    texts += list(strings(tables))
    words = {w for t in texts for w, _ in Whitespace().pre_tokenize_str(t)}
    return [PAD, BOS, EOS, UNK] + CHAT_TOKENS + sorted(words)


# Families whose tokenizer transformers 5 rebuilds as byte-level BPE from the vocabulary and merges, whatever model
# tokenizer.json names: their word-level stand-in must be a byte-level BPE, as the real checkpoints are.
BYTE_LEVEL_ARCHS = ("qwen2",)


def build_tokenizer(chat_template: str | None, byte_level: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    if byte_level:  # merges up to whole words, so a word is still one token
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        special = [PAD, BOS, EOS, UNK] + CHAT_TOKENS
        backend.train_from_iterator([" ".join(words)] + words, trainers.BpeTrainer(
            vocab_size=256 + 8 * len(words), special_tokens=special, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        vocab = backend.get_vocab()
    else:
        vocab = {w: i for i, w in enumerate(words)}
        backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                           special_tokens=[(BOS, vocab[BOS])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  unk_token=UNK, additional_special_tokens=CHAT_TOKENS)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def build_config(arch: str, hidden: int, layers: int, vocab_size: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    head_dim = hidden // 4
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=head_dim, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=16, **common)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=16, **common)
    if arch == "mistral":
        return tf.MistralConfig(**common)
    if arch == "phi3":
        return tf.Phi3Config(**common)
    raise KeyError(arch)


def save_tiny_llm(folder: str, arch: str) -> str:
    from transformers import AutoModelForCausalLM

    hidden, layers, template = ARCHS[arch]
    tok = build_tokenizer(template, byte_level=arch in BYTE_LEVEL_ARCHS)
    torch.manual_seed(sum(map(ord, arch)))
    model = AutoModelForCausalLM.from_config(build_config(arch, hidden, layers, len(tok)))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_multimodal_gemma3(tmp_path_factory) -> str:
    """Gemma 3 as from 4B up: a vision tower beside the text transformer, whose sizes sit under text_config."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    hidden, layers, template = ARCHS["gemma3"]
    tok = build_tokenizer(template)
    vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14)
    config = tf.Gemma3Config(text_config=build_config("gemma3", hidden, layers, len(tok)).to_dict(),
                             vision_config=vision.to_dict(), mm_tokens_per_image=4)
    assert not hasattr(config, "hidden_size")
    folder = str(tmp_path_factory.mktemp("gemma3-multimodal"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    """Every supported architecture; a test narrows it with @pytest.mark.parametrize("arch", [...])."""
    return request.param


@pytest.fixture(scope="session")
def arch_specs() -> dict[str, tuple[int, int, str | None]]:
    """arch -> (hidden size, number of blocks, chat template or None)."""
    return dict(ARCHS)


@pytest.fixture(scope="session")
def tiny_llm_dirs(tmp_path_factory) -> dict[str, str]:
    """arch -> Hugging Face folder (config.json + model.safetensors + tokenizer); the folder is named after it."""
    root = tmp_path_factory.mktemp("llms")
    return {arch: save_tiny_llm(str(root / arch), arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def llm_loader(tiny_llm_dirs):
    """arch -> (model, tokenizer) through adapters.llm_encoder.load_llm, loaded once per session."""
    from adapters.llm_encoder import load_llm

    cache = {}

    def load(arch: str):
        if arch not in cache:
            cache[arch] = load_llm(tiny_llm_dirs[arch])
        return cache[arch]

    return load


@pytest.fixture(scope="session")
def overflowing_half_llm(tiny_llm_dirs):
    """() -> a fresh (model, tokenizer): the tiny llama in float16 with one norm scaled so far that its block's MLP
    input overflows half precision (largest value 65504) while every weight stays representable: float32 runs it
    finitely."""
    from adapters.llm_encoder import load_llm

    def load():
        model, tok = load_llm(tiny_llm_dirs["llama"], torch.float16)
        with torch.no_grad():
            model.model.layers[0].post_attention_layernorm.weight.mul_(3e4)
        return model, tok
    return load


def activate_zero_init(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Fills every all-zero parameter (adaLN-Zero modulations, zero gates, zero-init output layers) with small
    random values, so that every path of a freshly built model influences its output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture
def wake():
    return activate_zero_init


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (device, mixed precision) from the first Accelerator on; the trainer
    runs in this process test after test, so each test starts from none, as a new training process does."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
