"""Model folders of the pack, registered with ComfyUI's folder_paths.

LLM:          models/LLM (also ComfyUI's text_encoders): .gguf files and Hugging Face folders
llm_adapters: models/llm_adapters, and the pack's own models/llm_adapters (the default adapter ships there)
lidit:        models/lidit (also diffusion_models), and the pack's own models/lidit (the default model)
"""
import os

import folder_paths

PACK_MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def register() -> None:
    for name, extra in (("LLM", []), ("llm_adapters", [os.path.join(PACK_MODELS, "llm_adapters")]),
                        ("lidit", [os.path.join(PACK_MODELS, "lidit")])):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)
        for path in extra:
            folder_paths.add_model_folder_path(name, path)
    for name in ("llm_adapters", "lidit"):
        folder_paths.folder_names_and_paths[name][1].add(".safetensors")


def lidit_models() -> list[str]:
    names = folder_paths.get_filename_list("lidit")
    names += [n for n in folder_paths.get_filename_list("diffusion_models") if _is_lidit(n)]
    return sorted(set(names))


def lidit_path(name: str) -> str:
    return folder_paths.get_full_path("lidit", name) or folder_paths.get_full_path_or_raise("diffusion_models", name)


def _is_lidit(name: str) -> bool:
    path = folder_paths.get_full_path("diffusion_models", name)
    if not path or not path.endswith(".safetensors"):
        return False
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == "li-dit"
    except Exception:
        return False


def llm_entries() -> dict[str, str]:
    """Display name -> path for every .gguf file and Hugging Face folder (config.json) in the LLM folders."""
    found = {}
    for root in folder_paths.get_folder_paths("LLM") + folder_paths.get_folder_paths("text_encoders"):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, root)
            if "config.json" in filenames and dirpath != root:
                found.setdefault(rel.replace(os.sep, "/"), dirpath)
                dirnames[:] = []
                continue
            for f in filenames:
                if f.endswith(".gguf"):
                    name = f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")
                    found.setdefault(name, os.path.join(dirpath, f))
    return dict(sorted(found.items()))


def gguf_cache() -> str:
    """Where GGUF files are kept converted to safetensors (ComfyUI's system cache, not served over HTTP)."""
    return os.path.join(folder_paths.get_system_user_directory("cache"), "llm_diffusion", "gguf")
