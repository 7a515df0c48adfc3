"""Load on one real ComfyUI server: many queued prompts, and the LLM loaded again and again.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_load                  # 50 prompts, 10 LLM reloads
    .venv/bin/python -m benchmarks.bench_load --prompts 20 --reloads 4

What it does: starts ComfyUI (scripts/comfy_client.ComfyServer: main.py --cpu on a free local port) and converts
workflows/lidit_shapes_default.json to the API format.

1. Queue: posts --prompts copies of the default workflow at once, each with its own sampler seed and file
   prefix, then waits for all of them. It checks that every prompt completed and that each wrote its own PNG
   (no output lost or overwritten), and reads the server's resident memory (RSS) when prompt 10 and when the last
   prompt are done.
2. Reloads: --reloads runs of the default workflow whose LLM Loader's dtype alternates between fp32 and auto
   (the same fp32 model on a CPU, but another input, so ComfyUI's cache misses and replaces the last LLM): each
   run loads the LLM anew from its file. RSS after each; the first reload is
   where it "started". (POST /free is not used: its flags can wait in ComfyUI's queue until the next prompt has
   run from the cache.)

Targets (issue 13): RSS after the last queued prompt within 5 % of RSS after prompt 10; RSS after the last
reload within 5 % of RSS after the first. Exit status 1 when a prompt is lost or a target is missed.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time

import psutil

from scripts import comfy_client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_WORKFLOW = os.path.join(ROOT, "workflows", "lidit_shapes_default.json")
TOLERANCE = 0.05


def only(prompt: dict, class_type: str) -> str:
    (node,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    return node


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def wait_all(server: comfy_client.ComfyServer, prompt_ids: list[str], timeout: float) -> dict[int, float]:
    """Waits for the prompts in queue order; returns the server's RSS (MiB) right after each one finished."""
    rss, deadline = {}, time.time() + timeout
    for i, prompt_id in enumerate(prompt_ids, 1):
        while True:
            entry = server.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                break
            if time.time() > deadline or server.proc.poll() is not None:
                raise comfy_client.WorkflowError(f"prompt {i} did not finish:\n{server.log_tail()}")
            time.sleep(0.2)
        rss[i] = rss_mib(server.proc.pid)
    return rss


def queue_prompts(server, base: dict, n: int, timeout: float) -> tuple[dict[int, float], list[str]]:
    sampler, save = only(base, "LIDiTSampler"), only(base, "SaveImage")
    prompt_ids = []
    for i in range(n):
        prompt = copy.deepcopy(base)
        prompt[sampler]["inputs"]["seed"] = 1000 + i
        prompt[save]["inputs"]["filename_prefix"] = f"bench_load_{i:03d}"
        prompt_ids.append(server.post("/prompt", {"prompt": prompt, "client_id": "bench-load"})["prompt_id"])
    rss = wait_all(server, prompt_ids, timeout)
    problems = []
    for i, prompt_id in enumerate(prompt_ids):
        entry = server.get(f"/history/{prompt_id}")[prompt_id]
        images = server.output_images(entry)
        if entry["status"].get("status_str") != "success":
            problems.append(f"prompt {i}: {entry['status'].get('status_str')}")
        elif len(images) != 1 or not os.path.basename(images[0]).startswith(f"bench_load_{i:03d}") \
                or not os.path.isfile(images[0]):
            problems.append(f"prompt {i}: images {images}")
    return rss, problems


def reload_llm(server, base: dict, n: int) -> tuple[list[float], list[str]]:
    loader = only(base, "LLMLoader")
    rss, problems = [], []
    for i in range(n):
        prompt = copy.deepcopy(base)
        prompt[loader]["inputs"]["dtype"] = ("fp32", "auto")[i % 2]
        entry = server.run(prompt)
        cached = {n for event, data in entry["status"]["messages"] if event == "execution_cached"
                  for n in data.get("nodes", [])}
        if loader in cached:
            problems.append(f"reload {i}: the LLM Loader came from the cache")
        rss.append(rss_mib(server.proc.pid))
    return rss, problems


def verdict(ratio: float) -> str:
    return "within 5 %" if abs(ratio - 1) <= TOLERANCE else "MISSED"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workflow", default=DEFAULT_WORKFLOW)
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--reloads", type=int, default=10)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--keep", default=None, help="keep ComfyUI's log and outputs in this folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prompts < 10 or args.reloads < 2:
        raise SystemExit("--prompts needs at least 10 (RSS is compared with prompt 10) and --reloads at least 2")
    work = args.keep or tempfile.mkdtemp(prefix="bench_load_")
    server = comfy_client.ComfyServer(os.path.join(work, "output"))
    try:
        server.start()
        base = comfy_client.ui_to_api(comfy_client.load_workflow(args.workflow), server.object_info())
        t0 = time.perf_counter()
        queued, problems = queue_prompts(server, base, args.prompts, args.timeout)
        queue_s = time.perf_counter() - t0
        reloads, reload_problems = reload_llm(server, base, args.reloads)
        problems += reload_problems
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    queue_ratio = queued[args.prompts] / queued[10]
    reload_ratio = reloads[-1] / reloads[0]
    print(f"\n### Load on one ComfyUI server ({os.path.basename(args.workflow)}, CPU)\n")
    print(f"{args.prompts} prompts queued at once: {args.prompts - sum(p.startswith('prompt') for p in problems)} "
          f"completed with their own PNG, in {queue_s:.0f} s.\n")
    print("| measurement | RSS (MiB) | ratio | target |")
    print("|---|---:|---:|---|")
    print(f"| after prompt 1 | {queued[1]:.0f} | | |")
    print(f"| after prompt 10 | {queued[10]:.0f} | 1.00 | baseline |")
    print(f"| after prompt {args.prompts} | {queued[args.prompts]:.0f} | {queue_ratio:.3f} | {verdict(queue_ratio)} |")
    print(f"| after LLM reload 1 | {reloads[0]:.0f} | 1.00 | baseline |")
    for i in range(1, len(reloads)):
        ratio = reloads[i] / reloads[0]
        print(f"| after LLM reload {i + 1} | {reloads[i]:.0f} | {ratio:.3f} |"
              f" {verdict(ratio) if i == len(reloads) - 1 else ''} |")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems or "MISSED" in (verdict(queue_ratio), verdict(reload_ratio)) else 0


if __name__ == "__main__":
    sys.exit(main())
