"""GGUF weights that stay quantized: the file's blocks in memory, dequantized layer by layer in the forward.

A Linear or Embedding weight keeps its GGUF blocks as a uint8 Parameter [out, row_bytes] (blocks run along the
input dim, so each row is whole blocks) and becomes float only for the call that uses it. Dequantization computes
in float32, as gguf-py's reference does, and then casts to the compute dtype: the weights equal those of a model
dequantized at load, bit for bit.

The block dequantizers are torch ports adapted from city96/ComfyUI-GGUF (dequant.py),
(c) City96 || Apache-2.0 (apache.org/licenses/LICENSE-2.0).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

QK_K = 256          # values per K-quant super-block
K_SCALE_SIZE = 12   # bytes of packed 6-bit scales and mins in Q4_K / Q5_K


class GGUFError(ValueError):
    """A GGUF file this loader cannot use; the message names the file, the problem and the fix."""


# The dequantizers write their integer values straight into a float32 block and scale it in place: the same float32
# operations as gguf-py's, in as few passes over memory as torch allows.

def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:  # [n, bytes] uint8 -> [n, 2 * bytes] float32
    """Per group of `group` bytes: the low nibbles are the group's first `group` values, the high nibbles the next."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group)
    out = torch.empty(n, q.shape[1], 2, group, dtype=torch.float32, device=qs.device)
    out[:, :, :1] = q & 0x0F
    out[:, :, 1:] = q >> 4
    return out.reshape(n, -1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:  # [n, 4] uint8 (a little-endian uint32) -> [n, 32] in {0, 16}
    x = qh.to(torch.int32)
    word = x[:, 0] | x[:, 1] << 8 | x[:, 2] << 16 | x[:, 3] << 24  # [n]
    return ((word[:, None] >> torch.arange(32, device=qh.device, dtype=torch.int32)) & 1) << 4


def _f16(b: torch.Tensor) -> torch.Tensor:  # [n, 2] uint8 -> [n, 1] float32
    return b.contiguous().view(torch.float16).float()


def _split(blocks: torch.Tensor, *sizes: int) -> tuple[torch.Tensor, ...]:
    return torch.split(blocks, list(sizes) + [blocks.shape[1] - sum(sizes)], dim=1)


def _q4_0(blocks):  # d (f16), 16 bytes of nibbles
    d, qs = _split(blocks, 2)
    return _nibbles(qs, 16).sub_(8).mul_(_f16(d))


def _q4_1(blocks):  # d, m (f16), 16 bytes of nibbles
    d, m, qs = _split(blocks, 2, 2)
    return _nibbles(qs, 16).mul_(_f16(d)).add_(_f16(m))


def _q5_0(blocks):  # d (f16), 32 high bits, 16 bytes of nibbles
    d, qh, qs = _split(blocks, 2, 4)
    return _nibbles(qs, 16).add_(_high_bits(qh)).sub_(16).mul_(_f16(d))


def _q5_1(blocks):  # d, m (f16), 32 high bits, 16 bytes of nibbles
    d, m, qh, qs = _split(blocks, 2, 2, 4)
    return _nibbles(qs, 16).add_(_high_bits(qh)).mul_(_f16(d)).add_(_f16(m))


def _q8_0(blocks):  # d (f16), 32 int8
    d, x = _split(blocks, 2)
    return x.contiguous().view(torch.int8).float().mul_(_f16(d))


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [n, 12] -> 8 scales, 8 mins (6 bit)
    n = scales.shape[0]
    d, m, m_d = torch.split(scales.reshape(n, 3, 4), 1, dim=1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _q4_k(blocks):  # d, dmin (f16), 12 bytes of scales/mins, 128 bytes of nibbles: 8 sub-blocks of 32
    n = blocks.shape[0]
    d, dmin, scales, qs = _split(blocks, 2, 2, K_SCALE_SIZE)
    sc, mn = _k_scales(scales)
    q = _nibbles(qs, 32).reshape(n, 8, 32)
    return q.mul_((_f16(d) * sc).reshape(n, 8, 1)).sub_((_f16(dmin) * mn).reshape(n, 8, 1)).reshape(n, QK_K)


def _q5_k(blocks):  # as Q4_K, with 32 bytes of fifth bits before the nibbles
    n = blocks.shape[0]
    d, dmin, scales, qh, qs = _split(blocks, 2, 2, K_SCALE_SIZE, QK_K // 8)
    sc, mn = _k_scales(scales)
    shifts = torch.arange(8, device=blocks.device, dtype=torch.uint8).reshape(1, 1, 8, 1)
    high = ((qh.reshape(n, -1, 1, 32) >> shifts) & 0x01).reshape(n, 8, 32)
    q = _nibbles(qs, 32).reshape(n, 8, 32).add_(high << 4)
    return q.mul_((_f16(d) * sc).reshape(n, 8, 1)).sub_((_f16(dmin) * mn).reshape(n, 8, 1)).reshape(n, QK_K)


def _q6_k(blocks):  # 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales, d (f16): 16 sub-blocks of 16
    n = blocks.shape[0]
    ql, qh, scales, d = _split(blocks, QK_K // 2, QK_K // 4, QK_K // 16)
    scale = (_f16(d) * scales.contiguous().view(torch.int8)).reshape(n, QK_K // 16, 1)
    low = _nibbles(ql, 64).reshape(n, -1, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((qh.reshape(n, -1, 1, 32) >> shifts) & 0x03).reshape(n, -1, 32)
    q = low.add_(high << 4).sub_(32).reshape(n, QK_K // 16, -1)
    return q.mul_(scale).reshape(n, QK_K)


def _bf16(blocks):
    return (blocks.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _f16_values(blocks):
    return blocks.contiguous().view(torch.float16).float()


def _f32(blocks):
    return blocks.contiguous().view(torch.float32)


DEQUANTIZE = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0, Q.Q4_K: _q4_k,
              Q.Q5_K: _q5_k, Q.Q6_K: _q6_k, Q.F16: _f16_values, Q.BF16: _bf16, Q.F32: _f32}
SUPPORTED_TYPES = tuple(t.name for t in DEQUANTIZE)
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def dequantize(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """[..., row_bytes] uint8 GGUF blocks -> [..., values] float32, equal to gguf.quants.dequantize."""
    qtype = Q(qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(-1, raw.shape[-1])
    out = DEQUANTIZE[qtype](rows.reshape(-1, size))  # [blocks, block]
    return out.reshape(*raw.shape[:-1], raw.shape[-1] // size * block)


# ---------------------------------------------------------------------------------------------------------------
# The file: header, metadata and tensor table read with struct; the tensor data stays in a memory map.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    type: int
    shape: tuple[int, ...]  # torch order: [rows, values per row] for a matrix
    offset: int             # from the start of the file
    nbytes: int


@dataclass
class GGUFFile:
    path: str
    metadata: dict          # key -> int | float | bool | str | np.ndarray (numeric array) | list[bytes] (strings)
    tensors: dict[str, TensorInfo]
    data: np.ndarray        # the whole file, uint8, memory-mapped

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes, copied out of the file: [rows, row_bytes] uint8 (1-D tensors: [bytes])."""
        t = self.tensors[name]
        rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
        view = self.data[t.offset:t.offset + t.nbytes].reshape((rows, -1) if len(t.shape) > 1 else (-1,))
        return torch.from_numpy(np.array(view))


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        except struct.error:
            raise GGUFError(f"'{self.path}' ends inside its header: the file is truncated. Download it again.") \
                from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFError(f"'{self.path}' ends inside its header: the file is truncated. Download it again.")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string().decode("utf-8", errors="replace")
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype not in _NUMPY:
                raise GGUFError(f"'{self.path}' holds a metadata array of unknown type {etype}: not a GGUF file "
                                "this loader reads.")
            arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos)
            self.pos += arr.nbytes
            return arr
        if vtype not in _SCALARS:
            raise GGUFError(f"'{self.path}' holds a metadata value of unknown type {vtype}: not a GGUF file this "
                            "loader reads.")
        return self.take(_SCALARS[vtype])


def read_gguf(path: str) -> GGUFFile:
    """Header, metadata and tensor table (little-endian GGUF version 2 or 3); tensor data is not read."""
    with open(path, "rb") as f:  # the map outlives the file object
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(buf, dtype=np.uint8)
    cur = _Cursor(buf, path)
    if bytes(data[:4]) != b"GGUF":
        raise GGUFError(f"'{path}' is not a GGUF file (no GGUF magic at its start). Download it again.")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise GGUFError(f"'{path}' is GGUF version {version} (or big-endian); only little-endian versions 2 and 3 "
                        "are read. Convert it again with a current llama.cpp.")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string().decode("utf-8", errors="replace")
        metadata[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string().decode("utf-8", errors="replace")
        dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
        infos.append((name, cur.take("<I"), tuple(reversed(dims)), cur.take("<Q")))
    alignment = int(metadata.get("general.alignment", 32))
    start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, qtype, shape, offset in infos:
        if qtype not in Q._value2member_map_:
            raise GGUFError(f"Tensor '{name}' of '{path}' has GGML type {qtype}, which gguf {gguf_version()} "
                            f"does not know. Supported: {', '.join(SUPPORTED_TYPES)}.")
        block, size = gguf.GGML_QUANT_SIZES[Q(qtype)]
        values = int(np.prod(shape)) if shape else 1
        nbytes = values // block * size
        if start + offset + nbytes > len(data):
            raise GGUFError(f"'{path}' ends inside tensor '{name}': the file is truncated. Download it again.")
        tensors[name] = TensorInfo(name, qtype, shape, start + offset, nbytes)
    return GGUFFile(path, metadata, tensors, data)


class MetadataReader:
    """Stands in for gguf.GGUFReader where transformers reads a file's metadata (its config and tokenizer) and
    tensor names only: GGUFReader makes a numpy view per element of the vocabulary arrays, seconds per parse."""

    class Field:
        def __init__(self, value, vtype: list[int]):
            self.types = vtype
            if isinstance(value, list):    # strings: each part is the bytes
                self.parts, self.data = value, range(len(value))
            elif isinstance(value, np.ndarray):
                self.parts, self.data = value.reshape(-1, 1), range(len(value))
            else:
                self.parts, self.data = [value.encode() if isinstance(value, str) else [value]], [0]

    def __init__(self, path, mode: str = "r"):
        file = read_gguf(str(path))
        self.tensors = list(file.tensors.values())
        self.fields = {key: self.Field(value, _value_types(value)) for key, value in file.metadata.items()}


def _value_types(value) -> list[int]:
    if isinstance(value, list):
        return [_ARRAY, _STRING]
    if isinstance(value, np.ndarray):
        return [_ARRAY, next(t for t, code in _NUMPY.items() if np.dtype(code) == value.dtype)]
    if isinstance(value, str):
        return [_STRING]
    if isinstance(value, bool):
        return [7]
    return [11 if isinstance(value, int) else 12]


def gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")


def check_type(file: GGUFFile, name: str) -> None:
    qtype = file.tensors[name].type
    if qtype not in DEQUANTIZE:
        raise GGUFError(f"Tensor '{name}' of '{file.path}' is stored as {Q(qtype).name}, which this loader does not "
                        f"dequantize (supported: {', '.join(SUPPORTED_TYPES)}). Use a file quantized as Q4_K_M or "
                        "Q8_0.")


# ---------------------------------------------------------------------------------------------------------------
# Layers whose weight is GGUF blocks.

class GGUFLayer:
    """Mixin placed before nn.Linear or nn.Embedding (or a subclass such as Gemma's scaled embedding): `weight` is
    uint8 blocks [out, row_bytes] of type `gguf_type`, dequantized to `compute_dtype` for each call. A floating
    `weight` is a dense one set in the blocks' place (ComfyUI's weight patches) and is used as it is."""

    gguf_type: int
    compute_dtype: torch.dtype

    def dequantize_weight(self, raw: torch.Tensor) -> torch.Tensor:  # [out, row_bytes] -> [out, in]
        return dequantize(raw, self.gguf_type).to(self.compute_dtype)

    def forward(self, x, *args, **kwargs):
        if self.weight.is_floating_point():
            return super().forward(x, *args, **kwargs)
        return self.forward_blocks(self.weight, x, *args, **kwargs)

    def forward_blocks(self, raw: torch.Tensor, x, *args, **kwargs):
        return self.forward_dense(self.dequantize_weight(raw), x, *args, **kwargs)

    def forward_dense(self, weight: torch.Tensor, x, *args, **kwargs):
        """The layer's own forward with `weight` in place of the stored one."""
        stored = self._parameters["weight"]
        self._parameters["weight"] = weight
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            self._parameters["weight"] = stored


class GGUFEmbeddingLayer(GGUFLayer):
    """Dequantizes only the rows that the ids look up (a vocabulary matrix is the largest of an LLM)."""

    def forward_blocks(self, raw: torch.Tensor, ids, *args, **kwargs):
        rows = self.dequantize_weight(raw[ids.reshape(-1)])  # [N, D]
        local = torch.arange(rows.shape[0], device=ids.device).reshape(ids.shape)
        padding_idx, self.padding_idx = self.padding_idx, None  # only gradients read it; it indexes the full table
        try:
            return self.forward_dense(rows, local, *args, **kwargs)
        finally:
            self.padding_idx = padding_idx


_gguf_classes: dict[type, type] = {}


def own_class(cls: type) -> type:
    """A GGUF variant's original layer class (the class after the mixins); any other class itself."""
    return cls.__mro__[cls.__mro__.index(GGUFLayer) + 1] if issubclass(cls, GGUFLayer) else cls


def to_gguf_layer(module: torch.nn.Module, raw: torch.Tensor, qtype: int, dtype: torch.dtype) -> None:
    """Turns a Linear or Embedding (in place) into its GGUF variant holding `raw` [out, row_bytes] as weight."""
    cls = own_class(type(module))
    if cls not in _gguf_classes:
        mixin = GGUFEmbeddingLayer if issubclass(cls, torch.nn.Embedding) else GGUFLayer
        _gguf_classes[cls] = type(f"GGUF{cls.__name__}", (mixin, cls), {})
    module.__class__ = _gguf_classes[cls]
    module.gguf_type, module.compute_dtype = int(qtype), dtype
    module._parameters["weight"] = raw if isinstance(raw, torch.nn.Parameter) else \
        torch.nn.Parameter(raw, requires_grad=False)


def stays_quantized(module: torch.nn.Module, param: str, info: TensorInfo, dtype: torch.dtype) -> bool:
    """A matrix of a Linear or Embedding whose stored type is not already `dtype` (F32 matrices are dense)."""
    if param != "weight" or len(info.shape) != 2 or info.type == Q.F32:
        return False
    if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        return False
    if isinstance(module, torch.nn.Embedding) and module.max_norm is not None:  # renormalises the table in place
        return False
    return FLOAT_TYPES.get(info.type) != dtype


# ---------------------------------------------------------------------------------------------------------------
# The model: transformers' classes and GGUF name map, weights from the file.

def weights_map(model, arch: str) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, by gguf-py's name table for the file's architecture (what
    transformers' get_gguf_hf_weights_map reads too, which builds that table again for every submodule)."""
    try:
        table = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                         model.config.get_text_config().num_hidden_layers)
    except StopIteration:
        raise GGUFError(f"gguf {gguf_version()} does not know the GGUF architecture '{arch}'.") from None
    names = {}
    for name in model.state_dict():
        base, suffix = name.rsplit(".", 1)
        gguf_name = table.get_name(base)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = name
    return names


def row_permutation(processor, name: str, rows: int, kwargs: dict) -> np.ndarray | None:
    """How transformers' tensor processor reorders this tensor's rows (llama's q/k head permutation), read off
    by running it on the row numbers; None when it does anything else (changes values, renames)."""
    probe = np.arange(rows, dtype=np.float64)[:, None]  # [rows, 1]
    result = processor.process(weights=probe, name=name, **kwargs)
    out = np.asarray(result.weights)
    if result.name != name or out.shape != probe.shape or not np.array_equal(np.sort(out[:, 0]), probe[:, 0]):
        return None
    return out[:, 0].astype(np.int64)


def load_weights(model: torch.nn.Module, path: str, dtype: torch.dtype) -> torch.nn.Module:
    """Fills a causal LM built on the meta device (accelerate's init_empty_weights) with the GGUF file's weights:
    Linear and Embedding matrices as GGUF blocks (GGUF layers), everything else dense in `dtype`, exactly as
    transformers' dequantizing load makes it."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    file = read_gguf(path)
    config_dict = model.config.to_dict()
    arch = file.metadata.get("general.architecture")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config_dict)
    names = weights_map(model, arch)
    kwargs = {"tensor_key_mapping": names, "parsed_parameters": {"config": config_dict, "tensors": {}}}
    for gguf_name, info in file.tensors.items():
        if gguf_name not in names:
            continue
        check_type(file, gguf_name)
        module_name, param = names[gguf_name].rsplit(".", 1)
        module = model.get_submodule(module_name)
        raw = file.raw(gguf_name)
        perm = row_permutation(processor, gguf_name, info.shape[0], kwargs) \
            if stays_quantized(module, param, info, dtype) else None
        if perm is not None:
            if not np.array_equal(perm, np.arange(len(perm))):
                raw = raw[torch.from_numpy(perm)]
            to_gguf_layer(module, raw, info.type, dtype)
            continue
        weights = dequantize(raw, info.type).reshape(info.shape).numpy()
        tensor = torch.from_numpy(np.copy(processor.process(weights=weights, name=gguf_name, **kwargs).weights))
        module._parameters[param] = torch.nn.Parameter(tensor.to(dtype), requires_grad=False)
    tie_output(model)
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if missing:
        raise GGUFError(f"'{path}' has no tensor for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: "
                        "the file is incomplete or made for another architecture. Download it again.")
    return model.eval().requires_grad_(False)


def tie_output(model) -> None:
    """Tied embeddings: the LM head holds the embedding's own Parameter (blocks or dense), counted once."""
    text_config = model.config.get_text_config()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or not head.weight.is_meta or not getattr(text_config, "tie_word_embeddings", False):
        return
    if isinstance(embed, GGUFLayer):
        to_gguf_layer(head, embed.weight, embed.gguf_type, embed.compute_dtype)
    else:
        head.weight = embed.weight


def dequantize_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Every GGUF layer back to its own class holding its dequantized weight: the model as a load that dequantizes
    everything makes it (tied layers keep sharing one Parameter)."""
    dense: dict[int, torch.nn.Parameter] = {}
    for m in list(model.modules()):
        if isinstance(m, GGUFLayer):
            raw = m.weight
            if id(raw) not in dense:
                dense[id(raw)] = torch.nn.Parameter(m.dequantize_weight(raw), requires_grad=False)
            m.__class__ = own_class(type(m))
            m._parameters["weight"] = dense[id(raw)]
    return model
