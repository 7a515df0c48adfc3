"""The pack inside a real ComfyUI server: node registration, every shared workflow, prompt following of the
default model, and the errors users see for bad input."""
import copy
import glob
import os
import threading
import time

import psutil
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import comfy_client
from dataset import shapes_world
from conftest import OVERFLOWING_LLM, WORKFLOW_DIR

PACK_NODES = {
    "LLMLoader": {"llm_name", "dtype", "device"},
    "LLMAdapterLoader": {"adapter_name"},
    "LLMPromptEncode": {"llm", "text", "instruction", "custom_instruction", "chat_template", "layers", "max_tokens",
                        "adapter", "block_contributions"},
    "LIDiTLoader": {"model_name", "weight_dtype"},
    "LIDiTSampler": {"model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "sampler_name",
                     "scheduler", "denoise"},
    "LLMConditioningJoin": {"first", "second"},
    "ApplyLLMDiffAdapter": {"model", "adapter_name", "strength"},
    "LLMConditioningAttach": {"conditioning", "llm_encoding"},
    "LIDiTWordEncode": {"encoder_name", "text"},
    "LLMGenerateText": {"llm", "text", "instruction", "custom_instruction", "chat_template", "max_new_tokens", "seed",
                        "temperature", "top_p"},
}


def node_id(prompt: dict, class_type: str, index: int = 0) -> str:
    return [k for k, v in prompt.items() if v["class_type"] == class_type][index]


def positive_encode_id(prompt: dict) -> str:
    return prompt[node_id(prompt, "LIDiTSampler")]["inputs"]["positive"][0]


def generated_image(server, entry) -> torch.Tensor:
    """The saved PNG as [3, 32, 32] in [0, 1] (the workflow upscales the 32 px result for people to look at)."""
    paths = server.output_images(entry)
    assert len(paths) == 1 and os.path.getsize(paths[0]) > 0
    img = torch.from_numpy(__import__("numpy").array(Image.open(paths[0]).convert("RGB"))).permute(2, 0, 1) / 255.0
    return F.interpolate(img[None].float(), size=(32, 32), mode="area")[0]


def test_object_info_lists_every_node_with_its_inputs(object_info):
    for name, inputs in PACK_NODES.items():
        assert name in object_info, f"{name} not registered"
        spec = object_info[name]["input"]
        declared = set(spec.get("required", {})) | set(spec.get("optional", {}))
        assert declared == inputs, name
        tips = object_info[name].get("output_tooltips", [])
        assert len(tips) == len(object_info[name]["output"]) and all(tips), f"{name}: an output without a tooltip"
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in object_info["LLMLoader"]["input"]["required"]["llm_name"][1]["options"]
    assert "lidit-shapes-smollm2.safetensors" in object_info["LIDiTLoader"]["input"]["required"]["model_name"][1]["options"]
    assert object_info["LLMPromptEncode"]["output"] == ["CONDITIONING"]
    assert object_info["LIDiTSampler"]["output"] == ["LATENT"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(WORKFLOW_DIR, "*.json"))), ids=os.path.basename)
def test_every_shared_workflow_runs_to_an_image(comfy_server, object_info, path):
    workflow = comfy_client.load_workflow(path)
    assert "nodes" in workflow and "links" in workflow, "shared workflows are UI format (drag-and-drop)"
    entry = comfy_server.run(comfy_client.ui_to_api(workflow, object_info))
    images = comfy_server.output_images(entry)
    assert images
    for p in images:
        with Image.open(p) as im:
            assert im.size[0] >= 32 and im.getextrema() != ((0, 0), (0, 0), (0, 0))


DEFAULT_SCENE = shapes_world.Scene((), "a red triangle above a white circle", "relation",
                                    (shapes_world.Mention("red", "triangle"), shapes_world.Mention("white", "circle")),
                                    (shapes_world.Relation(0, "above", 1),))


def test_default_workflow_follows_its_prompt(comfy_server, default_prompt):
    """The default prompt (two objects and a relation) checked whole by the shapes-world checker, and single
    objects in a few places (colour and position)."""
    enc = positive_encode_id(default_prompt)
    assert default_prompt[enc]["inputs"]["text"] == DEFAULT_SCENE.caption
    verdict = shapes_world.check(generated_image(comfy_server, comfy_server.run(default_prompt)), DEFAULT_SCENE)
    assert verdict["overall"], f"the default workflow's image does not show its prompt: {verdict}"
    cases = [shapes_world.single_scene("blue", "square", (0, 2)), shapes_world.single_scene("red", "circle", (1, 0)),
             shapes_world.single_scene("yellow", "triangle", (2, 1)),
             shapes_world.single_scene("green", "circle", (2, 2))]
    results = []
    for scene in cases:
        prompt = copy.deepcopy(default_prompt)
        prompt[enc]["inputs"]["text"] = scene.caption
        verdict = shapes_world.check(generated_image(comfy_server, comfy_server.run(prompt)), scene)
        results.append(verdict["color"] and verdict["position"])
    assert sum(results) >= 3, results


def test_same_encoding_is_not_recomputed(comfy_server, default_prompt):
    """A second run that only changes the seed reuses the cached LLM encoding (ComfyUI's cache)."""
    comfy_server.run(default_prompt)
    prompt = copy.deepcopy(default_prompt)
    prompt[node_id(prompt, "LIDiTSampler")]["inputs"]["seed"] = 7
    entry = comfy_server.run(prompt)
    cached = [m for m in entry["status"]["messages"] if m[0] == "execution_cached"][0][1]["nodes"]
    assert positive_encode_id(prompt) in cached


def test_empty_prompt_is_a_valid_unconditional_encoding(comfy_server, default_prompt):
    prompt = copy.deepcopy(default_prompt)
    prompt[positive_encode_id(prompt)]["inputs"]["text"] = ""
    assert comfy_server.output_images(comfy_server.run(prompt))


def test_over_long_prompt_is_cut_with_a_warning(comfy_server, default_prompt):
    prompt = copy.deepcopy(default_prompt)
    enc = positive_encode_id(prompt)
    prompt[enc]["inputs"]["text"] = "a blue square in the top right corner with a long tail of words"
    prompt[enc]["inputs"]["max_tokens"] = 4
    assert comfy_server.output_images(comfy_server.run(prompt))
    assert "over the 4-token limit" in comfy_server.log_tail(200_000)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p[node_id(p, "LLMAdapterLoader")]["inputs"].update(adapter_name="mismatched-adapter.safetensors"),
     "trained on 5 hidden states of size 64"),
    (lambda p: p[node_id(p, "LIDiTLoader")]["inputs"].update(model_name="corrupt.safetensors"), "corrupt"),
    (lambda p: p[node_id(p, "LLMLoader")]["inputs"].update(llm_name="pickled-llm"), "pickled"),
    (lambda p: p[node_id(p, "LLMPromptEncode")]["inputs"].update(layers="-3"), "set layers to 'all'"),
    (lambda p: p[node_id(p, "LLMPromptEncode")]["inputs"].pop("adapter")
     and p[node_id(p, "LLMPromptEncode")]["inputs"].update(layers="99"), "Layer 99 does not exist"),
    (lambda p: p.update({"99": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32,
                                                                             "batch_size": 1}}})
     or p[node_id(p, "LIDiTSampler")]["inputs"].update(latent_image=["99", 0]), "channels"),
    (lambda p: p[node_id(p, "LIDiTSampler")]["inputs"].update(cfg=float("nan")), "cfg is nan; it must be a finite"),
    (lambda p: p[node_id(p, "LIDiTSampler")]["inputs"].update(denoise=float("nan")), "denoise is nan"),
    (lambda p: p[positive_encode_id(p)]["inputs"].update(instruction="shout"), "shout"),
    (lambda p: p[node_id(p, "LLMAdapterLoader")]["inputs"].update(adapter_name="non-integer-adapter.safetensors"),
     "no integer 'num_hidden_states' in its metadata"),
    *[(lambda p, name=name: p[node_id(p, "LIDiTLoader")]["inputs"].update(model_name=name), message)
      for name, message in (("no-config.safetensors", "no LI-DiT config in its metadata"),
                            ("bad-json.safetensors", "broken JSON in its 'config' metadata"),
                            ("unknown-key.safetensors", r"unknown LI-DiT config keys \['flash'\]"),
                            ("wrong-shape.safetensors", "in_proj.weight is .* in the file but"),
                            ("terabyte-config.safetensors", "does not match its own config"))],
], ids=["adapter-mismatch", "corrupt-model", "pickled-llm", "adapter-needs-all-layers", "layer-out-of-range",
        "wrong-latent", "nan-cfg", "nan-denoise", "unknown-instruction", "adapter-metadata-not-int",
        "lidit-no-config", "lidit-bad-json", "lidit-unknown-key", "lidit-wrong-shape", "lidit-terabyte-config"])
def test_bad_input_names_the_problem_and_the_fix(comfy_server, default_prompt, mutate, message):
    prompt = copy.deepcopy(default_prompt)
    mutate(prompt)
    with pytest.raises(comfy_client.WorkflowError, match=message):
        comfy_server.run(prompt)


def test_errors_are_the_packs_own_not_raw_python(comfy_server, default_prompt):
    """The cases above reach the user as the pack's messages, not as KeyError or PyTorch's state-dict dump."""
    raw = ("KeyError", "JSONDecodeError", "TypeError", "Error(s) in loading state_dict", "size mismatch")
    for name in ("no-config.safetensors", "bad-json.safetensors", "unknown-key.safetensors",
                 "wrong-shape.safetensors"):
        prompt = copy.deepcopy(default_prompt)
        prompt[node_id(prompt, "LIDiTLoader")]["inputs"]["model_name"] = name
        entry_error = run_error(comfy_server, prompt)
        assert entry_error["exception_type"].endswith("CheckpointError"), entry_error["exception_type"]
        assert not any(r in entry_error["exception_message"] for r in raw), entry_error["exception_message"]


def run_error(server, prompt) -> dict:
    """The execution_error message of a prompt that fails."""
    prompt_id = server.post("/prompt", {"prompt": prompt, "client_id": "llm-diffusion-tests"})["prompt_id"]
    for _ in range(600):
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("status_str") == "error":
            return [m for m in entry["status"]["messages"] if m[0] == "execution_error"][0][1]
        assert not (entry and entry["status"].get("completed")), "the prompt did not fail"
        time.sleep(0.3)
    raise AssertionError("no answer")


@pytest.mark.parametrize("node, field, name, bad", [
    ("LLMAdapterLoader", "adapter_name", "nan-adapter.safetensors", "2 of 5 tensors"),
    ("LIDiTLoader", "model_name", "nan-lidit.safetensors", "9 of 186 tensors"),
], ids=["adapter", "lidit"])
def test_nan_weights_fail_the_run_instead_of_drawing_black(comfy_server, default_prompt, node, field, name, bad):
    """Files whose header is intact but whose data holds NaN (see conftest): the run stops with the pack's error in
    /history, no image is saved, and the server goes on."""
    saved = lambda: set(glob.glob(os.path.join(comfy_server.output_dir, "**", "*.png"), recursive=True))  # noqa: E731
    before = saved()
    prompt = copy.deepcopy(default_prompt)
    prompt[node_id(prompt, node)]["inputs"][field] = name
    error = run_error(comfy_server, prompt)
    assert error["exception_type"].endswith("CheckpointError"), error["exception_type"]
    message = error["exception_message"]
    assert name in message and "NaN" in message and bad in message and "again" in message, message
    assert saved() == before
    assert comfy_server.output_images(comfy_server.run(default_prompt))


@pytest.mark.parametrize("inputs, where", [
    ({"text": "a blue square \ud800 top right"}, "prompt"),
    ({"instruction": "custom", "custom_instruction": "Describe \ud800 the image:"}, "instruction"),
], ids=["prompt", "instruction"])
def test_lone_surrogate_is_the_packs_error(comfy_server, default_prompt, inputs, where):
    """A lone surrogate typed into an API prompt (JSON "\\ud800") is named, with its place, not the tokenizer's
    TypeError."""
    prompt = copy.deepcopy(default_prompt)
    prompt[positive_encode_id(prompt)]["inputs"].update(inputs)
    error = run_error(comfy_server, prompt)
    assert error["exception_type"].endswith("LLMError"), error["exception_type"]
    message = error["exception_message"]
    assert f"The {where} holds a lone surrogate '\\ud800' at character" in message, message
    assert "TypeError" not in message and "TextEncodeInput" not in message
    assert comfy_server.output_images(comfy_server.run(default_prompt))


def test_oversized_latent_is_refused_with_the_limit(comfy_server, default_prompt):
    prompt = copy.deepcopy(default_prompt)
    latent = prompt[node_id(prompt, "LIDiTSampler")]["inputs"]["latent_image"][0]
    prompt[latent]["inputs"].update(width=8192, height=8192)
    started = time.time()
    with pytest.raises(comfy_client.WorkflowError, match=r"8192x8192 latent .* needs about [\d.]+ GB .* only "
                                                          r"[\d.]+ GB is free .* about \d+x\d+"):
        comfy_server.run(prompt)
    assert time.time() - started < 60
    assert comfy_server.output_images(comfy_server.run(default_prompt))


def seconds_until_interrupted(comfy_server, prompt: dict, after: float) -> float:
    """Runs the prompt, posts /interrupt `after` seconds in, and returns how long the run took to stop."""
    timer = threading.Timer(after, lambda: comfy_server.post("/interrupt", {}))
    timer.start()
    started = time.time()
    try:
        with pytest.raises(comfy_client.WorkflowError, match="nterrupt"):
            comfy_server.run(prompt)
    finally:
        timer.cancel()
    return time.time() - started


def test_one_long_step_is_interruptible(comfy_server, default_prompt):
    """At 1024 px a single step takes minutes on a CPU; /interrupt must not wait for it to end."""
    comfy_server.run(default_prompt)  # models loaded and the encodings cached: the run below starts sampling at once
    prompt = copy.deepcopy(default_prompt)
    sampler = node_id(prompt, "LIDiTSampler")
    prompt[sampler]["inputs"]["steps"] = 1
    prompt[prompt[sampler]["inputs"]["latent_image"][0]]["inputs"].update(width=1024, height=1024)
    assert seconds_until_interrupted(comfy_server, prompt, after=5.0) < 30
    assert comfy_server.output_images(comfy_server.run(default_prompt))


def test_symlink_loop_in_the_llm_folder_does_not_hang_the_server(comfy_server):
    """The test LLM folder holds loop/a -> . and loop/b -> .. (see conftest); the list still comes back."""
    started = time.time()
    options = comfy_server.get("/object_info/LLMLoader")["LLMLoader"]["input"]["required"]["llm_name"][1]["options"]
    assert time.time() - started < 10
    assert {"SmolLM2-135M-Instruct.Q4_1.gguf", "pickled-llm"} <= set(options)
    assert not [o for o in options if o.startswith("loop")]


def test_llm_list_follows_the_folder(comfy_server):
    """The LLM list is cached; a file added to (or removed from) a folder still shows at once."""
    def options():
        return comfy_server.get("/object_info/LLMLoader")["LLMLoader"]["input"]["required"]["llm_name"][1]["options"]
    added = os.path.join(comfy_server.models_dir, "LLM", "loop", "added-later.gguf")
    assert "loop/added-later.gguf" not in options()
    open(added, "wb").close()
    try:
        assert "loop/added-later.gguf" in options()
    finally:
        os.remove(added)
    assert "loop/added-later.gguf" not in options()


def test_missing_llm_is_refused_before_running(comfy_server, default_prompt):
    prompt = copy.deepcopy(default_prompt)
    prompt[node_id(prompt, "LLMLoader")]["inputs"]["llm_name"] = "no-such-model.gguf"
    with pytest.raises(comfy_client.WorkflowError, match="no-such-model.gguf"):
        comfy_server.run(prompt)


def test_interrupted_run_loses_nothing(comfy_server, default_prompt):
    prompt = copy.deepcopy(default_prompt)
    prompt[node_id(prompt, "LIDiTSampler")]["inputs"]["steps"] = 5000
    assert seconds_until_interrupted(comfy_server, prompt, after=4.0) < 120
    assert comfy_server.output_images(comfy_server.run(default_prompt))  # the server and its models still work


def test_shared_workflows_are_in_the_template_browser(comfy_server):
    names = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(WORKFLOW_DIR, "*.json"))}
    templates = comfy_server.get("/workflow_templates")
    assert set(templates["llm_diffusion"]) == names
    served = comfy_server.get("/api/workflow_templates/llm_diffusion/lidit_shapes_default.json")
    assert served == comfy_client.load_workflow(os.path.join(WORKFLOW_DIR, "lidit_shapes_default.json"))


EXPAND_WORKFLOW = os.path.join(WORKFLOW_DIR, "llm_expand_prompt.json")


def generated_text(prompt: dict, entry: dict) -> str:
    return "".join(entry["outputs"][node_id(prompt, "LLMGenerateText")]["text"])


def server_rss(comfy_server) -> int:
    return psutil.Process(comfy_server.proc.pid).memory_info().rss


def test_the_llm_writes_the_prompt_it_then_encodes_on_the_same_weights(comfy_server, object_info, default_prompt):
    """workflows/llm_expand_prompt.json: LLM Generate Text expands the short prompt with the LLM that LLM Loader
    loaded, and its answer is the positive LLM Prompt Encode's text. A seed gives the same answer every time and
    another seed another one; greedy decoding ignores the seed. Writing costs no second copy of the LLM: the
    server's memory grows by far less than a dequantized copy of its weights."""
    comfy_server.run(default_prompt)  # the LLM is loaded
    before = server_rss(comfy_server)
    prompt = comfy_client.ui_to_api(comfy_client.load_workflow(EXPAND_WORKFLOW), object_info)
    gen = node_id(prompt, "LLMGenerateText")
    assert prompt[positive_encode_id(prompt)]["inputs"]["text"] == [gen, 0]
    assert prompt[gen]["inputs"]["text"] == DEFAULT_SCENE.caption and prompt[gen]["inputs"]["instruction"] == "expand"
    prompt[gen]["inputs"]["max_new_tokens"] = 24  # what is tested needs no more, and each token runs the LLM once
    prompt[node_id(prompt, "LIDiTSampler")]["inputs"]["steps"] = 4
    texts = []
    for seed in (1, 2, 1):
        prompt[gen]["inputs"]["seed"] = seed
        entry = comfy_server.run(prompt)
        assert comfy_server.output_images(entry)
        texts.append(generated_text(prompt, entry))
    assert texts[0] == texts[2] != texts[1]
    assert all(len(t.split()) >= 5 for t in texts), texts
    # A copy of the weights, dequantized as another pack would load them, adds 540 MB; the transients of writing
    # (the tied LM head dequantized for each token, 113 MB, the key/value cache) leave tens of MB to the allocator.
    grown = server_rss(comfy_server) - before
    assert grown < 200e6, f"the server grew by {grown / 1e6:.0f} MB while writing: the LLM's weights were copied"
    prompt[gen]["inputs"]["temperature"] = 0.0
    greedy = []
    for seed in (1, 2):
        prompt[gen]["inputs"]["seed"] = seed
        greedy.append(generated_text(prompt, comfy_server.run(prompt)))
    assert greedy[0] == greedy[1]


def test_writing_text_is_interruptible(comfy_server, object_info):
    prompt = comfy_client.ui_to_api(comfy_client.load_workflow(EXPAND_WORKFLOW), object_info)
    gen = node_id(prompt, "LLMGenerateText")
    prompt[gen]["inputs"].update(instruction="custom", text="Start.", max_new_tokens=4096, temperature=0.0,
                                 custom_instruction="Count from 1 to 5000, one number per line, and never stop.")
    assert seconds_until_interrupted(comfy_server, prompt, after=4.0) < 20


def test_the_llm_loader_removes_the_converted_gguf_copies_that_nothing_reads(comfy_server, default_prompt):
    """GGUF weights load from the .gguf file; a folder of dequantized copies in ComfyUI's cache is dead weight."""
    ours = os.path.join(comfy_client.COMFY_DIR, "user", "__cache", "llm_diffusion")
    loader = node_id(default_prompt, "LLMLoader")
    executed = 0
    for dtype in ("fp32", "auto"):  # one of them differs from the loader's last inputs, so the loader runs
        copy_dir = os.path.join(ours, "gguf", "SmolLM2-135M-Instruct.Q4_1-float32-0123456789ab")
        os.makedirs(copy_dir, exist_ok=True)
        with open(os.path.join(copy_dir, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 4096)
        prompt = copy.deepcopy(default_prompt)
        prompt[loader]["inputs"]["dtype"] = dtype
        entry = comfy_server.run(prompt)
        cached = [m for m in entry["status"]["messages"] if m[0] == "execution_cached"][0][1]["nodes"]
        if loader not in cached:
            executed += 1
            assert not os.path.exists(ours)
    assert executed


def test_a_half_precision_overflow_never_reaches_the_model(comfy_server):
    """An LLM whose activations overflow fp16 (conftest.make_overflowing_llm), loaded in fp16: LLM Prompt Encode
    encodes again in float32, warns naming the LLM and the dtype, and passes on a finite encoding; LLM Generate Text
    (sampling, which fp16's NaN logits would make fail) writes its answer again in float32 the same way."""
    prompt_inputs = {"llm": ["1", 0], "text": "a red circle", "instruction": "li-dit", "custom_instruction": "",
                     "chat_template": True, "layers": "all", "max_tokens": 256}
    prompt = {"1": {"class_type": "LLMLoader", "inputs": {"llm_name": OVERFLOWING_LLM, "dtype": "fp16",
                                                          "device": "cpu"}},
              "2": {"class_type": "LLMPromptEncode", "inputs": prompt_inputs},
              "3": {"class_type": "TestSaveConditioning", "inputs": {"conditioning": ["2", 0],
                                                                     "filename": "overflowing-llm"}},
              "4": {"class_type": "LLMGenerateText", "inputs": {"llm": ["1", 0], "text": "a red circle",
                                                                "instruction": "expand", "custom_instruction": "",
                                                                "chat_template": True, "max_new_tokens": 4, "seed": 0,
                                                                "temperature": 0.7, "top_p": 0.9}},
              "5": {"class_type": "LLMPromptEncode", "inputs": {**prompt_inputs, "text": ["4", 0]}},
              "6": {"class_type": "TestSaveConditioning", "inputs": {"conditioning": ["5", 0],
                                                                     "filename": "overflowing-llm-answer"}}}
    entry = comfy_server.run(prompt)
    for saved in ("3", "6"):
        (path,) = entry["outputs"][saved]["text"]
        context = load_file(path)["context"]
        assert context.numel() and torch.isfinite(context).all()
    assert "".join(entry["outputs"]["4"]["text"]).strip()
    log = comfy_server.log_tail(200_000)
    for what in ("hidden states", "logits"):
        assert f"LLM '{OVERFLOWING_LLM}' gave NaN or inf {what} in float16" in log
    assert "running it again in float32" in log


def saved_conditionings(comfy_server, default_prompt, texts: dict[str, str]) -> dict[str, torch.Tensor]:
    """name -> the CONDITIONING tensor LLM Prompt Encode gives for that text, with the default workflow's LLM,
    adapter and settings, all in one run."""
    enc = positive_encode_id(default_prompt)
    llm, adapter = default_prompt[enc]["inputs"]["llm"], default_prompt[enc]["inputs"]["adapter"]
    prompt = {llm[0]: default_prompt[llm[0]], adapter[0]: default_prompt[adapter[0]]}
    for i, (name, text) in enumerate(texts.items()):
        prompt[f"e{i}"] = {"class_type": "LLMPromptEncode", "inputs": {**default_prompt[enc]["inputs"], "text": text}}
        prompt[f"s{i}"] = {"class_type": "TestSaveConditioning",
                           "inputs": {"conditioning": [f"e{i}", 0], "filename": f"weights-{name}"}}
    entry = comfy_server.run(prompt)
    return {name: load_file(entry["outputs"][f"s{i}"]["text"][0])["context"] for i, name in enumerate(texts)}


def test_prompt_weights_move_the_encoding_as_written(comfy_server, default_prompt):
    """ComfyUI's weight syntax in LLM Prompt Encode: weight 1 is the prompt without the syntax, bit for bit; weight
    0 is the prompt without the word; any other weight is neither."""
    got = saved_conditionings(comfy_server, default_prompt, {
        "plain": "a red circle on the left", "one": "a (red:1) circle on the left",
        "zero": "a (red:0) circle on the left", "deleted": "a circle on the left",
        "strong": "a (red:1.5) circle on the left", "escaped": "a \\(red\\) circle on the left",
        "parenthesised": "a (red) circle on the left"})
    assert torch.equal(got["one"], got["plain"])
    torch.testing.assert_close(got["zero"], got["deleted"], rtol=1e-4, atol=1e-4)
    assert got["zero"].shape[1] == got["plain"].shape[1] - 1  # the word's token is gone
    for name in ("strong", "parenthesised"):
        assert (got[name] - got["plain"]).abs().amax() > 1e-2, name
    assert got["escaped"].shape[1] > got["plain"].shape[1]  # "(" and ")" are read as text
