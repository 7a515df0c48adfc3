"""safetensors files for LI-DiT models and LLM Diff Adapters: weights plus the metadata needed to rebuild
them (config, the LLM(s) and encoder settings they expect). Never pickle."""
from __future__ import annotations

import contextlib
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .diff_adapter import HostAdapter, LLMDiffAdapter
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


@contextlib.contextmanager
def written_atomically(path: str):
    """Yields `<path>.partial` to write, and renames it to `path` when the block ends without an error: a kill or
    an error never leaves a half-written file under the final name."""
    tmp = path + ".partial"
    yield tmp
    os.replace(tmp, path)


def _atomic_save(tensors: dict, path: str, metadata: dict) -> None:
    with written_atomically(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def save_lidit(path: str, model: LIDiT, text_encoders: list[dict], extra: dict | None = None,
               dtype: torch.dtype = torch.float16) -> None:
    meta = {"format": "li-dit", "config": json.dumps(model.config.to_dict()),
            "text_encoders": json.dumps(text_encoders)}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    _atomic_save({k: v.to(dtype) for k, v in model.state_dict().items()}, path, meta)


def read_lidit(path: str) -> tuple[LIDiTConfig, dict]:
    """The config and the decoded metadata of an LI-DiT file, checked against the tensors in its header before
    anything is allocated: a small file whose metadata asks for a huge model is refused here."""
    meta = read_metadata(path, "li-dit")
    name = os.path.basename(path)
    info = {k: _json_field(meta, k, name) for k in meta if k != "format"}
    if not isinstance(info.get("config"), dict):
        raise CheckpointError(f"'{name}' has no LI-DiT config in its metadata (a 'config' JSON object); the file "
                              "was not written by this pack's exporter. Export it again with training/train_lidit.py.")
    shapes = tensor_shapes(path)
    config = _lidit_config(info["config"], shapes, name)
    check_shapes(path, shapes, lambda: LIDiT(config))
    return config, info


def load_lidit(path: str) -> tuple[LIDiT, dict]:
    config, info = read_lidit(path)
    model = LIDiT(config)
    module_load(model, load_weights(path))
    return model, info


def save_adapter(path: str, adapter: LLMDiffAdapter, llm_name: str, extra: dict | None = None) -> None:
    meta = {"format": "llm-diff-adapter", "llm": llm_name,
            "llm_hidden_size": str(adapter.llm_hidden_size), "num_hidden_states": str(adapter.num_hidden_states),
            "context_dim": str(adapter.context_dim), "refiner_depth": str(adapter.refiner_depth)}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    _atomic_save(adapter.state_dict(), path, meta)


ADAPTER_SIZES = ("llm_hidden_size", "num_hidden_states", "context_dim")
# the weight dtypes a user can choose by name (the loaders' and trainers' options, besides "auto")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _refiner_depth(meta: dict, shapes: dict, prefix: str, name: str) -> int:
    # an adapter without a refiner may leave the key out
    depth = _int_field(meta, "refiner_depth", name, minimum=0) if "refiner_depth" in meta else 0
    have = _count(shapes, prefix + "refiner.blocks.")
    if depth != have:  # before building: a skeleton of a huge depth alone takes minutes
        raise CheckpointError(f"'{name}' does not match its own config (refiner_depth says {depth} but the file "
                              f"holds {have}); the file was edited or is damaged. Export it again.")
    return depth


def load_adapter(path: str) -> tuple[LLMDiffAdapter, dict]:
    meta = read_metadata(path, "llm-diff-adapter")
    name = os.path.basename(path)
    sizes = [_int_field(meta, k, name) for k in ADAPTER_SIZES]
    shapes = tensor_shapes(path)
    depth = _refiner_depth(meta, shapes, "", name)
    build = lambda: LLMDiffAdapter(*sizes, refiner_depth=depth)  # noqa: E731
    check_shapes(path, shapes, build)
    adapter = build()
    module_load(adapter, load_weights(path))
    return adapter, meta


HOST_FAMILIES = ("lidit", "unet", "flux", "mmdit")


def save_host_adapter(path: str, host: HostAdapter, family: str, llm_name: str, extra: dict | None = None) -> None:
    """An LLM Diff Adapter for an existing model: the adapter and its second cross-attentions in one file, with
    the host family, the LLM and every size needed to rebuild it in the metadata."""
    if family not in HOST_FAMILIES:
        raise ValueError(f"family must be one of {HOST_FAMILIES}, not '{family}'")
    a = host.adapter
    meta = {"format": "llm-host-adapter", "family": family, "llm": llm_name, "kind": host.kind,
            "llm_hidden_size": str(a.llm_hidden_size), "num_hidden_states": str(a.num_hidden_states),
            "context_dim": str(a.context_dim), "refiner_depth": str(a.refiner_depth), "sites": json.dumps(host.sites)}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    _atomic_save(host.state_dict(), path, meta)


def load_host_adapter(path: str) -> tuple[HostAdapter, dict]:
    meta = read_metadata(path, "llm-host-adapter")
    name = os.path.basename(path)
    sizes = [_int_field(meta, k, name) for k in ADAPTER_SIZES]
    sites = _json_field(meta, "sites", name)
    if not (isinstance(sites, list) and all(isinstance(s, list) and len(s) == 3 for s in sites)) \
            or meta.get("family") not in HOST_FAMILIES or meta.get("kind") not in ("decoupled", "gated"):
        raise CheckpointError(f"'{name}' has broken host metadata (family {meta.get('family')!r}, kind "
                              f"{meta.get('kind')!r}, sites); the file was edited or is damaged. Train or export it "
                              "again.")
    shapes = tensor_shapes(path)
    depth = _refiner_depth(meta, shapes, "adapter.", name)
    build = lambda: HostAdapter(*sizes, sites, meta["kind"], refiner_depth=depth)  # noqa: E731
    check_shapes(path, shapes, build)
    host = build()
    module_load(host, load_weights(path))
    info = {k: v for k, v in meta.items() if k != "sites"}
    info["sites"] = host.sites
    return host, info


def trained_on_contributions(meta: dict) -> bool:
    """Whether an adapter file's encoder settings (its `encoder` metadata) are block contributions rather than
    hidden states (train_lidit.py --block-outputs)."""
    try:
        return bool(json.loads(meta.get("encoder", "{}")).get("contributions", False))
    except (TypeError, ValueError, AttributeError):
        return False


def contributions_fix(trained_on: bool) -> str:
    """What an adapter trained on block contributions (or not) needs of LLM Prompt Encode."""
    return (f"was trained on each block's {'contribution' if trained_on else 'output'}: turn block_contributions "
            f"{'on' if trained_on else 'off'}")


def save_word_encoder(path: str, encoder: WordEncoder, extra: dict | None = None) -> None:
    """The no-LLM baseline's text encoder; its vocabulary goes into the metadata as JSON (no pickle)."""
    meta = {"format": "word-encoder", "vocabulary": json.dumps(encoder.vocabulary), "dim": str(encoder.dim),
            "max_tokens": str(encoder.max_tokens)}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    _atomic_save(encoder.state_dict(), path, meta)


def load_word_encoder(path: str) -> tuple[WordEncoder, dict]:
    meta = read_metadata(path, "word-encoder")
    name = os.path.basename(path)
    vocabulary = _json_field(meta, "vocabulary", name)
    if not (isinstance(vocabulary, list) and all(isinstance(w, str) for w in vocabulary)):
        raise CheckpointError(f"'{name}' has no word list in its 'vocabulary' metadata; export it again.")
    dim, max_tokens = (_int_field(meta, k, name) for k in ("dim", "max_tokens"))
    check_shapes(path, tensor_shapes(path), lambda: WordEncoder(vocabulary, dim, max_tokens))
    encoder = WordEncoder(vocabulary, dim, max_tokens)
    module_load(encoder, load_weights(path))
    return encoder, meta


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, from the safetensors header alone (nothing is read or allocated)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"'{os.path.basename(path)}' is corrupt or truncated ({e}); download or export "
                              "it again.") from e


def check_shapes(path: str, shapes: dict[str, tuple[int, ...]], build) -> None:
    """Compares the file's tensors with those of build() made on the meta device (shapes only, no memory)."""
    name = os.path.basename(path)
    try:
        with torch.device("meta"):
            own = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"'{name}' has metadata that describes no valid model ({e}); the file was edited "
                              "or is damaged. Export it again.") from e
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    wrong = [k for k in own if k in shapes and own[k] != shapes[k]]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected else
                  f"{wrong[0]} is {shapes[wrong[0]]} in the file but {own[wrong[0]]} in the model")
        raise CheckpointError(f"'{name}' does not match its own config ({detail}); the file was edited or is "
                              "damaged. Export it again.")


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the file, all of them finite: NaN or infinite weights (a diverged training run, a damaged
    copy) would not fail anywhere later, they would only draw a black image."""
    name = os.path.basename(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"'{name}' is corrupt or truncated ({e}); export it again.") from e
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(finite(t).all()))
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise CheckpointError(f"'{name}' holds NaN or infinite weights in {len(bad)} of {len(tensors)} tensors "
                              f"({shown}); it would draw black images. The file is damaged or was saved from a "
                              "training run that diverged: download it again, or export it again from a checkpoint "
                              "taken before the loss became NaN.")
    return tensors


def finite(t: torch.Tensor) -> torch.Tensor:
    # torch has no isfinite for the fp8 types; widening to fp16 keeps every fp8 value, NaN and inf included
    return torch.isfinite(t.half() if t.element_size() == 1 else t)


def module_load(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads weights already checked by check_shapes, in the module's own dtype."""
    own = module.state_dict()
    module.load_state_dict({k: state[k].to(own[k].dtype) for k in own})


def _json_field(meta: dict, key: str, name: str):
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'{name}' has broken JSON in its '{key}' metadata ({e}); the file was edited or is "
                              "damaged. Export it again.") from e


def _lidit_config(raw: dict, shapes: dict, name: str) -> LIDiTConfig:
    fields = set(LIDiTConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise CheckpointError(f"'{name}' has unknown LI-DiT config keys {unknown} (known: {sorted(fields)}); it "
                              "was made by a newer or different exporter. Update the pack or export it again.")
    try:
        config = LIDiTConfig(**raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"'{name}' has an invalid LI-DiT config ({e}); export it again.") from e
    # Block counts first: building even a meta-device skeleton of a config with a million blocks takes minutes.
    counts = {"depth": (config.depth, _count(shapes, "blocks.")),
              "refiner_depth": (config.refiner_depth, _count(shapes, "refiner.branches.0.blocks.")),
              "context_dims": (len(config.context_dims), _count(shapes, "refiner.branches."))}
    for key, (want, have) in counts.items():
        if want != have:
            raise CheckpointError(f"'{name}' does not match its own config ({key} says {want} but the file holds "
                                  f"{have}); the file was edited or is damaged. Export it again.")
    return config


def _count(shapes: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})


def _int_field(meta: dict, key: str, name: str, minimum: int = 1) -> int:
    try:
        value = int(meta[key])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"'{name}' has no integer '{key}' in its metadata (found {meta.get(key)!r}); the "
                              "file was edited or is damaged. Export it again.") from e
    if value < minimum:
        raise CheckpointError(f"'{name}' has {key}={value} in its metadata; it must be at least {minimum}. Export "
                              "it again.")
    return value
