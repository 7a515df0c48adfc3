"""Model folders of the pack, registered with ComfyUI's folder_paths.

LLM:          models/LLM (also ComfyUI's text_encoders): .gguf files and Hugging Face folders
llm_adapters: models/llm_adapters, and the pack's own models/llm_adapters (the default adapter ships there)
lidit:        models/lidit (also diffusion_models), and the pack's own models/lidit (the default model)
"""
import contextlib
import functools
import logging
import os
import shutil

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
        stat = os.stat(path)
    except OSError:
        return False
    return _file_format(path, stat.st_mtime_ns, stat.st_size) == "li-dit"


@functools.lru_cache(maxsize=4096)
def _file_format(path: str, mtime_ns: int, size: int) -> str | None:
    """The `format` metadata of a safetensors file, read once per version of the file (the list is asked for on
    every schema request, and diffusion_models may hold hundreds of large checkpoints)."""
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:
        return None


MAX_LLM_DEPTH = 4  # folders below an LLM root; a deeper tree is not a model collection
_llm_listing: tuple[dict[str, str], dict[str, float]] | None = None  # (entries, mtime of every folder walked)


def llm_entries() -> dict[str, str]:
    """Display name -> path for every .gguf file and Hugging Face folder (config.json) in the LLM folders.

    Called on every schema request and every load, so the listing is cached and rebuilt only when a folder
    walked changed (by mtime), as ComfyUI's folder_paths.get_filename_list does. ComfyUI's own recursive_search
    cannot be reused: it follows symlinks without a loop check, and a link such as `loop/a -> .` would hang."""
    global _llm_listing
    roots = folder_paths.get_folder_paths("LLM") + folder_paths.get_folder_paths("text_encoders")
    if _llm_listing is None or not _listing_is_current(_llm_listing[1], roots):
        _llm_listing = _walk_llm_roots(roots)
    return dict(_llm_listing[0])


def _listing_is_current(mtimes: dict[str, float], roots: list[str]) -> bool:
    if any(os.path.isdir(r) and r not in mtimes for r in roots):
        return False
    try:
        return all(os.path.getmtime(d) == t for d, t in mtimes.items())
    except OSError:  # a folder walked before is gone
        return False


def _walk_llm_roots(roots: list[str]) -> tuple[dict[str, str], dict[str, float]]:
    found, mtimes = {}, {}
    for root in roots:
        if not os.path.isdir(root):
            continue
        visited = set()  # real paths: a symlink back to a folder already walked is skipped, so loops end
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            rel = os.path.relpath(dirpath, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if real in visited:
                dirnames[:] = []
                continue
            visited.add(real)
            with contextlib.suppress(OSError):
                mtimes[dirpath] = os.path.getmtime(dirpath)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")] if depth < MAX_LLM_DEPTH else []
            if "config.json" in filenames and dirpath != root:
                found.setdefault(rel.replace(os.sep, "/"), dirpath)
                dirnames[:] = []
                continue
            for f in filenames:
                if f.endswith(".gguf"):
                    name = f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")
                    found.setdefault(name, os.path.join(dirpath, f))
    return dict(sorted(found.items())), mtimes


def remove_old_gguf_cache() -> None:
    """Removes the folder of dequantized GGUF copies (hundreds of MB each) that nothing reads: GGUF weights load from
    the .gguf file itself."""
    ours = os.path.join(folder_paths.get_system_user_directory("cache"), "llm_diffusion")
    folder = os.path.join(ours, "gguf")
    if os.path.isdir(folder):
        logging.info("Removing %s: converted GGUF copies that the LLM Loader does not use.", folder)
        shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # only when empty: anything else in it is not this function's
        os.rmdir(ours)
