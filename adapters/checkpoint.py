"""safetensors files for LI-DiT models and LLM Diff Adapters: weights plus the metadata needed to rebuild
them (config, the LLM(s) and encoder settings they expect). Never pickle."""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .diff_adapter import LLMDiffAdapter
from .lidit import LIDiT, LIDiTConfig
from .word_encoder import WordEncoder


class CheckpointError(ValueError):
    """A model file that cannot be used; the message names the problem and the fix."""


def read_metadata(path: str, expected_format: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"Model file not found: '{path}'.")
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"'{os.path.basename(path)}' is not a .safetensors file; only safetensors weights "
                              "are loaded (pickled .ckpt/.pt/.bin files can run arbitrary code).")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"'{os.path.basename(path)}' is corrupt or truncated ({e}); download or export "
                              "it again.") from e
    if meta.get("format") != expected_format:
        raise CheckpointError(f"'{os.path.basename(path)}' is not a {expected_format} file (its metadata says "
                              f"format={meta.get('format')!r}). Pick the right loader for it.")
    return meta


def _atomic_save(tensors: dict, path: str, metadata: dict) -> None:
    # An interrupted export must never leave a half-written file under the final name.
    tmp = path + ".partial"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def save_lidit(path: str, model: LIDiT, text_encoders: list[dict], extra: dict | None = None,
               dtype: torch.dtype = torch.float16) -> None:
    meta = {"format": "li-dit", "config": json.dumps(model.config.to_dict()),
            "text_encoders": json.dumps(text_encoders)}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    _atomic_save({k: v.to(dtype) for k, v in model.state_dict().items()}, path, meta)


def load_lidit(path: str) -> tuple[LIDiT, dict]:
    meta = read_metadata(path, "li-dit")
    config = LIDiTConfig(**json.loads(meta["config"]))
    model = LIDiT(config)
    _load_state(model, path)
    info = {k: json.loads(v) for k, v in meta.items() if k not in ("format",)}
    return model, info


def save_adapter(path: str, adapter: LLMDiffAdapter, llm_name: str, extra: dict | None = None) -> None:
    meta = {"format": "llm-diff-adapter", "llm": llm_name,
            "llm_hidden_size": str(adapter.llm_hidden_size), "num_hidden_states": str(adapter.num_hidden_states),
            "context_dim": str(adapter.context_dim)}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    _atomic_save(adapter.state_dict(), path, meta)


def load_adapter(path: str) -> tuple[LLMDiffAdapter, dict]:
    meta = read_metadata(path, "llm-diff-adapter")
    adapter = LLMDiffAdapter(int(meta["llm_hidden_size"]), int(meta["num_hidden_states"]), int(meta["context_dim"]))
    _load_state(adapter, path)
    return adapter, meta


def save_word_encoder(path: str, encoder: WordEncoder, extra: dict | None = None) -> None:
    """The no-LLM baseline's text encoder; its vocabulary goes into the metadata as JSON (no pickle)."""
    meta = {"format": "word-encoder", "vocabulary": json.dumps(encoder.vocabulary), "dim": str(encoder.dim),
            "max_tokens": str(encoder.max_tokens)}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    _atomic_save(encoder.state_dict(), path, meta)


def load_word_encoder(path: str) -> tuple[WordEncoder, dict]:
    meta = read_metadata(path, "word-encoder")
    encoder = WordEncoder(json.loads(meta["vocabulary"]), int(meta["dim"]), int(meta["max_tokens"]))
    _load_state(encoder, path)
    return encoder, meta


def _load_state(module: torch.nn.Module, path: str) -> None:
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"'{os.path.basename(path)}' is corrupt or truncated ({e}); export it again.") from e
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else \
            f"{wrong[0]} is {tuple(state[wrong[0]].shape)} in the file but {tuple(own[wrong[0]].shape)} in the model"
        raise CheckpointError(f"'{os.path.basename(path)}' does not match its own config ({detail}); the file "
                              "was edited or is damaged.")
    module.load_state_dict({k: state[k].to(own[k].dtype) for k in own})
