"""A real ComfyUI server (main.py --cpu) with the pack loaded, shared by the tests of this folder.

Test-only model files (a mismatched adapter, a corrupt LI-DiT file, a folder of pickled LLM weights) live in a
temporary folder that the server reads through --extra-model-paths-config, so ComfyUI's own folders stay clean.
"""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, ROOT)

import comfy_client  # noqa: E402
from adapters.checkpoint import save_adapter, save_lidit  # noqa: E402
from adapters.diff_adapter import LLMDiffAdapter  # noqa: E402
from adapters.lidit import LIDiT, LIDiTConfig  # noqa: E402
from safetensors.torch import load_file, safe_open, save_file  # noqa: E402

WORKFLOW_DIR = os.path.join(ROOT, "workflows")
TEST_NODES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "custom_nodes")  # test-only nodes
DEFAULT_WORKFLOW = os.path.join(WORKFLOW_DIR, "lidit_shapes_default.json")


def make_test_models(base: str) -> None:
    os.makedirs(os.path.join(base, "llm_adapters"))
    make_host_models(base)
    torch.manual_seed(0)
    save_adapter(os.path.join(base, "llm_adapters", "mismatched-adapter.safetensors"),
                 LLMDiffAdapter(64, 5, 128), "tiny-llm-64x4")
    os.makedirs(os.path.join(base, "lidit"))
    with open(os.path.join(base, "lidit", "corrupt.safetensors"), "wb") as f:
        f.write(b"\x00\x01 this is not a safetensors file" * 10)
    make_broken_model_files(base)
    make_overflowing_llm(os.path.join(base, "LLM", OVERFLOWING_LLM))
    pickled = os.path.join(base, "LLM", "pickled-llm")
    os.makedirs(pickled)
    with open(os.path.join(pickled, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    with open(os.path.join(pickled, "pytorch_model.bin"), "wb") as f:
        f.write(b"PK\x03\x04 pickled")
    # Two links back up the tree: without a loop check every walk of the folder doubles at each level, forever.
    os.makedirs(os.path.join(base, "LLM", "loop"))
    os.symlink(".", os.path.join(base, "LLM", "loop", "a"))
    os.symlink("..", os.path.join(base, "LLM", "loop", "b"))


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
OVERFLOWING_LLM = "overflowing-half-llama"


def make_overflowing_llm(folder: str) -> None:
    """A tiny llama (SmolLM2's tokenizer and chat template, random weights) with one norm scaled so far that its
    block's MLP input overflows half precision (largest value 65504) while every weight stays representable:
    loaded in fp16 it gives NaN or inf, in float32 finite states."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from adapters.llm_encoder import gguf_metadata_reader

    with gguf_metadata_reader():
        tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, ".comfyui", "models", "LLM"), gguf_file=SMOLLM2)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.mul_(3e4)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
HOST_MODELS = {"unet": "tiny-sd15.safetensors", "mmdit": "tiny-sd3.safetensors",
               "lidit": "lidit-shapes-smollm2.safetensors"}  # family -> base model (the last one ships)


def make_host_models(base: str) -> None:
    """Apply LLM Diff Adapter test files: tiny SD 1.5 and SD3 models that ComfyUI's UNETLoader detects, and per
    family a fresh adapter (gates closed) and one with open gates (the LLM branches open and, where the host branch
    has a gate of its own, that gate away from 1 as training leaves it), all for SmolLM2; plus an adapter giving
    SD 1.5 a 768-wide context from SmolLM2 (its own text path here, as no CLIP weights exist)."""
    import tiny_models
    from llm_diffusion.adapters.checkpoint import read_lidit, save_host_adapter
    from llm_diffusion.adapters.diff_adapter import HostAdapter, lidit_sites
    from llm_diffusion.nodes.diff_adapter_nodes import host_family
    assert tiny_models.save_detectable(os.path.join(base, "diffusion_models")) == \
        {k: v for k, v in HOST_MODELS.items() if k != "lidit"}
    lidit, _ = read_lidit(os.path.join(ROOT, "models", "lidit", HOST_MODELS["lidit"]))
    sites = {"unet": host_family(tiny_models.unet_net(tiny_models.SD15_DETECTABLE))[1],
             "mmdit": host_family(tiny_models.mmdit_net())[1],
             "lidit": lidit_sites(lidit)}
    for family, family_sites in sites.items():
        for gates in ("closed", "open"):
            torch.manual_seed(1)
            host = HostAdapter(576, 31, 64, family_sites, "gated" if family == "mmdit" else "decoupled")
            if gates == "open":
                tiny_models.open_gates(host)
            save_host_adapter(os.path.join(base, "llm_adapters", f"{family}-{gates}.safetensors"), host, family,
                              SMOLLM2)
    torch.manual_seed(2)
    save_adapter(os.path.join(base, "llm_adapters", "sd15-context-768.safetensors"), LLMDiffAdapter(576, 31, 768),
                 SMOLLM2)


def edit_metadata(path: str, edit) -> None:
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
    edit(meta)
    save_file(load_file(path), path, metadata=meta)


def edit_config(**changes):
    return lambda m: m.update(config=json.dumps({**json.loads(m["config"]), **changes}))


BROKEN_LIDIT = {  # file name -> metadata edit
    "no-config.safetensors": lambda m: m.pop("config"),
    "bad-json.safetensors": lambda m: m.update(config="{\"depth\": 1,"),
    "unknown-key.safetensors": edit_config(flash=True),
    "wrong-shape.safetensors": edit_config(context_dims=[64]),
    "terabyte-config.safetensors": edit_config(hidden_size=2 ** 20),  # a tiny file asking for terabytes
}


def make_broken_model_files(base: str) -> None:
    torch.manual_seed(0)
    tiny = LIDiT(LIDiTConfig(patch_size=2, hidden_size=16, depth=1, num_heads=2, mlp_ratio=1.0,
                             context_dims=(128,), refiner_depth=0))
    for name, edit in BROKEN_LIDIT.items():
        path = os.path.join(base, "lidit", name)
        save_lidit(path, tiny, [])
        edit_metadata(path, edit)
    path = os.path.join(base, "llm_adapters", "non-integer-adapter.safetensors")
    save_adapter(path, LLMDiffAdapter(576, 31, 128), "SmolLM2-135M-Instruct.Q4_1.gguf")
    edit_metadata(path, lambda m: m.update(num_hidden_states="thirty-one"))
    # The shipped default files with NaN written into every other tensor (the adapter) or into 9 of them (the
    # LI-DiT model); headers and metadata intact, as a diverged training run leaves them.
    for folder, shipped, name, every in (("llm_adapters", "lidit-shapes-smollm2-adapter.safetensors",
                                          "nan-adapter.safetensors", 2),
                                         ("lidit", "lidit-shapes-smollm2.safetensors", "nan-lidit.safetensors", 20)):
        source = os.path.join(ROOT, "models", folder, shipped)
        with safe_open(source, framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(source)
        for key in sorted(tensors)[1::every][:9]:
            tensors[key].view(-1)[::7] = float("nan")
        save_file(tensors, os.path.join(base, folder, name), metadata=meta)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("test_models"))
    make_test_models(base)
    config = os.path.join(base, "extra_model_paths.yaml")
    with open(config, "w") as f:
        f.write(f"llm_diffusion_tests:\n  base_path: {base}\n  LLM: LLM\n  llm_adapters: llm_adapters\n"
                f"  lidit: lidit\n  diffusion_models: diffusion_models\n  checkpoints: checkpoints\n  custom_nodes: {TEST_NODES}\n")
    out = str(tmp_path_factory.mktemp("comfy_output"))
    server = comfy_client.ComfyServer(out, extra_args=["--extra-model-paths-config", config])
    server.models_dir = base  # tests add files there to see the model lists follow
    server.start()
    try:
        yield server
    finally:
        server.stop()  # by process group, whatever the tests did
        assert server.proc.poll() is not None


@pytest.fixture(scope="session")
def object_info(comfy_server):
    return comfy_server.object_info()


@pytest.fixture()
def default_prompt(object_info):
    """API-format copy of the default workflow, fresh for each test to modify."""
    return comfy_client.ui_to_api(comfy_client.load_workflow(DEFAULT_WORKFLOW), object_info)
