"""A training run's checkpoint and random streams: a folder swapped in whole (a kill leaves one complete checkpoint
among <path>, .partial and .old), safetensors only (nothing is unpickled, so the optimizer's state is flattened
into tensors and state.json), and every rank's noise, dropout and data streams, so that a run trained in chunks
with --resume draws what one uninterrupted run would have. Both trainers use it."""
from __future__ import annotations

import json
import logging
import os
import random
import shutil

import torch
from safetensors.torch import load_file, save_file

from adapters.checkpoint import written_atomically

log = logging.getLogger(__name__)


RUN_FILES = ("loss.csv", "checkpoint", "checkpoint.partial", "checkpoint.old")  # what a run leaves in its --out


def refuse_existing_run(out: str, resume: bool) -> None:
    """Without --resume a run starts its loss log afresh and replaces the checkpoint at its first save, so it stops,
    before writing anything, where --out holds a run already (both trainers)."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if found and not resume:
        raise SystemExit(f"--out '{out}' already holds a run ({', '.join(found)}): add --resume to continue it, or "
                         "give a new --out to start a new run.")


def start_run(args) -> None:
    """What both trainers do first: stop where --out holds a run and --resume is not given, log to the console, and
    use --threads CPU threads."""
    refuse_existing_run(args.out, args.resume)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)


STREAM_STRIDE = 1_000_003  # seeds of (seed, step) pairs never coincide for runs under a million steps


RANK_STRIDE = 7_919


def seed_streams(data, seed: int, step: int, rank: int) -> None:
    """Data, caption dropout and noise streams of one rank from (seed, step, rank): every rank draws its own
    samples. A resume without the saved streams (another number of processes) continues with new draws."""
    stream = seed * STREAM_STRIDE + step + rank * RANK_STRIDE
    data.rng = random.Random(stream)
    torch.manual_seed(stream)
    random.seed(stream)


def _python_rng_tensor(state: tuple) -> torch.Tensor:
    version, words, gauss_next = state  # Mersenne Twister words (< 2**32, exact in float64), a cached normal or None
    return torch.tensor([version, *words, gauss_next is not None, gauss_next or 0.0], dtype=torch.float64)


def _python_rng_state(t: torch.Tensor) -> tuple:
    v = t.tolist()
    return int(v[0]), tuple(int(w) for w in v[1:-2]), v[-1] if v[-2] else None


def rng_streams(data) -> dict[str, torch.Tensor]:
    """This rank's noise (torch), dropout (random) and data streams as tensors, so that ranks can gather them."""
    streams = {"torch": torch.get_rng_state().to(torch.float64),
               "random": _python_rng_tensor(random.getstate()), "data": _python_rng_tensor(data.rng.getstate())}
    if torch.cuda.is_available():
        streams["cuda"] = torch.cuda.get_rng_state().to(torch.float64)
    return streams


def restore_rng_streams(data, streams: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(streams["torch"].to(torch.uint8))
    random.setstate(_python_rng_state(streams["random"]))
    data.rng.setstate(_python_rng_state(streams["data"]))
    if "cuda" in streams and torch.cuda.is_available():
        torch.cuda.set_rng_state(streams["cuda"].to(torch.uint8))


CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")


RNG_FILE = "rng.safetensors"  # optional: a checkpoint without it resumes on fresh streams


def saved_rng_streams(path: str, rank: int, num_processes: int) -> dict[str, torch.Tensor] | None:
    """This rank's streams from a checkpoint made by as many processes, else None."""
    file = os.path.join(path, RNG_FILE)
    if not os.path.isfile(file):
        return None
    streams = load_file(file)
    if any(v.shape[0] != num_processes for v in streams.values()):
        log.info("The checkpoint's random streams are from another number of processes; drawing fresh ones.")
        return None
    return {k: v[rank] for k, v in streams.items()}


def save_training_state(path: str, trainable, ema, opt, step: int, args,
                        rng: dict[str, torch.Tensor] | None = None) -> None:
    """Writes <path>.partial (state.json last, so a complete one has it), then swaps it in for <path>. At every
    point of a kill one complete checkpoint exists among <path>, <path>.partial and <path>.old, and
    recover_checkpoint finds the newest. rng: every rank's streams ([ranks, ...] each), so that a resumed run
    draws what the uninterrupted one would have."""
    tmp, old = path + ".partial", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)  # a half-written one from a killed save
    os.makedirs(tmp)
    save_file({k: v.contiguous() for k, v in trainable.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, os.path.join(tmp, "ema.safetensors"))
    opt_state = opt.state_dict()
    tensors = {}
    for pid, st in opt_state["state"].items():
        for name, val in st.items():
            tensors[f"{pid}.{name}"] = val.detach().reshape(-1) if val.dim() == 0 else val.detach().contiguous()
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    if rng is not None:
        save_file({k: v.contiguous() for k, v in rng.items()}, os.path.join(tmp, RNG_FILE))
    state = {"step": step, "param_groups": opt_state["param_groups"], "args": vars(args)}
    with written_atomically(os.path.join(tmp, "state.json")) as partial, open(partial, "w") as f:
        json.dump(state, f)
    if os.path.isdir(path):  # complete (only ever made by the rename below), so a leftover .old is not needed
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(path: str) -> int | None:
    """The step of a complete checkpoint folder, None for a missing or half-written one."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            step = int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if all(os.path.isfile(os.path.join(path, n)) for n in CHECKPOINT_FILES) else None


def recover_checkpoint(path: str) -> int | None:
    """After a kill inside save_training_state: the newest complete checkpoint among <path>, <path>.partial and
    <path>.old becomes <path> again and the others are removed. Returns its step (None: no checkpoint)."""
    found = {p: checkpoint_step(p) for p in (path, path + ".partial", path + ".old")}
    found = {p: s for p, s in found.items() if s is not None}
    if not found:
        return None
    best = max(found, key=lambda p: found[p])  # on a tie the first, <path>
    if best != path:
        shutil.rmtree(path, ignore_errors=True)  # incomplete or older; `best` stays complete meanwhile
        os.replace(best, path)
    for leftover in (path + ".partial", path + ".old"):
        shutil.rmtree(leftover, ignore_errors=True)
    return found[best]


def load_training_state(path: str, trainable, ema, opt=None) -> int:
    """The checkpoint's weights and EMA, and its optimizer state where opt is given; returns its step."""
    try:
        trainable.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    except RuntimeError as e:
        raise SystemExit(f"The checkpoint in '{path}' holds another model than these flags build "
                         f"({' '.join(str(e).split())[:300]}). Resume with the flags the run was started with: "
                         f"they are under 'args' in {os.path.join(path, 'state.json')}.") from e
    ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
    if opt is not None:
        load_optimizer_state(path, opt)
    with open(os.path.join(path, "state.json")) as f:
        return int(json.load(f)["step"])


def load_optimizer_state(path: str, opt) -> None:
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    opt_state = {"state": {}, "param_groups": state["param_groups"]}
    for key, val in tensors.items():
        pid, name = key.split(".", 1)
        opt_state["state"].setdefault(int(pid), {})[name] = val.reshape(()) if name == "step" else val
    opt.load_state_dict(opt_state)
