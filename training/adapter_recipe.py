"""The adapter-only recipe of both trainers (train_lidit.py --base, train_comfy_adapter.py): its defaults, its flags
and their checks. docs/results.md, "The LLM Diff Adapter on an existing model", has the runs that chose it."""
from __future__ import annotations

import argparse

from adapters.diff_adapter import refiner_problem

HOST_TEXT_DROPOUT = 0.5
LLM_GATE = 1.0
ADAPTER_REFINER_DEPTH = 2
DEFAULTS = {"host_text_dropout": HOST_TEXT_DROPOUT, "llm_gate": LLM_GATE,
            "adapter_refiner_depth": ADAPTER_REFINER_DEPTH}


def add_flags(p: argparse.ArgumentParser, needs: str | None = None) -> None:
    """--host-text-dropout, --llm-gate, --adapter-refiner-depth. With `needs` (a flag they only work with, e.g.
    '--base') they default to None, so that giving one without it can be refused; fill_defaults sets the recipe's."""
    prefix = f"{needs}: " if needs else ""
    default = (lambda name: None) if needs else DEFAULTS.get
    p.add_argument("--host-text-dropout", type=float, default=default("host_text_dropout"),
                   help=prefix + "share of the samples (those not emptied for classifier-free guidance) whose frozen "
                        "model's own text encoder gets the empty prompt while the LLM keeps the caption, so that the "
                        f"LLM branch has to carry the meaning (default {HOST_TEXT_DROPOUT})")
    p.add_argument("--llm-gate", type=float, default=default("llm_gate"),
                   help=prefix + "the new branches' gate a at the start: 0 closed (the paper), > 0 open with the value "
                        f"projection at zero (adapters.diff_adapter.DecoupledCrossAttention; default {LLM_GATE})")
    p.add_argument("--adapter-refiner-depth", type=int, default=default("adapter_refiner_depth"),
                   help=prefix + "bidirectional token refiner blocks after the adapter's projection "
                        f"(adapters.diff_adapter.LLMDiffAdapter; default {ADAPTER_REFINER_DEPTH})")


def given(args) -> list[str]:
    """The recipe's flags given on the command line (for add_flags with `needs`)."""
    return [f"--{k.replace('_', '-')}" for k in DEFAULTS if getattr(args, k) is not None]


def fill_defaults(args) -> None:
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def problem(args) -> str | None:
    """What is wrong with the recipe's flags (and --context-dim), or None."""
    if not 0 <= args.host_text_dropout <= 1:
        return "--host-text-dropout is a share of samples, from 0 to 1"
    if refiner := refiner_problem(args.adapter_refiner_depth, args.context_dim):
        return f"--adapter-refiner-depth {args.adapter_refiner_depth} with --context-dim {args.context_dim}: {refiner}"
    return None
