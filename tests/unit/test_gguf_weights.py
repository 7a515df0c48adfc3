"""adapters.gguf_weights: the block dequantizers against gguf-py's reference, the tensor-table reader against
gguf.GGUFReader, and GGUF layers against dense layers holding the dequantized weight."""
from __future__ import annotations

import copy
import os

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from adapters import gguf_weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOLLM2 = os.path.join(ROOT, ".comfyui", "models", "LLM", "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3 = os.path.join(ROOT, ".cache", "gemma-3-270m.Q4_K_M.gguf")
# the types of the two shipped LLMs, taken from their files
IN_SHIPPED_FILES = {Q.Q4_1: SMOLLM2, Q.Q8_0: SMOLLM2, Q.F32: SMOLLM2, Q.Q4_K: GEMMA3, Q.Q5_0: GEMMA3, Q.Q6_K: GEMMA3}


def random_k_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid blocks without a quantizer: random bytes with finite fp16 scales where the format keeps them."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scales = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for at in scales:
        raw[:, at:at + 2] = rng.uniform(-0.1, 0.1, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def blocks_of(qtype: Q, rows: int = 64, cols: int = 512, seed: int = 0) -> np.ndarray:
    """[rows, row_bytes] uint8: a real tensor's first rows for the shipped types, else made here."""
    if qtype in IN_SHIPPED_FILES:
        file = gguf_weights.read_gguf(IN_SHIPPED_FILES[qtype])
        name = next(n for n, t in file.tensors.items() if t.type == qtype)  # F32: 1-D norms
        raw = file.raw(name)
        return (raw if raw.dim() == 2 else raw.reshape(1, -1))[:rows].numpy()
    return made_blocks(qtype, rows, cols, seed)


def made_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):  # gguf-py has no quantizer for K-quants
        return random_k_blocks(qtype, rows, cols, seed)
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return gguf.quants.quantize(values, qtype).view(np.uint8).reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16,
                                   Q.F32], ids=lambda t: t.name)
def test_dequantize_equals_gguf_reference(qtype):
    raw = blocks_of(qtype)
    ref = gguf.quants.dequantize(raw, qtype).astype(np.float32)
    got = gguf_weights.dequantize(torch.from_numpy(raw), qtype)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.isfinite(got).all() and got.abs().max() > 0
    assert torch.equal(got, torch.from_numpy(ref))


def test_every_supported_type_is_tested():
    assert set(gguf_weights.SUPPORTED_TYPES) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
                                                 "F16", "BF16", "F32"}


def test_table_reader_equals_gguf_reader():
    file = gguf_weights.read_gguf(SMOLLM2)
    reader = gguf.GGUFReader(SMOLLM2)
    assert [t.name for t in reader.tensors] == list(file.tensors)
    for t in reader.tensors:
        mine = file.tensors[t.name]
        assert (mine.type, mine.shape, mine.offset, mine.nbytes) == \
            (int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)), t.data_offset, t.n_bytes)
        assert np.array_equal(file.raw(t.name).numpy().reshape(-1), t.data.view(np.uint8).reshape(-1))
    assert file.metadata["general.architecture"] == "llama"
    assert file.metadata["llama.block_count"] == int(reader.fields["llama.block_count"].parts[-1][0])
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(file.metadata["tokenizer.ggml.tokens"]) == len(tokens.data)
    assert file.metadata["tokenizer.ggml.tokens"][100] == bytes(tokens.parts[tokens.data[100]])


def write_gguf(path: str, tensors: dict[str, tuple[np.ndarray, Q]]) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def meta_llama(**sizes):
    from accelerate import init_empty_weights
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, **sizes)
    with init_empty_weights(include_buffers=False):
        return transformers.LlamaForCausalLM(config)


def test_an_unsupported_type_is_refused_naming_tensor_type_and_fix(tmp_path):
    path = str(tmp_path / "q2k.gguf")
    q2k = random_k_blocks(Q.Q4_K, 256, 256)[:, :gguf.GGML_QUANT_SIZES[Q.Q2_K][1]]  # 84-byte rows: one Q2_K block
    write_gguf(path, {"blk.0.attn_q.weight": (np.ascontiguousarray(q2k), Q.Q2_K)})
    with pytest.raises(gguf_weights.GGUFError) as err:
        gguf_weights.load_weights(meta_llama(), path, torch.float32)
    message = str(err.value)
    for part in ("blk.0.attn_q.weight", "Q2_K", "q2k.gguf", "Q4_K_M", "Q8_0", "Q6_K"):
        assert part in message


def test_a_file_without_every_weight_is_refused(tmp_path):
    path = str(tmp_path / "part.gguf")
    write_gguf(path, {"token_embd.weight": (blocks_of(Q.Q8_0, 64, 256), Q.Q8_0)})
    with pytest.raises(gguf_weights.GGUFError, match="no tensor for .*layers.0"):
        gguf_weights.load_weights(meta_llama(), path, torch.float32)


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "cut.gguf"
    write_gguf(str(path), {"token_embd.weight": (blocks_of(Q.Q8_0, 64, 256), Q.Q8_0)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(gguf_weights.GGUFError, match="truncated"):
        gguf_weights.read_gguf(str(path))


class Scaled(torch.nn.Embedding):
    """An embedding subclass that reads its weight's dtype in the forward, as Gemma 3's scaled embedding does."""

    def forward(self, ids):
        return super().forward(ids) * torch.tensor(3.0).to(self.weight.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", [torch.nn.Linear, torch.nn.Embedding, Scaled], ids=lambda k: k.__name__)
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.BF16], ids=lambda t: t.name)
def test_a_gguf_layer_computes_what_the_dense_layer_does(kind, dtype, qtype):
    raw = torch.from_numpy(made_blocks(qtype, 96, 512, seed=1))
    weight = gguf_weights.dequantize(raw, qtype).to(dtype)  # [96, 512]
    torch.manual_seed(0)
    if kind is torch.nn.Linear:
        layer, x = torch.nn.Linear(512, 96, bias=True, dtype=dtype), torch.randn(2, 5, 512, dtype=dtype)
    else:
        layer, x = kind(96, 512, padding_idx=95, dtype=dtype), torch.tensor([[3, 95, 7, 3], [0, 1, 2, 50]])
    dense = copy.deepcopy(layer)
    dense.weight = torch.nn.Parameter(weight)
    gguf_weights.to_gguf_layer(layer, raw, qtype, dtype)
    assert isinstance(layer, kind) and layer.weight.dtype == torch.uint8
    with torch.no_grad():
        got, ref = layer(x), dense(x)
    assert got.dtype == dtype and torch.equal(got, ref)
    assert layer.weight.dtype == torch.uint8 and getattr(layer, "padding_idx", None) == getattr(dense, "padding_idx",
                                                                                                  None)


def test_llama_head_permutation_moves_whole_rows():
    """transformers' llama processor reorders q/k rows; on the blocks this is the same row order, exactly."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    file = gguf_weights.read_gguf(SMOLLM2)
    config = {"num_attention_heads": 9, "num_key_value_heads": 3}
    processor = LlamaTensorProcessor(config=config)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        raw, qtype = file.raw(name), file.tensors[name].type
        perm = gguf_weights.row_permutation(processor, name, raw.shape[0], {})
        assert perm is not None and not np.array_equal(perm, np.arange(len(perm)))
        ref = processor.process(weights=gguf_weights.dequantize(raw, qtype).numpy(), name=name).weights
        assert torch.equal(gguf_weights.dequantize(raw[torch.from_numpy(perm)], qtype), torch.from_numpy(ref))
    assert np.array_equal(gguf_weights.row_permutation(processor, "blk.0.attn_v.weight", 192, {}), np.arange(192))


def test_dequantize_layers_gives_back_the_dense_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(Scaled(96, 512), torch.nn.Linear(512, 96))
    ref = copy.deepcopy(model)
    for i, m in enumerate(model):
        raw = torch.from_numpy(made_blocks(Q.Q8_0, 96, 512, seed=i))
        ref[i].weight = torch.nn.Parameter(gguf_weights.dequantize(raw, Q.Q8_0))
        gguf_weights.to_gguf_layer(m, raw, Q.Q8_0, torch.float32)
    gguf_weights.dequantize_layers(model)
    assert [type(m) for m in model] == [Scaled, torch.nn.Linear]
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(model, ref))
