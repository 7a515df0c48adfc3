"""The trainer's numbers do not move when its code does: 50 steps of fixed tiny runs give the losses recorded in
tests/unit/data/losses-50-steps.json (written by this file with RECORD=1, from the code before a refactor)."""
from __future__ import annotations

import csv
import json
import os

import pytest

from training.train_lidit import main

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "losses-50-steps.json")
TINY = ["--steps", "50", "--batch-size", "4", "--hidden-size", "32", "--depth", "1", "--num-heads", "2",
        "--context-dim", "16", "--pool-size", "25", "--save-every", "25", "--eval-samples", "0", "--resolution", "16",
        "--threads", "1", "--seed", "3", "--precision", "fp32"]
RUNS = {
    "no-llm": ["--text-encoder", "learned"],
    "llama, open colours": ["--llm", "{llama}", "--open-color-pool", "1", "--open-color-share", "0.5"],
}


def losses(out) -> list[float]:
    with open(os.path.join(out, "loss.csv"), newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def adapter_run(tmp_path, llama: str) -> None:
    """The adapter recipe's defaults (refiner, open gate, host-text dropout) and word dropout, 50 steps on a no-LLM
    base trained 50 steps."""
    wide = ["--context-dim", "32"]  # the adapter's refiner needs a multiple of its head size
    main(["--text-encoder", "learned", "--name", "base"] + TINY + wide + ["--out", str(tmp_path / "base")])
    main(["--llm", llama, "--base", str(tmp_path / "base" / "base.safetensors"), "--host-word-dropout", "0.25"]
         + TINY + wide + ["--out", str(tmp_path / "run")])


@pytest.mark.parametrize("name", [*RUNS, "adapter on a frozen no-llm base"])
def test_fifty_steps_give_the_recorded_losses(name, tmp_path, tiny_llm_dirs):
    if name in RUNS:
        main([a.format(llama=tiny_llm_dirs["llama"]) for a in RUNS[name]] + TINY + ["--out", str(tmp_path / "run")])
    else:
        adapter_run(tmp_path, tiny_llm_dirs["llama"])
    got = losses(tmp_path / "run")
    if os.environ.get("RECORD"):
        recorded = json.load(open(GOLDEN)) if os.path.exists(GOLDEN) else {}
        recorded[name] = got
        with open(GOLDEN, "w") as f:
            json.dump(recorded, f, indent=1)
    want = json.load(open(GOLDEN))[name]
    assert len(got) == 50
    # the float rounding of another CPU moves the last digits, a changed draw or computation moves the first
    assert got == pytest.approx(want, rel=1e-3)
