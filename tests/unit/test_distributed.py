"""Distributed training on two CPU processes (gloo) under `accelerate launch`: gradients sync, every rank draws its
own data and noise, and a two-process step equals one step on the whole batch in one process."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from test_trainer import TINY, loss_rows

import ddp_probe

PROBE = os.path.abspath(ddp_probe.__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(*args: str) -> None:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), PROBE, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_llm_dirs):
    out = str(tmp_path_factory.mktemp("ddp") / "out")
    os.makedirs(out)
    launch_two_processes("train", out, "--llm", tiny_llm_dirs["llama"], "--out", out, "--steps", "3", *TINY,
                         "--eval-samples", "0")
    return out


def test_parameters_stay_identical_on_both_ranks(two_process_run):
    first, second = (load_file(os.path.join(two_process_run, f"rank{r}.safetensors")) for r in (0, 1))
    fresh = load_file(os.path.join(two_process_run, "checkpoint", "model.safetensors"))
    for k in first:
        assert torch.equal(first[k], second[k]), k
    assert all(torch.equal(first[k], fresh[k]) for k in fresh)  # the checkpoint is rank 0's state


def test_ranks_draw_different_samples_and_noise(two_process_run):
    first, second = (json.load(open(os.path.join(two_process_run, f"rank{r}.json"))) for r in (0, 1))
    assert len(first) == len(second) == 3
    for a, b in zip(first, second):
        assert a["x0"] != b["x0"] and a["rng"] != b["rng"]


def test_loss_is_logged_once_by_the_main_process(two_process_run):
    assert [int(r["step"]) for r in loss_rows(two_process_run)] == [1, 2, 3]
    assert os.path.exists(os.path.join(two_process_run, "lidit.safetensors"))


def test_two_process_step_equals_one_step_on_the_whole_batch(tmp_path):
    launch_two_processes("step", str(tmp_path))
    ranks = [load_file(str(tmp_path / f"step-rank{r}.safetensors")) for r in (0, 1)]
    whole = ddp_probe.one_step(Accelerator(cpu=True), slice(0, ddp_probe.BATCH))
    before, _ = ddp_probe.fixed_problem()
    for k, v in before.state_dict().items():
        assert not torch.equal(whole[k], v) or v.numel() == 0, f"{k} did not change"
        torch.testing.assert_close(ranks[0][k], whole[k], atol=1e-6, rtol=1e-5)
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    # the logged loss is the mean over ranks = the loss of the whole batch
    torch.testing.assert_close(ranks[0]["loss"], whole["loss"], atol=1e-6, rtol=1e-5)


def test_resume_gives_every_rank_its_own_continued_streams(two_process_run, tmp_path, tiny_llm_dirs):
    """Each rank's streams come back from the checkpoint: 3 steps + 2 resumed draw what 5 steps in one go draw."""
    whole = str(tmp_path / "whole")
    os.makedirs(whole)
    launch_two_processes("train", whole, "--llm", tiny_llm_dirs["llama"], "--out", whole, "--steps", "5", *TINY,
                         "--eval-samples", "0")
    out = str(shutil.copytree(two_process_run, tmp_path / "out"))
    started = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]
    launch_two_processes("train", out, "--llm", tiny_llm_dirs["llama"], "--out", out, "--steps", "5", *TINY,
                         "--eval-samples", "0", "--resume")
    resumed = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]
    assert len(resumed[0]) == len(resumed[1]) == 2
    for a, b in zip(*resumed):
        assert a["x0"] != b["x0"] and a["rng"] != b["rng"]
    drawn_before = {s["x0"] for rank in started for s in rank}
    assert not drawn_before & {s["x0"] for rank in resumed for s in rank}  # new draws, not the first run's replayed
    assert [int(r["step"]) for r in loss_rows(out)] == [1, 2, 3, 4, 5]
    first, second = (load_file(os.path.join(out, f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(first[k], second[k]) for k in first)
    in_one_go = [json.load(open(os.path.join(whole, f"rank{r}.json"))) for r in (0, 1)]
    assert [rank[3:] for rank in in_one_go] == resumed
    assert [r["loss"] for r in loss_rows(out)] == [r["loss"] for r in loss_rows(whole)]
