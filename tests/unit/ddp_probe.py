"""Run under `accelerate launch` by test_distributed.py (not a test module itself).

    ddp_probe.py train OUT TRAINER_ARGS...  the real trainer; each rank then writes its parameters and what it drew
    ddp_probe.py step OUT                   one train_step on this rank's half of a fixed batch
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import training.train_lidit as trainer  # noqa: E402
import training.trainable as trainable  # noqa: E402
from adapters.diff_adapter import LLMDiffAdapter  # noqa: E402
from adapters.lidit import LIDiT, LIDiTConfig  # noqa: E402

BATCH, STATES, TOKENS, HIDDEN = 4, 3, 5, 24  # the whole batch; each of two ranks takes half


def fixed_problem():
    """A small model (seed 0) and one fixed batch with its noise and t: the same on every rank."""
    torch.manual_seed(0)
    config = LIDiTConfig(patch_size=4, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0, context_dims=(16,),
                         refiner_depth=1)
    model = trainable.Trainable(LIDiT(config), [LLMDiffAdapter(HIDDEN, STATES, 16)])
    for p in model.parameters():  # open the zero-initialised gates so that every parameter gets a gradient
        p.data.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    batch = dict(x0=torch.randn(BATCH, 3, 16, 16, generator=g),
                 hidden=torch.randn(BATCH, STATES, TOKENS, HIDDEN, generator=g),
                 mask=torch.ones(BATCH, TOKENS, dtype=torch.long),
                 noise=torch.randn(BATCH, 3, 16, 16, generator=g),
                 t=torch.rand(BATCH, generator=g))
    batch["mask"][0, 3:] = 0
    return model, batch


def one_step(accelerator, rows: slice) -> dict[str, torch.Tensor]:
    model, b = fixed_problem()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99))
    model, opt = accelerator.prepare(model, opt)
    loss = trainer.train_step(model, opt, accelerator, b["x0"][rows], [b["hidden"][rows]], [b["mask"][rows]], 1e-3,
                              noise=b["noise"][rows], t=b["t"][rows])
    state = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    state["loss"] = loss.reshape(1)
    return state


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def probe_training(out: str, argv: list[str]) -> None:
    seen, modules = [], []
    forward = trainable.Trainable.forward

    def recording_forward(self, x0, hidden, masks, noise=None, t=None):
        modules[:] = [self]
        seen.append({"x0": digest(x0), "rng": digest(torch.random.get_rng_state())})
        return forward(self, x0, hidden, masks, noise, t)

    trainable.Trainable.forward = recording_forward
    trainer.main(argv)
    rank = int(os.environ.get("RANK", 0))
    save_file({k: v.contiguous() for k, v in modules[0].state_dict().items()}, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


def main() -> None:
    from accelerate import Accelerator
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if mode == "train":
        probe_training(out, sys.argv[3:])
        return
    accelerator = Accelerator()
    assert accelerator.num_processes == 2, accelerator.distributed_type
    half = BATCH // 2
    rank = accelerator.process_index
    state = one_step(accelerator, slice(rank * half, (rank + 1) * half))
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, f"step-rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
