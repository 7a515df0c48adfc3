"""Adapter-only training for a checkpoint of a ComfyUI family (training/train_comfy_adapter.py) on a tiny SD 1.5
checkpoint that Load Checkpoint detects (its UNet, a random CLIP-L and a random SD VAE) and a folder of captioned
shapes-world images, with the real SmolLM2; then the trained file through Load Checkpoint, CLIP Text Encode, LLM
Conditioning Attach, Apply LLM Diff Adapter, KSampler and VAE Decode in the real server."""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny_models
from conftest import ROOT, SMOLLM2
from test_apply_adapter_server import encode, latent

LLM = os.path.join(ROOT, ".comfyui", "models", "LLM", SMOLLM2)
STEPS = 4
KILL_AT = 3  # the killed run dies writing this step's loss row, after step 2's checkpoint


def train(out, checkpoint: str, data: str, cache: str, *extra: str, kill_at: int | None = None):
    args = ["--checkpoint", checkpoint, "--llm", LLM, "--data", data, "--out", str(out), "--name", "tiny-sd15-smollm2",
            "--resolution", "64", "--steps", str(STEPS), "--batch-size", "2", "--save-every", "2", "--lr", "3e-3",
            "--warmup", "1", "--export-weights", "raw", "--cache-dir", cache, "--threads", "2", *extra]
    # the kill: a hard exit inside the loss log's write, as a crash or a lost machine would end it
    code = ("import os, sys\nimport training.train_lidit as t\nreal = t.LossLog.write\n"
            f"t.LossLog.write = lambda self, row: os._exit(9) if row[0] == {kill_at} else real(self, row)\n"
            "opened, init = [], t.LossLog.__init__\n"
            "t.LossLog.__init__ = lambda self, *a: (init(self, *a), opened.append(self))[0]\n"
            "from training.train_comfy_adapter import main\nmain(sys.argv[1:])\n"
            "print(f'loss logs left open: {sum(not log.file.closed for log in opened)}')\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_adapter_training")
    checkpoint, data = str(base / "tiny-sd15.safetensors"), base / "images"
    tiny_models.save_sd15_checkpoint(checkpoint)
    data.mkdir()
    rng = random.Random(0)
    import torchvision.transforms.functional as TF
    from dataset import captions, shapes_world
    for i, scene in enumerate(captions.training_pool(4, seed=0)):
        TF.to_pil_image(shapes_world.render(scene, 64, rng)).save(data / f"image{i}.png")
        (data / f"image{i}.txt").write_text(scene.caption)
    (data / "no-caption.png").write_bytes((data / "image0.png").read_bytes())  # skipped: no .txt beside it
    run = train(base / "full", checkpoint, str(data), str(base / "cache"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loss logs left open: 0" in run.stdout
    return {"base": base, "checkpoint": checkpoint, "data": str(data), "out": base / "full", "log": run.stderr}


def loss_rows(out) -> list[list[str]]:
    with open(os.path.join(out, "loss.csv")) as f:
        return list(csv.reader(f))[1:]


def test_trains_only_the_adapter_into_one_file_naming_family_and_llm(trained):
    from llm_diffusion.adapters.checkpoint import load_host_adapter
    host, info = load_host_adapter(str(trained["out"] / "tiny-sd15-smollm2.safetensors"))
    assert (info["family"], info["llm"], info["kind"]) == ("unet", SMOLLM2, "decoupled")
    assert [(w, h) for _, w, h in host.sites] == [(320, 8)] * 4  # the one-level SD 1.5 UNet's four attn2 sites
    assert (host.adapter.num_hidden_states, host.adapter.llm_hidden_size) == (31, 576)
    assert "unet checkpoint, 4 cross-attention sites; 4 images" in trained["log"]  # the uncaptioned one skipped
    # What the LLM branch adds per unit of attention output: its gate times its value projection's RMS. The paper's
    # closed start leaves it near zero (its gate moves by about the learning rate per step, its value projection
    # gets no gradient while the gate is shut: below 3e-4 after these steps); the trainer's default recipe
    # (adapters.diff_adapter.DecoupledCrossAttention's llm_gate, host-text dropout) opens it from the first step.
    opened = [(b.llm_gate_a * b.llm_gate_b.exp()).abs().item() * b.to_v.weight.pow(2).mean().sqrt().item()
              for b in host.branches]
    assert min(opened) > 2e-3, f"the LLM branches stayed shut: {opened}"
    losses = [float(r[1]) for r in loss_rows(trained["out"])]
    assert len(losses) == STEPS and all(0 < x < 100 for x in losses)


def test_a_killed_run_resumes_to_the_same_weights_with_or_without_gradient_checkpointing(trained, tmp_path):
    out = tmp_path / "killed"
    # the killed part with gradient checkpointing, the rest without: the same training either way
    killed = train(out, trained["checkpoint"], trained["data"], str(trained["base"] / "cache"),
                   "--gradient-checkpointing", kill_at=KILL_AT)
    assert killed.returncode == 9 and not (out / "tiny-sd15-smollm2.safetensors").exists()
    assert "gradient checkpointing on 16 blocks" in killed.stderr  # the UNet's outermost blocks
    resumed = train(out, trained["checkpoint"], trained["data"], str(trained["base"] / "cache"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "at step 2" in resumed.stderr
    full = load_file(str(trained["out"] / "tiny-sd15-smollm2.safetensors"))
    again = load_file(str(out / "tiny-sd15-smollm2.safetensors"))
    # Not bit for bit: ComfyUI sizes its attention chunks by the free memory, which moves the last float bits. A
    # resume that lost the optimizer state or redrew the samples moves every weight by about the learning rate and
    # the losses of steps 3 and 4 by far more than 1e-3.
    assert full.keys() == again.keys()
    assert torch.cat([(full[k] - again[k]).abs().flatten() for k in full]).mean() < 1e-4
    rows, full_rows = loss_rows(out), loss_rows(trained["out"])
    assert [int(r[0]) for r in rows] == list(range(1, STEPS + 1))
    assert all(abs(float(a[1]) - float(b[1])) < 1e-3 * float(b[1]) for a, b in zip(rows, full_rows))


@pytest.mark.parametrize("bad, message", [
    (["--checkpoint", "model.ckpt"], "only safetensors checkpoints are loaded"),
    (["--data", "/nonexistent/images"], "--data '/nonexistent/images' does not exist"),
    (["--host-text-dropout", "1.5"], "--host-text-dropout is a share of samples, from 0 to 1"),
    (["--adapter-refiner-depth", "1", "--context-dim", "48"],
     "--adapter-refiner-depth 1 with --context-dim 48: a refiner needs a context size divisible by 32"),
])
def test_bad_input_is_refused_naming_the_fix(trained, bad, message):
    args = {"--checkpoint": trained["checkpoint"], "--data": trained["data"]}
    args.update(dict(zip(bad[::2], bad[1::2])))
    run = subprocess.run([sys.executable, "-m", "training.train_comfy_adapter", "--llm", LLM, "--out", "/tmp/unused",
                          *[x for kv in args.items() for x in kv]], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr


def checkpoint_graph(checkpoint: str, adapter: str, strength: float) -> dict:
    """Load Checkpoint -> Apply LLM Diff Adapter -> KSampler (CLIP Text Encode + LLM Conditioning Attach on both
    prompts, 2 Euler steps, CFG 3) -> SaveLatent, and VAE Decode -> SaveImage."""
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
         "llm": {"class_type": "LLMLoader", "inputs": {"llm_name": SMOLLM2, "dtype": "auto", "device": "auto"}},
         "apply": {"class_type": "ApplyLLMDiffAdapter",
                   "inputs": {"model": ["ckpt", 0], "adapter_name": adapter, "strength": strength}},
         "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    for sign, text in (("positive", "a red square to the left of a blue circle"), ("negative", "")):
        g[f"clip:{sign}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
        g[f"llm:{sign}"] = encode(text)
        g[f"llm:{sign}"]["inputs"]["max_tokens"] = 128
        g[f"attach:{sign}"] = {"class_type": "LLMConditioningAttach",
                               "inputs": {"conditioning": [f"clip:{sign}", 0], "llm_encoding": [f"llm:{sign}", 0]}}
    g["sample"] = {"class_type": "KSampler", "inputs": {
        "model": ["apply", 0], "seed": 0, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["attach:positive", 0], "negative": ["attach:negative", 0], "latent_image": ["latent", 0],
        "denoise": 1.0}}
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "trained"}}
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
    g["image"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "trained"}}
    return g


def test_the_trained_adapter_runs_on_its_checkpoint_in_comfyui(comfy_server, trained):
    for folder, src in (("checkpoints", trained["checkpoint"]),
                        ("llm_adapters", str(trained["out"] / "tiny-sd15-smollm2.safetensors"))):
        os.makedirs(os.path.join(comfy_server.models_dir, folder), exist_ok=True)
        shutil.copy(src, os.path.join(comfy_server.models_dir, folder))
    ckpt, adapter = "tiny-sd15.safetensors", "tiny-sd15-smollm2.safetensors"
    own = latent(comfy_server, checkpoint_graph(ckpt, adapter, 0.0))
    entry = comfy_server.run(checkpoint_graph(ckpt, adapter, 1.0))
    files = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
    with_llm = load_file(f"{comfy_server.output_dir}/{files[0]['subfolder']}/{files[0]['filename']}")["latent_tensor"]
    assert torch.isfinite(with_llm).all() and (with_llm - own).abs().mean() > 1e-5
    assert any(p.endswith(".png") for p in comfy_server.output_images(entry))


def folder_bytes(folder) -> dict[str, bytes]:
    """Every file under folder (relative path -> contents)."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_a_new_run_into_an_out_holding_one_is_refused_without_resume(trained, tmp_path):
    out = shutil.copytree(trained["out"], tmp_path / "out")
    before = folder_bytes(out)
    run = train(out, trained["checkpoint"], trained["data"], str(trained["base"] / "cache"))
    assert run.returncode == 1 and "already holds a run" in run.stderr, run.stderr[-3000:]
    assert "--resume" in run.stderr and "a new --out" in run.stderr
    assert folder_bytes(out) == before  # loss.csv and the checkpoint byte for byte, nothing added


def test_a_finished_run_resumed_only_exports_and_leaves_no_log_open(trained, tmp_path):
    out = shutil.copytree(trained["out"], tmp_path / "done")
    rows = loss_rows(out)
    run = train(out, trained["checkpoint"], trained["data"], str(trained["base"] / "cache"), "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loss logs left open: 0" in run.stdout
    assert loss_rows(out) == rows
    exported = load_file(str(out / "tiny-sd15-smollm2.safetensors"))
    full = load_file(str(trained["out"] / "tiny-sd15-smollm2.safetensors"))
    assert all(torch.equal(exported[k], full[k]) for k in full)


ONE_IMPORT_ROOT = """
import json, sys
import adapters.checkpoint, adapters.diff_adapter
from training.comfyui import comfyui_folder, import_comfyui
nodes = import_comfyui(comfyui_folder(None))
caught = False
try:
    nodes.load_host_adapter(sys.argv[1])
except adapters.checkpoint.CheckpointError:
    caught = True
except Exception:
    pass
print(json.dumps({"CheckpointError": nodes.CheckpointError is adapters.checkpoint.CheckpointError,
                  "HostAdapter": nodes.HostAdapter is adapters.diff_adapter.HostAdapter,
                  "caught": caught}))
"""


def test_the_trainer_and_the_nodes_it_loads_share_one_adapters_package(tmp_path):
    """The trainer imports `adapters` from the repository and loads the nodes as ComfyUI does (package
    llm_diffusion): both must see the same classes, or an isinstance check or an `except CheckpointError` misses."""
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00 not a safetensors file" * 10)
    run = subprocess.run([sys.executable, "-c", ONE_IMPORT_ROOT, str(corrupt)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"CheckpointError": True, "HostAdapter": True,
                                                                "caught": True}


def test_weight_dtype_auto_is_comfyuis_choice_on_a_gpu_too(monkeypatch):
    """auto gives the checkpoint loader no dtype, so ComfyUI picks it as Load Checkpoint does (unet_dtype: from the
    model's supported dtypes, its stored weights and the device), rather than bf16 wherever CUDA has it."""
    from training.train_comfy_adapter import weight_dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert weight_dtype("auto") is None
    assert [weight_dtype(n) for n in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16, torch.float32]
