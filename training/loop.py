"""The parts of a training step that both trainers share: precision, the learning-rate schedule, the EMA, one
optimizer step with its divergence check, and the loss log."""
from __future__ import annotations

import csv
import math
import os

import torch

from adapters.checkpoint import written_atomically


def mixed_precision(precision: str) -> str:
    """--precision -> Accelerator's mixed_precision."""
    if precision == "auto":
        fast_bf16 = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        precision = "bf16" if fast_bf16 else "fp32"
    return "no" if precision == "fp32" else "bf16"


LR_FLOOR = 0.1  # the cosine schedule ends at this share of --lr, not at 0


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to LR_FLOOR * --lr. A pure function of the step (what --resume and the log
    need) rather than transformers' scheduler object, whose warm-up starts from 0 where this one's first step learns."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(model, opt, accelerator, x0, hidden, masks, lr: float, noise=None, t=None) -> torch.Tensor:
    """One optimizer step on this rank's batch; gradients are averaged over ranks by DDP's hooks. Returns the loss
    averaged over ranks (what the log shows)."""
    for g in opt.param_groups:
        g["lr"] = lr
    device = accelerator.device
    noise, t = (v if v is None else v.to(device) for v in (noise, t))
    with accelerator.autocast():
        loss = model(x0.to(device), [h.to(device) for h in hidden], [m.to(device) for m in masks], noise, t)
    opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    check_gradients(accelerator.clip_grad_norm_(model.parameters(), 1.0))
    opt.step()
    return accelerator.reduce(loss.detach(), "mean")


class DivergedError(RuntimeError):
    """A non-finite gradient; raised before the optimizer step, so the weights stay as they were."""


def check_gradients(grad_norm: torch.Tensor) -> None:
    if not torch.isfinite(grad_norm):
        raise DivergedError(f"the gradient norm is {grad_norm.item()}")


def diverged(step: int, error: DivergedError, fix: str) -> SystemExit:
    """The error that ends a run at its first non-finite gradient, naming the step and the trainer's fix."""
    return SystemExit(f"Training diverged at step {step}: {error}. Nothing from this step on was saved; --resume "
                      f"continues from the last checkpoint. {fix}")


class LossLog:
    """<out>/loss.csv, one row per step. A step's row is written before its checkpoint, and on resume the rows
    after the checkpoint are dropped (those steps are redone), so a kill anywhere leaves each step logged once."""
    HEADER = ["step", "loss", "lr", "samples_per_s", "heldout_accuracy"]

    def __init__(self, path: str, keep_until: int):
        rows = self.rows_until(path, keep_until)
        with written_atomically(path) as partial, open(partial, "w", newline="") as f:  # a kill keeps the old log
            csv.writer(f).writerows([self.HEADER] + rows)
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)

    @classmethod
    def rows_until(cls, path: str, step: int) -> list[list[str]]:
        if not os.path.exists(path):
            return []
        with open(path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        kept = {}
        for row in rows:  # a torn last row (killed mid-write) has too few fields
            if len(row) == len(cls.HEADER) and row[0].isdigit() and int(row[0]) <= step:
                kept.setdefault(int(row[0]), row)
        return [kept[k] for k in sorted(kept)]

    def write(self, row: list) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> LossLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter. Kept by hand rather than torch's
    AveragedModel, whose first update copies the weights: the trainers' EMA starts from the initial weights."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)
