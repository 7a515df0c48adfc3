"""Apply LLM Diff Adapter and LLM Conditioning Attach in a real ComfyUI server, on one model of each family: our
LI-DiT (the default model), an SD 1.5 UNet and an SD3 MMDiT (tiny random-weight files that ComfyUI's UNETLoader
detects), sampled by KSampler with CFG and saved with SaveLatent."""
import os

import pytest
import torch
from safetensors.torch import load_file

import comfy_client
from conftest import HOST_MODELS, ROOT, SMOLLM2, WORKFLOW_DIR

PROMPT = "a red square to the left of a blue circle"


def encode(text: str, layers: str = "all", adapter: str | None = None) -> dict:
    inputs = {"llm": ["llm", 0], "text": text, "instruction": "li-dit", "custom_instruction": "",
              "chat_template": True, "layers": layers, "max_tokens": 64}
    if adapter:
        inputs["adapter"] = [f"adapter:{adapter}", 0]
    return {"class_type": "LLMPromptEncode", "inputs": inputs}


def graph(family: str, adapter: str | None = None, strength: float = 1.0, llm_layers: str = "all",
          text: str = PROMPT, attach: tuple[str, ...] = ("positive", "negative")) -> dict:
    """KSampler (2 Euler steps, CFG 3) on the family's model; with `adapter`, patched by Apply LLM Diff Adapter and
    fed the LLM hidden states through LLM Conditioning Attach on the `attach` sides (both by default)."""
    g = {"llm": {"class_type": "LLMLoader", "inputs": {"llm_name": SMOLLM2, "dtype": "auto", "device": "auto"}}}
    if family == "lidit":  # the default model's own text path: SmolLM2 through its adapter
        own = "lidit-shapes-smollm2-adapter.safetensors"
        g["model"] = {"class_type": "LIDiTLoader", "inputs": {"model_name": HOST_MODELS[family],
                                                              "weight_dtype": "auto"}}
        g["latent"] = {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": 32, "height": 32,
                                                                                 "batch_size": 1}}
    else:
        own = "sd15-context-768.safetensors" if family == "unet" else None  # SD3: SmolLM2's last layer (576)
        g["model"] = {"class_type": "UNETLoader", "inputs": {"unet_name": HOST_MODELS[family],
                                                             "weight_dtype": "default"}}
        g["latent"] = {"class_type": "EmptyLatentImage" if family == "unet" else "EmptySD3LatentImage",
                       "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    if own:
        g[f"adapter:{own}"] = {"class_type": "LLMAdapterLoader", "inputs": {"adapter_name": own}}
    for sign, words in (("positive", text), ("negative", "")):
        g[f"own:{sign}"] = encode(words, "all" if own else "last", own)
        cond = [f"own:{sign}", 0]
        if family == "mmdit":  # SD3's pooled embedding (a CLIP output; a test node stands in, see custom_nodes/)
            g[f"pooled:{sign}"] = {"class_type": "TestSetPooledOutput",
                                   "inputs": {"conditioning": cond, "width": 32, "seed": 0}}
            cond = [f"pooled:{sign}", 0]
        if adapter and sign in attach:
            g[f"llm:{sign}"] = encode(words, llm_layers)
            g[f"attach:{sign}"] = {"class_type": "LLMConditioningAttach",
                                   "inputs": {"conditioning": cond, "llm_encoding": [f"llm:{sign}", 0]}}
            cond = [f"attach:{sign}", 0]
        g[f"cond:{sign}"] = cond
    model = ["model", 0]
    if adapter:
        g["apply"] = {"class_type": "ApplyLLMDiffAdapter",
                      "inputs": {"model": model, "adapter_name": adapter, "strength": strength}}
        model = ["apply", 0]
    g["sample"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 0, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": g.pop("cond:positive"), "negative": g.pop("cond:negative"), "latent_image": ["latent", 0],
        "denoise": 1.0}}
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0],
                                                        "filename_prefix": f"adapter-{family}"}}
    return g


def latent(server, prompt: dict) -> torch.Tensor:
    entry = server.run(prompt)
    files = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
    assert len(files) == 1
    return load_file(f"{server.output_dir}/{files[0]['subfolder']}/{files[0]['filename']}")["latent_tensor"]


def test_nodes_are_registered(object_info):
    spec = object_info["ApplyLLMDiffAdapter"]["input"]["required"]
    assert set(spec) == {"model", "adapter_name", "strength"}
    assert {"unet-closed.safetensors", "mmdit-open.safetensors"} <= set(spec["adapter_name"][1]["options"])
    assert set(object_info["LLMConditioningAttach"]["input"]["required"]) == {"conditioning", "llm_encoding"}
    assert object_info["ApplyLLMDiffAdapter"]["output"] == ["MODEL"]


@pytest.mark.parametrize("family", list(HOST_MODELS))
def test_every_family_runs_through_the_apply_node(comfy_server, family):
    """The open adapters' host gates are open as well (UNet, LI-DiT), so strength 0 must undo them too."""
    base = latent(comfy_server, graph(family))
    closed = latent(comfy_server, graph(family, f"{family}-closed.safetensors"))
    opened = latent(comfy_server, graph(family, f"{family}-open.safetensors"))
    assert torch.isfinite(base).all() and base.abs().sum() > 0
    assert torch.equal(closed, base), "a fresh adapter (gates closed) must leave the model's output unchanged"
    assert torch.isfinite(opened).all() and (opened - base).abs().mean() > 1e-4
    zero = latent(comfy_server, graph(family, f"{family}-open.safetensors", strength=0.0))
    assert torch.equal(zero, base)
    # the unpatched model is cached by ComfyUI and still gives its own output after the patched runs
    assert torch.equal(latent(comfy_server, graph(family)), base)


def test_bad_input_gets_an_error_naming_the_fix_and_comfyui_keeps_running(comfy_server):
    with pytest.raises(comfy_client.WorkflowError, match="trained for a unet model, but this MODEL is mmdit"):
        comfy_server.run(graph("mmdit", "unet-open.safetensors"))
    with pytest.raises(comfy_client.WorkflowError, match="has 576 features per token.*SmolLM2.*31 hidden states"):
        comfy_server.run(graph("unet", "unet-open.safetensors", llm_layers="last"))
    with pytest.raises(comfy_client.WorkflowError, match="is an LLM Diff Adapter for an LI-DiT .*LLM Adapter Loader"):
        comfy_server.run(graph("unet", "sd15-context-768.safetensors"))
    assert torch.isfinite(latent(comfy_server, graph("unet", "unet-open.safetensors"))).all()


def test_an_llm_encoding_on_one_side_only_is_refused_and_comfyui_keeps_running(comfy_server):
    for attach, side in ((("positive",), "the positive conditioning carries one, the negative does not"),
                         (("negative",), "the negative conditioning carries one, the positive does not")):
        with pytest.raises(comfy_client.WorkflowError,
                           match=f"{side}.*Attach an LLM encoding to every conditioning that reaches the sampler "
                                 r"\(positive and negative.*with LLM Conditioning Attach; an empty prompt is a valid "
                                 "one"):
            comfy_server.run(graph("unet", "unet-open.safetensors", attach=attach))
    assert torch.isfinite(latent(comfy_server, graph("unet", "unet-open.safetensors"))).all()


def test_the_shipped_adapter_workflow_at_strength_0_is_its_base_model_and_at_1_differs(comfy_server, object_info):
    """workflows/lidit_shapes_adapter.json at strength 0 against the same graph without Apply LLM Diff Adapter and
    LLM Conditioning Attach (bit for bit: strength 0 undoes the trained gates, the host's included), and at
    strength 1, where the shipped adapter's open gates change the picture."""
    name = "lidit-shapes-nollm-canonical-smollm2.safetensors"
    weights = load_file(os.path.join(ROOT, "models", "llm_adapters", name))
    gates = {kind: [weights[k[:-1] + "a"] * weights[k].exp() for k in weights if k.endswith(f"{kind}_gate_b")]
             for kind in ("host", "llm")}
    assert min(g.abs().min().item() for g in gates["llm"]) > 0.1, "the shipped LLM gates are open"
    assert max((g - 1).abs().max().item() for g in gates["host"]) > 0.01, "the shipped host gates are trained"

    prompt = comfy_client.ui_to_api(comfy_client.load_workflow(os.path.join(WORKFLOW_DIR, "lidit_shapes_adapter.json")),
                                    object_info)
    ids = {node["class_type"]: i for i, node in prompt.items() if node["class_type"] != "LLMConditioningAttach"}
    prompt[ids["LIDiTSampler"]]["inputs"]["steps"] = 4
    for cls in ("VAELoader", "VAEDecode", "ImageScale", "SaveImage"):
        del prompt[ids[cls]]
    prompt["save"] = {"class_type": "SaveLatent", "inputs": {"samples": [ids["LIDiTSampler"], 0],
                                                             "filename_prefix": "shipped-adapter"}}
    apply = prompt[ids["ApplyLLMDiffAdapter"]]
    assert apply["inputs"]["adapter_name"] == name and apply["inputs"]["strength"] == 1.0
    at_one = latent(comfy_server, prompt)
    apply["inputs"]["strength"] = 0.0
    at_zero = latent(comfy_server, prompt)

    base_prompt = comfy_client.without_llm_adapter(prompt)
    assert {n["class_type"] for n in base_prompt.values()} == {"LIDiTLoader", "LIDiTWordEncode",
                                                               "EmptyChromaRadianceLatentImage", "LIDiTSampler",
                                                               "SaveLatent"}
    base = latent(comfy_server, base_prompt)
    assert torch.isfinite(base).all() and base.abs().sum() > 0
    assert torch.equal(at_zero, base)
    assert (at_one - base).abs().mean() > 0.01  # pixel space, [-1, 1]: 0.03 for the shipped adapter at 4 steps
