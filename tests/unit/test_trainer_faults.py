"""Kills at every point of a checkpoint save lose nothing: --resume continues from the newest complete
checkpoint and the loss log then holds each step exactly once."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import training.checkpoints as checkpoints
import training.loop as loop
from test_trainer import TINY, checkpoint_state, loss_rows, optimizer_steps, train

NO_EVAL = ("--eval-samples", "0")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SimulatedKill(BaseException):
    """BaseException, like KeyboardInterrupt: no `except Exception` in the trainer can swallow it."""


class FaultInjector:
    """Counts the file operations from step 6's loss row on (its checkpoint, then the export) and dies before the
    k-th one."""

    def __init__(self, monkeypatch, kill_at: int | None):
        self.kill_at, self.ops, self.armed = kill_at, [], False
        for owner, name in ((loop.LossLog, "write"), (checkpoints, "save_file"), (os, "replace"),
                            (os, "makedirs"), (shutil, "rmtree"), (json, "dump")):
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name), name))

    def wrap(self, real, name):
        def op(*args, **kwargs):
            if name == "write" and args[1][0] == 6:
                self.armed = True
            if self.armed:
                if len(self.ops) == self.kill_at:
                    raise SimulatedKill(f"killed before {name}{args[-1:]}")
                self.ops.append((name, str(args[-1] if name != "write" else args[1][0])))
            return real(*args, **kwargs)
        return op


@pytest.fixture(scope="module")
def at_step_3(tmp_path_factory, tiny_llm_dirs):
    return train(tmp_path_factory.mktemp("base") / "out", [tiny_llm_dirs["llama"]], 3, *NO_EVAL)


def save_ops(monkeypatch, at_step_3, tmp_path, llm) -> list[tuple[str, str]]:
    out = shutil.copytree(at_step_3, tmp_path / "dry")
    with monkeypatch.context() as m:
        faults = FaultInjector(m, kill_at=None)
        train(out, llm, 6, "--resume", *NO_EVAL)
    return faults.ops


def assert_each_step_logged_once_after_resume(out, llm, capsys, expect_resume_at: int, base_rows) -> None:
    capsys.readouterr()
    train(out, llm, 7, "--resume", *NO_EVAL)
    assert f"at step {expect_resume_at}" in capsys.readouterr().out
    rows = loss_rows(str(out))
    assert [int(r["step"]) for r in rows] == list(range(1, 8))
    assert rows[:3] == base_rows  # rows before the checkpoint are the first run's, untouched
    assert checkpoint_state(str(out))["step"] == 7 and optimizer_steps(str(out)) == {7}
    assert not [f for f in os.listdir(out) if f.endswith((".partial", ".old"))]


def test_kill_at_every_point_of_a_save_loses_nothing(monkeypatch, tmp_path, tiny_llm_dirs, at_step_3, capsys):
    llm = [tiny_llm_dirs["llama"]]
    ops = save_ops(monkeypatch, at_step_3, tmp_path, llm)
    names = [name for name, _ in ops]
    # the row, the checkpoint (three tensor files, state.json, two renames) and then the export
    assert names[0] == "write" and names.count("save_file") >= 3 and names.count("replace") >= 3, ops
    complete = [i for i, (name, arg) in enumerate(ops) if name == "replace" and arg.endswith("state.json")][0]
    base_rows = loss_rows(at_step_3)
    for kill_at in range(len(ops)):
        out = shutil.copytree(at_step_3, tmp_path / f"kill{kill_at}")
        with monkeypatch.context() as m:
            FaultInjector(m, kill_at)
            with pytest.raises(SimulatedKill):
                train(out, llm, 6, "--resume", *NO_EVAL)
        # Once the step-6 state.json is in place the step-6 checkpoint is complete and must be the one resumed.
        expect = 6 if kill_at > complete else 3
        assert_each_step_logged_once_after_resume(out, llm, capsys, expect, base_rows)


KILL_BETWEEN_THE_RENAMES = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import training.train_lidit as trainer
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if dst.endswith("checkpoint.old"):  # the old checkpoint moved aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
trainer.main(sys.argv[2:])
"""


def test_process_killed_between_the_renames_resumes_from_the_new_checkpoint(tmp_path, tiny_llm_dirs, at_step_3,
                                                                          capsys):
    llm = [tiny_llm_dirs["llama"]]
    out = shutil.copytree(at_step_3, tmp_path / "out")
    argv = ["--llm", llm[0], "--out", str(out), "--steps", "6", "--resume", *NO_EVAL, *TINY]
    proc = subprocess.run([sys.executable, "-c", KILL_BETWEEN_THE_RENAMES, REPO_ROOT, *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert {"checkpoint.old", "checkpoint.partial"} <= set(os.listdir(out)) and "checkpoint" not in os.listdir(out)
    assert_each_step_logged_once_after_resume(out, llm, capsys, 6, loss_rows(at_step_3))


def test_a_leftover_old_checkpoint_does_not_block_saving(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = str(tmp_path / "checkpoint")
    args = argparse.Namespace(seed=0)
    checkpoints.save_training_state(path, model, model, opt, 1, args)
    os.makedirs(path + ".old")
    open(os.path.join(path + ".old", "model.safetensors"), "w").close()  # left by a kill after the swap
    checkpoints.save_training_state(path, model, model, opt, 2, args)
    assert checkpoints.checkpoint_step(path) == 2
    assert not os.path.exists(path + ".old") and not os.path.exists(path + ".partial")


def test_torn_loss_log_row_is_dropped_on_resume(tmp_path):
    path = str(tmp_path / "loss.csv")
    with open(path, "w") as f:
        f.write("step,loss,lr,samples_per_s,heldout_accuracy\n1,0.5,0.001,10.00,\n2,0.4,0.001,10.00,\n2,0.4,0.0")
    log = loop.LossLog(path, keep_until=5)
    log.close()
    assert [r["step"] for r in loss_rows(str(tmp_path))] == ["1", "2"]


def test_nan_gradients_stop_the_run_before_the_weights_change(monkeypatch, tmp_path, tiny_llm_dirs, at_step_3):
    out = shutil.copytree(at_step_3, tmp_path / "diverged")
    saved = load_file(os.path.join(out, "checkpoint", "model.safetensors"))
    import training.trainable as trainable
    real = trainable.flow_matching_loss
    monkeypatch.setattr(trainable, "flow_matching_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SystemExit, match="diverged at step 4: the gradient norm is nan.*--resume continues from the "
                                         "last checkpoint"):
        train(out, [tiny_llm_dirs["llama"]], 6, *NO_EVAL, "--resume")
    kept = load_file(os.path.join(out, "checkpoint", "model.safetensors"))
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    assert [int(r["step"]) for r in loss_rows(out)] == [1, 2, 3]
