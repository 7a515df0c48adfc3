"""A latent too large for memory is refused before ComfyUI's sampler makes its copies of it, in the real server."""
import copy

import pytest

import comfy_client
from test_server import node_id


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_an_oversized_latent_is_refused_before_the_sampler_copies_it(comfy_server, default_prompt):
    comfy_server.run(default_prompt)  # the LLM and the models of the default workflow are loaded and cached
    pid = comfy_server.proc.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # the peak RSS starts again from the current RSS
    before = peak_rss_bytes(pid)
    prompt = copy.deepcopy(default_prompt)
    latent = prompt[node_id(prompt, "LIDiTSampler")]["inputs"]["latent_image"][0]
    prompt[latent]["inputs"].update(width=8192, height=8192)
    with pytest.raises(comfy_client.WorkflowError, match=r"8192x8192 latent .* needs about [\d.]+ GB"):
        comfy_server.run(prompt)
    # Before the pack sees the latent's size, ComfyUI has made it and its noise: 3 x 8192 x 8192 fp32, 0.75 GiB
    # each. Every further copy (the sampler's, the batched cond and uncond) would be past this bound.
    grown = peak_rss_bytes(pid) - before
    assert grown < 2.2 * 2 ** 30, f"the server grew by {grown / 2 ** 30:.1f} GiB before refusing the latent"
