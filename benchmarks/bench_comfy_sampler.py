"""LI-DiT Sampler vs ComfyUI's own KSampler, timed inside a real ComfyUI server.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_comfy_sampler                   # the default model, 10 repeats
    .venv/bin/python -m benchmarks.bench_comfy_sampler --repeats 2 \\
        --model /tmp/run_smoke/smoke.safetensors                          # any LI-DiT file (+ its adapter)

What it does: starts ComfyUI (scripts/comfy_client.ComfyServer: main.py --cpu on a free local port) with a
temporary --extra-model-paths-config that exposes the model, its adapter and its LLM, converts
workflows/lidit_shapes_default.json to the API format with ui_to_api and points its loaders at those files. The
KSampler prompt is the same graph with the LIDiTSampler node's class_type replaced by KSampler (the inputs have
the same names: model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise).
One warm-up run of each loads the LLM, the LI-DiT model and encodes both prompts. The timed runs then change only
the sampler seed, so ComfyUI's cache keeps the LLM, the adapter and both encodings and re-runs just the sampler
and what follows it (VAEDecode of pixel space, ImageScale, SaveImage); the two variants alternate.

Numbers: the wall-clock of each whole prompt run as ComfyUI records it (the timestamps of its execution_start and
execution_success messages in /history, in ms) and as the client sees it (queue -> /history says done; polled
every 0.3 s, so coarser). "overhead" is the same graph with only SaveImage's filename prefix changed (nothing
but SaveImage runs): the fixed cost of a prompt, subtracted to estimate the sampler node's own time. Medians
over --repeats runs; ratio against the LI-DiT Sampler. The server is always stopped (try/finally).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from adapters.checkpoint import read_metadata
from scripts import comfy_client
from training.ship import find_adapter, find_llm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_MODEL = os.path.join(ROOT, "models", "lidit", "lidit-shapes-smollm2.safetensors")
DEFAULT_WORKFLOW = os.path.join(ROOT, "workflows", "lidit_shapes_default.json")
LLM_DIRS = [os.path.join(comfy_client.COMFY_DIR, "models", "LLM"), os.path.join(ROOT, ".cache")]  # COMFYUI_DIR too


def model_files(model: str, adapter: str | None) -> tuple[str, str | None, str]:
    """(model, adapter or None, LLM) paths from the model's metadata."""
    if not os.path.isfile(model):
        raise SystemExit(f"LI-DiT model not found: '{model}'. Train it (scripts/run_main.sh's trainer) or pass "
                         "--model.")
    encoders = json.loads(read_metadata(model, "li-dit")["text_encoders"])
    if len(encoders) != 1:
        raise SystemExit(f"'{model}' fuses {len(encoders)} LLMs; the default workflow has one LLM Loader.")
    enc = encoders[0]
    try:
        llm = find_llm(enc["llm"], LLM_DIRS)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    if adapter is None and enc.get("adapter"):
        adapter = find_adapter(enc["adapter"], model)
    return model, adapter, llm


def only(prompt: dict, class_type: str) -> str:
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    if len(ids) != 1:
        raise SystemExit(f"expected one {class_type} node in the workflow, found {len(ids)}")
    return ids[0]


def server_ms(entry: dict) -> float:
    stamps = {event: data.get("timestamp") for event, data in entry["status"]["messages"]}
    return float(stamps["execution_success"] - stamps["execution_start"])


def cached_nodes(entry: dict) -> set[str]:
    for event, data in entry["status"]["messages"]:
        if event == "execution_cached":
            return set(data.get("nodes", []))
    return set()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="LI-DiT .safetensors")
    p.add_argument("--adapter", default=None, help="default: the one its metadata names, next to it or in "
                                                   "models/llm_adapters")
    p.add_argument("--workflow", default=DEFAULT_WORKFLOW)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--steps", type=int, default=None, help="default: the workflow's (20)")
    p.add_argument("--seed", type=int, default=1000, help="first timed seed; each run uses the next one")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for the server's torch (OMP_NUM_THREADS; 0 = its default)")
    p.add_argument("--keep", default=None, help="keep ComfyUI's log and outputs in this folder")
    return p.parse_args(argv)


def graphs(server, args, model: str, llm: str, adapter: str | None) -> tuple[dict, str, str]:
    """The workflow as API graphs, one per sampler node ("LI-DiT Sampler", "KSampler"), with these files and
    --steps; and the ids of the sampler node and of SaveImage."""
    base = comfy_client.ui_to_api(comfy_client.load_workflow(args.workflow), server.object_info())
    base[only(base, "LIDiTLoader")]["inputs"]["model_name"] = os.path.basename(model)
    base[only(base, "LLMLoader")]["inputs"]["llm_name"] = os.path.basename(llm)
    if adapter:
        base[only(base, "LLMAdapterLoader")]["inputs"]["adapter_name"] = os.path.basename(adapter)
    sampler = only(base, "LIDiTSampler")
    if args.steps:
        base[sampler]["inputs"]["steps"] = args.steps
    ks = copy.deepcopy(base)
    ks[sampler]["class_type"] = "KSampler"
    return {"LI-DiT Sampler": base, "KSampler": ks}, sampler, only(base, "SaveImage")


def time_runs(server, variants: dict, sampler: str, save: str, repeats: int, seed: int) -> dict:
    """Server and client ms of each variant's prompt runs (alternating order, a new seed each) and of the fixed cost
    of a prompt ("overhead": the last prompt again with only SaveImage's prefix changed, so nothing else runs)."""
    base = variants["LI-DiT Sampler"]
    encoders = {k for k, v in base.items() if v["class_type"] in ("LLMPromptEncode", "LLMLoader")}
    for name, prompt in variants.items():  # warm-up: LLM load + encode (first), model load
        t0 = time.perf_counter()
        server.run(prompt)
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    times, not_cached = {}, set()

    def timed_run(name: str, prompt: dict) -> dict:
        t0 = time.perf_counter()
        entry = server.run(prompt)
        rec = times.setdefault(name, {"server": [], "client": []})
        rec["server"].append(server_ms(entry))
        rec["client"].append((time.perf_counter() - t0) * 1000)
        return entry

    for i in range(repeats):
        for name in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
            prompt = copy.deepcopy(variants[name])
            prompt[sampler]["inputs"]["seed"] = seed
            seed += 1
            not_cached |= encoders - cached_nodes(timed_run(name, prompt))
        prompt = copy.deepcopy(prompt)
        prompt[save]["inputs"]["filename_prefix"] = f"bench_overhead_{i}"
        timed_run("overhead", prompt)
    if not_cached:
        print(f"WARNING: nodes {sorted(not_cached)} (LLM loader/encode) were re-executed during timed runs; "
              "the numbers include LLM work.", file=sys.stderr)
    return times


def print_table(times: dict, model: str, graph: dict, sampler: str, repeats: int) -> None:
    inputs = graph[sampler]["inputs"]
    overhead = statistics.median(times["overhead"]["server"])
    ref = statistics.median(times["LI-DiT Sampler"]["server"])
    ref_est = ref - overhead
    print(f"\n### LI-DiT Sampler vs KSampler in ComfyUI ({os.path.basename(model)}, {inputs['steps']} steps, "
          f"{inputs['sampler_name']}/{inputs['scheduler']}, cfg {inputs['cfg']}, CPU)\n")
    print(f"Median of {repeats} prompt runs each; only the seed changes, so the LLM encodings come from "
          "ComfyUI's cache.\n")
    print("| prompt run | server ms (median) | server ms (min) | client ms (median) | sampler node est. ms "
          "| vs LI-DiT Sampler |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rec in times.items():
        med = statistics.median(rec["server"])
        est = med - overhead if name != "overhead" else None
        ratio = f"{med / ref:.2f}x" if name != "overhead" else "-"
        if est is not None and ref_est > 0:
            ratio += f" (node {est / ref_est:.2f}x)"
        label = name if name != "overhead" else "overhead (only SaveImage re-runs)"
        print(f"| {label} | {med:.0f} | {min(rec['server']):.0f} | {statistics.median(rec['client']):.0f} | "
              f"{'-' if est is None else f'{est:.0f}'} | {ratio} |")


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, adapter, llm = model_files(args.model, args.adapter)
    work = args.keep or tempfile.mkdtemp(prefix="bench_comfy_sampler_")
    os.makedirs(work, exist_ok=True)
    files = {"lidit": [model], "LLM": [llm]}
    if adapter:
        files["llm_adapters"] = [adapter]
    config = comfy_client.extra_model_paths(files, os.path.join(work, "models"))
    if args.threads:  # inherited by the server process
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    server = comfy_client.ComfyServer(os.path.join(work, "output"), extra_args=["--extra-model-paths-config", config])
    try:
        t0 = time.perf_counter()
        server.start()
        print(f"ComfyUI up in {time.perf_counter() - t0:.1f}s on {server.url} (log: {server.log_path})",
              file=sys.stderr)
        variants, sampler, save = graphs(server, args, model, llm, adapter)
        times = time_runs(server, variants, sampler, save, args.repeats, args.seed)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(times, model, variants["LI-DiT Sampler"], sampler, args.repeats)
    return times


if __name__ == "__main__":
    main()
