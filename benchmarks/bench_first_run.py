"""The default workflow's first run on a fresh ComfyUI server, against its second run on the same server.

Run from the repository root:

    .venv/bin/python -m benchmarks.bench_first_run

Starts ComfyUI (scripts.comfy_client.ComfyServer: main.py --cpu on a free local port), queues
workflows/lidit_shapes_default.json and times it from the post to the finished history entry: the first run loads
the LLM (a GGUF file's weights stay in their blocks), the LI-DiT model and the adapter, and encodes and samples;
the second run, with another sampler seed, only samples (the encodings are cached), which is the baseline. It
reads the server's resident memory (RSS) after each, and lists every file the runs created or changed under
ComfyUI's user/ and models/ folders and the pack's models/ (the output PNGs go to a temporary folder).

Targets (issue 26): first run <= 8 s on the 2-core CPU, server RSS after it <= 1100 MiB, and nothing written by
the pack (ComfyUI's own database, user/comfyui.db, is ComfyUI's). Exit status 1 when a target is missed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import psutil

from scripts import comfy_client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WORKFLOW = os.path.join(ROOT, "workflows", "lidit_shapes_default.json")
WATCHED = [os.path.join(comfy_client.COMFY_DIR, "user"), os.path.join(comfy_client.COMFY_DIR, "models"),
           os.path.join(ROOT, "models")]
COMFYUI_OWN = {os.path.join(comfy_client.COMFY_DIR, "user", "comfyui.db")}
TARGET_SECONDS, TARGET_RSS_MIB = 8.0, 1100.0


def files() -> dict[str, tuple[int, int]]:
    found = {}
    for top in WATCHED:
        for folder, _, names in os.walk(top):
            for name in names:
                path = os.path.join(folder, name)
                st = os.stat(path)
                found[path] = (st.st_size, st.st_mtime_ns)
    return found


def timed_run(server, prompt: dict) -> tuple[float, float]:
    """(seconds from the post to the finished entry, server RSS in MiB after it)."""
    start = time.perf_counter()
    server.run(prompt)
    return time.perf_counter() - start, psutil.Process(server.proc.pid).memory_info().rss / 2**20


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    before = files()
    with tempfile.TemporaryDirectory(prefix="bench_first_run_") as out, \
            comfy_client.ComfyServer(out) as server:
        object_info = server.get("/object_info")
        prompt = comfy_client.ui_to_api(comfy_client.load_workflow(DEFAULT_WORKFLOW), object_info)
        first, first_rss = timed_run(server, prompt)
        sampler = next(k for k, v in prompt.items() if v["class_type"] == "LIDiTSampler")
        prompt[sampler]["inputs"]["seed"] += 1
        second, second_rss = timed_run(server, prompt)
        idle_rss = psutil.Process(server.proc.pid).memory_info().rss / 2**20
    after = files()
    written = sorted(p for p in after if before.get(p) != after[p] and p not in COMFYUI_OWN)
    removed = sorted(p for p in before if p not in after)

    print(f"### The default workflow on a fresh server ({psutil.cpu_count()} CPUs)\n")
    print("| run | seconds | vs second run | server RSS after, MiB |")
    print("|---|---:|---:|---:|")
    print(f"| first (loads the LLM, the model and the adapter; encodes; samples) | {first:.1f} | "
          f"{first / second:.1f}x | {first_rss:.0f} |")
    print(f"| second (another seed: samples only) | {second:.1f} | 1.0x | {second_rss:.0f} |")
    print(f"\nFiles created or changed under {', '.join(os.path.relpath(p, ROOT) for p in WATCHED)} (ComfyUI's own "
          f"database left out): {len(written)}" + "".join(f"\n  {os.path.relpath(p, ROOT)}" for p in written))
    if removed:
        print(f"Files removed: {len(removed)}" + "".join(f"\n  {os.path.relpath(p, ROOT)}" for p in removed))
    missed = [f"first run {first:.1f} s > {TARGET_SECONDS:.0f} s"] * (first > TARGET_SECONDS) + \
        [f"RSS {first_rss:.0f} MiB > {TARGET_RSS_MIB:.0f} MiB"] * (first_rss > TARGET_RSS_MIB) + \
        [f"{len(written)} file(s) written"] * bool(written)
    print(f"\nIdle RSS at the end: {idle_rss:.0f} MiB. Targets: first run <= {TARGET_SECONDS:.0f} s, RSS <= "
          f"{TARGET_RSS_MIB:.0f} MiB, nothing written: " + ("met" if not missed else "missed (" + "; ".join(missed) + ")"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
