"""LLM features of every caption, computed once with the frozen LLM and cached in a safetensors file."""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from adapters.checkpoint import written_atomically
from adapters.llm_encoder import INSTRUCTION_PRESETS, encode_prompts, load_llm, num_hidden_states, parse_layers

log = logging.getLogger(__name__)


def encoder_settings(llm_path: str, layers: str, instruction: str, max_tokens: int,
                     contributions: bool = False) -> dict:
    settings = {"llm": os.path.basename(llm_path.rstrip("/")), "layers": layers, "instruction": instruction,
                "chat_template": True, "max_tokens": max_tokens}
    if contributions:  # only then, so that the feature caches of plain hidden states keep their keys
        settings["contributions"] = True
    return settings


ENCODER_KEYS = ("llm", "layers", "instruction", "chat_template", "max_tokens")


def settings_of(entry: dict) -> dict:
    """The encoder settings of a model file's text-encoder entry (its metadata), as encoder_settings makes them."""
    settings = {k: entry[k] for k in ENCODER_KEYS}
    if entry.get("contributions"):
        settings["contributions"] = True
    return settings


def llm_fingerprint(llm_path: str) -> list:
    """Which weights the features come from: the LLM's absolute path and the size and mtime of its files, so that
    two LLMs with the same file or folder name never share cached features."""
    path = os.path.abspath(llm_path)
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
    return [path] + [[os.path.basename(f), os.path.getsize(f), os.path.getmtime(f)] for f in files
                     if os.path.isfile(f)]


def caption_features(llm_path: str, captions: list[str], settings: dict, cache_dir: str,
                     batch_size: int = 16) -> tuple[list[torch.Tensor], int]:
    """Returns one [S, T_i, D] fp16 tensor per caption (prompt tokens only, the S layers that settings['layers']
    selects) and the LLM's hidden-state count. The cache holds every layer, so layer ablations share it."""
    cached = {k: v for k, v in settings.items() if k != "layers"}
    if cached.get("contributions"):  # the key names how they are computed: features made another way are not reused
        cached["contributions"] = "states minus the same token's states in a one-token prompt"
    key = hashlib.sha256(json.dumps([cached, captions, llm_fingerprint(llm_path)]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"features-{settings['llm']}-{key}.safetensors")
    if not os.path.exists(path):
        _encode_to_cache(llm_path, captions, settings, path, batch_size)
    data = load_file(path)
    num_states = int(data["num_hidden_states"].item())
    picked = parse_layers(settings["layers"], num_states)
    return [data[f"c{i}"][picked] for i in range(len(captions))], num_states


def encode_captions(model, tokenizer, captions: list[str], settings: dict, batch_size: int = 16,
                    device=None) -> list[torch.Tensor]:
    """One [L+1, T_i, D] fp16 tensor per caption: every hidden state of the prompt tokens, on the CPU. settings
    "weighted": read ComfyUI's prompt weights in the captions (adapters.prompt_weights)."""
    out = []
    for start in tqdm(range(0, len(captions), batch_size), desc=f"LLM features ({settings['llm']})"):
        batch = captions[start:start + batch_size]
        enc = encode_prompts(model, tokenizer, batch, instruction=INSTRUCTION_PRESETS[settings["instruction"]],
                             use_chat_template=settings["chat_template"], layers="all",
                             max_tokens=settings["max_tokens"], device=device,
                             contributions=settings.get("contributions", False),
                             weighted=settings.get("weighted", False))
        for b in range(len(batch)):
            n = int(enc.attention_mask[b].sum())
            out.append(enc.hidden_states[b, :, :n].to(torch.float16).cpu().clone())
    return out


def _encode_to_cache(llm_path: str, captions: list[str], settings: dict, path: str, batch_size: int) -> None:
    model, tokenizer = load_llm(llm_path)
    out = encode_captions(model, tokenizer, captions, settings, batch_size)
    num_states = num_hidden_states(model)
    tensors = {f"c{i}": t for i, t in enumerate(out)}
    tensors["num_hidden_states"] = torch.tensor(num_states)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with written_atomically(path) as tmp:
        save_file(tensors, tmp)


def collate(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads [S, T_i, D] tensors to [B, S, T, D] with a [B, T] mask."""
    T = max(f.shape[1] for f in features)
    S, D = features[0].shape[0], features[0].shape[2]
    out = torch.zeros(len(features), S, T, D, dtype=torch.float32)
    mask = torch.zeros(len(features), T, dtype=torch.long)
    for b, f in enumerate(features):
        out[b, :, :f.shape[1]] = f.float()
        mask[b, :f.shape[1]] = 1
    return out, mask
