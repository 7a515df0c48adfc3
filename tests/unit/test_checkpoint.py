"""adapters.checkpoint: safetensors round trips and the errors for files that cannot be used."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters.checkpoint import (CheckpointError, load_adapter, load_host_adapter, load_lidit, load_word_encoder,
                                 save_adapter, save_host_adapter, save_lidit, save_word_encoder)
from adapters.diff_adapter import HostAdapter, LLMDiffAdapter
from adapters.lidit import LIDiT, LIDiTConfig
from adapters.word_encoder import WordEncoder, build_vocabulary

TEXT_ENCODERS = [
    {"llm": "llama", "layers": "all", "instruction": "li-dit", "chat_template": True, "max_tokens": 64,
     "adapter": "x-adapter.safetensors"},
    {"llm": "qwen2", "layers": "-3", "instruction": "none", "chat_template": False, "max_tokens": 32,
     "adapter": None},
]


def awake_lidit(wake) -> LIDiT:
    torch.manual_seed(0)
    return wake(LIDiT(LIDiTConfig(patch_size=2, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0,
                                  context_dims=(24, 16), refiner_depth=1)))


def lidit_output(model: LIDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, 10, generator=g)
    contexts = [torch.randn(2, 4, 24, generator=g), torch.randn(2, 3, 16, generator=g)]
    with torch.no_grad():
        return model(x, torch.tensor([0.25, 0.75]), contexts)


def adapter_output(adapter: LLMDiffAdapter) -> torch.Tensor:
    with torch.no_grad():
        return adapter(torch.randn(2, 4, 3, 24, generator=torch.Generator().manual_seed(2)))


def trained_adapter() -> LLMDiffAdapter:
    torch.manual_seed(0)
    adapter = LLMDiffAdapter(24, 4, 16)
    with torch.no_grad():
        adapter.block_logits.normal_()
        adapter.norm.weight.uniform_(0.5, 1.5)
    return adapter


# ---------------------------------------------------------------------------------------------------------------
# Round trips


def test_lidit_round_trip_exact_in_fp32(tmp_path, wake):
    model = awake_lidit(wake)
    path = str(tmp_path / "m.safetensors")
    save_lidit(path, model, TEXT_ENCODERS, extra={"resolution": 32, "latent": "pixel_space"}, dtype=torch.float32)
    loaded, info = load_lidit(path)
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.testing.assert_close(lidit_output(loaded), lidit_output(model), atol=0, rtol=0)
    assert LIDiTConfig(**info["config"]) == model.config
    assert info["text_encoders"] == TEXT_ENCODERS
    assert info["resolution"] == 32 and info["latent"] == "pixel_space"
    assert not os.path.exists(path + ".partial")


def test_lidit_round_trip_fp16_storage(tmp_path, wake):
    model = awake_lidit(wake)
    path = str(tmp_path / "m.safetensors")
    save_lidit(path, model, TEXT_ENCODERS)
    with safe_open(path, framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    loaded, _ = load_lidit(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float(), atol=0, rtol=0)
    ref = lidit_output(model)
    torch.testing.assert_close(lidit_output(loaded), ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2)


def test_adapter_round_trip(tmp_path):
    adapter = trained_adapter()
    path = str(tmp_path / "a.safetensors")
    save_adapter(path, adapter, "qwen2", extra={"encoder": TEXT_ENCODERS[0]})
    loaded, meta = load_adapter(path)
    assert (loaded.llm_hidden_size, loaded.num_hidden_states, loaded.context_dim) == (24, 4, 16)
    torch.testing.assert_close(adapter_output(loaded), adapter_output(adapter), atol=0, rtol=0)
    assert meta["format"] == "llm-diff-adapter" and meta["llm"] == "qwen2"
    assert json.loads(meta["encoder"]) == TEXT_ENCODERS[0]


def test_saving_replaces_an_existing_file(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_adapter(path, LLMDiffAdapter(24, 4, 16), "first")
    save_adapter(path, trained_adapter(), "second")
    loaded, meta = load_adapter(path)
    assert meta["llm"] == "second"
    torch.testing.assert_close(adapter_output(loaded), adapter_output(trained_adapter()), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Files that cannot be used


def saved_lidit(tmp_path, wake) -> str:
    path = str(tmp_path / "m.safetensors")
    save_lidit(path, awake_lidit(wake), TEXT_ENCODERS)
    return path


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.01])
def test_truncated_file_is_reported_as_corrupt(tmp_path, wake, keep):
    path = saved_lidit(tmp_path, wake)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_lidit(path)


def test_random_bytes_are_reported_as_corrupt(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_adapter(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_lidit(str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("name", ["m.ckpt", "m.pt", "m.bin", "m.safetensors.bak"])
def test_non_safetensors_path_is_refused(tmp_path, wake, name):
    src = saved_lidit(tmp_path, wake)
    path = str(tmp_path / name)
    os.rename(src, path)
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        load_lidit(path)


def test_adapter_loaded_as_lidit_names_the_format(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_adapter(path, trained_adapter(), "llama")
    with pytest.raises(CheckpointError) as err:
        load_lidit(path)
    assert "li-dit" in str(err.value) and "llm-diff-adapter" in str(err.value)


def test_lidit_loaded_as_adapter_names_the_format(tmp_path, wake):
    path = saved_lidit(tmp_path, wake)
    with pytest.raises(CheckpointError) as err:
        load_adapter(path)
    assert "llm-diff-adapter" in str(err.value) and "li-dit" in str(err.value)


def test_plain_safetensors_without_metadata(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="format=None"):
        load_lidit(path)


def rewrite(path: str, edit) -> None:
    """Applies edit(tensors) and writes the file back with its metadata."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=meta)


def test_wrong_shape_is_reported(tmp_path, wake):
    path = saved_lidit(tmp_path, wake)
    key = "final_layer.linear.weight"
    shape = tuple(load_file(path)[key].shape)

    def grow(t):
        t[key] = torch.zeros(shape[0] + 1, shape[1], dtype=torch.float16)

    rewrite(path, grow)
    with pytest.raises(CheckpointError) as err:
        load_lidit(path)
    msg = str(err.value)
    assert key in msg and str((shape[0] + 1, shape[1])) in msg and str(shape) in msg


def test_missing_tensor_is_reported(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_adapter(path, trained_adapter(), "llama")
    rewrite(path, lambda t: t.pop("proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing \['proj.bias'\]"):
        load_adapter(path)


def test_config_that_does_not_match_the_weights(tmp_path, wake):
    path = saved_lidit(tmp_path, wake)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    config["context_dims"] = [24, 40]
    meta["config"] = json.dumps(config)
    save_file(load_file(path), path, metadata=meta)
    with pytest.raises(CheckpointError, match="in_proj.weight"):
        load_lidit(path)


def rewrite_metadata(path: str, edit) -> None:
    """Applies edit(metadata) and writes the file back with its tensors."""
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
    edit(meta)
    save_file(load_file(path), path, metadata=meta)


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 2 ** 20, "x_embedder.weight"),   # a 1.4 KB file that would ask for terabytes
    ("mlp_ratio", 1e7, "mlp.0.weight"),
    ("depth", 10 ** 7, "depth says 10000000 but the file holds 2"),  # millions of blocks, even on meta, take long
    ("context_dims", [24], "context_dims says 1 but the file holds 2"),
])
def test_config_is_checked_against_the_header_before_building(tmp_path, wake, field, value, message):
    path = saved_lidit(tmp_path, wake)
    rewrite_metadata(path, lambda m: m.update(config=json.dumps({**json.loads(m["config"]), field: value})))
    before = peak_rss_mb()
    with pytest.raises(CheckpointError, match=message) as err:
        load_lidit(path)
    assert "does not match its own config" in str(err.value)
    assert peak_rss_mb() - before < 200  # nothing the size of the claimed model was allocated


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("config"), "no LI-DiT config in its metadata"),
    (lambda m: m.update(config="{not json"), "broken JSON in its 'config' metadata"),
    (lambda m: m.update(text_encoders="[1, 2"), "broken JSON in its 'text_encoders' metadata"),
    (lambda m: m.update(config=json.dumps({**json.loads(m["config"]), "flash": True})),
     r"unknown LI-DiT config keys \['flash'\]"),
    (lambda m: m.update(config=json.dumps({**json.loads(m["config"]), "num_heads": 3})),
     "invalid LI-DiT config .*not divisible"),
    (lambda m: m.update(config=json.dumps({**json.loads(m["config"]), "hidden_size": "wide"})),
     "invalid LI-DiT config|describes no valid model"),
], ids=["no-config", "bad-json", "bad-json-other-key", "unknown-key", "invalid-value", "wrong-type"])
def test_broken_lidit_metadata_is_a_checkpoint_error(tmp_path, wake, edit, message):
    path = saved_lidit(tmp_path, wake)
    rewrite_metadata(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_lidit(path)


def test_extra_tensor_is_reported(tmp_path, wake):
    path = saved_lidit(tmp_path, wake)
    rewrite(path, lambda t: t.update(smuggled=torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected \['smuggled'\]"):
        load_lidit(path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("context_dim"), "no integer 'context_dim' in its metadata \\(found None\\)"),
    (lambda m: m.update(num_hidden_states="four"), "no integer 'num_hidden_states' in its metadata \\(found 'four'\\)"),
    (lambda m: m.update(llm_hidden_size="-24"), "llm_hidden_size=-24 .* must be at least 1"),
    (lambda m: m.update(llm_hidden_size=str(2 ** 30)), "does not match its own config"),
], ids=["missing", "not-an-integer", "negative", "huge"])
def test_broken_adapter_metadata_is_a_checkpoint_error(tmp_path, edit, message):
    path = str(tmp_path / "a.safetensors")
    save_adapter(path, trained_adapter(), "llama")
    rewrite_metadata(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_adapter(path)


# ---------------------------------------------------------------------------------------------------------------
# Weights that are not numbers: an intact header over NaN data ran and drew a black image


def saved_files(tmp_path, wake) -> dict:
    """One file per loader of this module: loader -> path."""
    paths = {kind: str(tmp_path / f"{kind}.safetensors") for kind in ("lidit", "adapter", "host", "words")}
    save_lidit(paths["lidit"], awake_lidit(wake), TEXT_ENCODERS)
    save_adapter(paths["adapter"], trained_adapter(), "llama")
    save_host_adapter(paths["host"], HostAdapter(24, 4, 16, [("block0", 32, 2), ("block1", 32, 2)], "decoupled"),
                      "lidit", "llama")
    save_word_encoder(paths["words"], WordEncoder(build_vocabulary(["a red circle"]), 8, 12))
    return {load_lidit: paths["lidit"], load_adapter: paths["adapter"], load_host_adapter: paths["host"],
            load_word_encoder: paths["words"]}


LOADERS = [load_lidit, load_adapter, load_host_adapter, load_word_encoder]


@pytest.mark.parametrize("load", LOADERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_weights_that_are_not_finite_are_refused(tmp_path, wake, load, bad):
    path = saved_files(tmp_path, wake)[load]
    names = sorted(load_file(path))
    poisoned = names[1::3]  # several tensors, not the first: the message must find each

    def poison(tensors):
        for k in poisoned:
            tensors[k].view(-1)[-1] = bad  # one value at the end of each: the whole tensor is checked

    rewrite(path, poison)
    with pytest.raises(CheckpointError) as err:
        load(path)
    msg = str(err.value)
    assert os.path.basename(path) in msg
    assert f"{len(poisoned)} of {len(names)} tensors" in msg
    assert all(k in msg for k in poisoned[:3])  # the first bad ones by name
    assert "export it again" in msg.lower() or "download it again" in msg.lower()


@pytest.mark.parametrize("load", LOADERS, ids=lambda f: f.__name__)
def test_finite_weights_still_load(tmp_path, wake, load):
    path = saved_files(tmp_path, wake)[load]
    module, _ = load(path)
    assert all(torch.isfinite(t).all() for t in module.state_dict().values())


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_fp8_files_are_checked_too(tmp_path, wake, dtype):
    """torch has no isfinite for fp8: a file stored in fp8 loads when finite and is refused with NaN in it."""
    path = saved_files(tmp_path, wake)[load_adapter]
    rewrite(path, lambda tensors: tensors.update({k: v.to(dtype) for k, v in tensors.items()}))
    load_adapter(path)
    rewrite(path, lambda tensors: tensors["proj.weight"].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(CheckpointError, match=r"NaN or infinite weights in 1 of .* \(proj.weight\)"):
        load_adapter(path)
